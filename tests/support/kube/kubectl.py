"""A small ``kubectl`` runner bound to one binary and one kubeconfig."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Iterable

from .cluster import tied_to_parent


class KubectlError(AssertionError):
    """kubectl exited non-zero; carries the command, stdout and stderr."""

    def __init__(self, result: subprocess.CompletedProcess):
        self.result = result
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        super().__init__(
            f"`{' '.join(map(str, result.args))}` exited {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}")


class Kubectl:
    """``kubectl(*args)`` runs the pinned kubectl against ``kubeconfig``.

    >>> kubectl("get", "nodes", "-o", "name").stdout
    >>> kubectl.json("get", "pods", namespace="ns")["items"]
    >>> kubectl.apply(manifest_yaml_or_dict_or_list, namespace="ns")
    """

    def __init__(self, binary: str | os.PathLike, kubeconfig: str | os.PathLike):
        self.binary = str(binary)
        self.kubeconfig = str(kubeconfig)

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 120, namespace: str | None = None) -> subprocess.CompletedProcess:
        cmd = [self.binary, f"--kubeconfig={self.kubeconfig}"]
        if namespace:
            cmd.append(f"--namespace={namespace}")
        cmd += [str(a) for a in args]
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        # Tied to this process: a killed test run leaves no kubectl behind.
        result = subprocess.run(tied_to_parent(cmd), input=input, capture_output=True, text=True,
                                timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise KubectlError(result)
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        """Run with ``-o json`` and return the parsed output."""
        return json.loads(self(*args, "-o", "json", **kwargs).stdout)

    def apply(self, manifest: str | dict | Iterable[dict], namespace: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
        """``kubectl apply -f -`` with YAML/JSON text, one object, or a list of objects."""
        if isinstance(manifest, dict):
            text = json.dumps(manifest)
        elif isinstance(manifest, str):
            text = manifest
        else:
            text = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifest)})
        return self("apply", "-f", "-", input=text, namespace=namespace, check=check)
