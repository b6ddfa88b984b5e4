"""The few API calls the reconciler makes, on the kubernetes client's dynamic client.

Children are written with server-side apply under the field manager
``mpnn-operator`` (forcing conflicts: the operator owns what it applies), so an
apply of unchanged content is a no-op that leaves ``resourceVersion`` alone.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from .naming import FIELD_MANAGER

__all__ = ["Kube"]


class Kube:
    """Get, list, apply, create, delete and patch status of objects given as plain dicts.

    An object's type is ``(api_version, kind)``, given first; which object (``name``,
    ``namespace``: None for cluster-scoped) is given by keyword.
    """

    def __init__(self, api_client: k8s_client.ApiClient | None = None):
        if api_client is None:
            k8s_config.load_config()
            api_client = k8s_client.ApiClient()
        self._dyn = DynamicClient(api_client)
        self._resources: dict[tuple[str, str], Any] = {}
        self._discovery = threading.Lock()

    def _resource(self, api_version: str, kind: str):
        # The discovery cache is not thread-safe; reconciles of different networks run in parallel.
        with self._discovery:
            key = (api_version, kind)
            if key not in self._resources:
                self._resources[key] = self._dyn.resources.get(api_version=api_version, kind=kind)
            return self._resources[key]

    def get(self, api_version: str, kind: str, *, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, *, namespace: str | None, label_selector: str
             ) -> list[dict[str, Any]]:
        """Objects matching ``label_selector`` (in ``namespace``; cluster-wide for None)."""
        res = self._resource(api_version, kind)
        return res.get(namespace=namespace, label_selector=label_selector).to_dict()["items"]

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (which names its apiVersion, kind, name, namespace)."""
        res = self._resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        return res.server_side_apply(body=dict(obj), name=meta["name"], namespace=meta.get("namespace"),
                                     field_manager=FIELD_MANAGER, force_conflicts=True).to_dict()

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create ``obj``; None if an object of that name exists already (nothing is changed)."""
        res = self._resource(obj["apiVersion"], obj["kind"])
        try:
            return res.create(body=dict(obj), namespace=obj["metadata"].get("namespace"),
                              field_manager=FIELD_MANAGER).to_dict()
        except ConflictError:
            return None

    def delete(self, api_version: str, kind: str, *, name: str, namespace: str | None = None,
               propagation: str = "Background") -> bool:
        """Delete (dependents: ``Background`` or ``Foreground``); False if it was already gone."""
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace,
                                                     propagation_policy=propagation)
            return True
        except NotFoundError:
            return False

    def patch_status(self, api_version: str, kind: str, *, name: str, namespace: str | None,
                     status: Mapping[str, Any]) -> dict[str, Any] | None:
        """JSON-merge-patch ``status`` into the status subresource; None if the object is gone."""
        res = self._resource(api_version, kind)
        try:
            return self._dyn.patch(res.status, body={"status": dict(status)}, name=name, namespace=namespace,
                                   content_type="application/merge-patch+json").to_dict()
        except NotFoundError:
            return None
