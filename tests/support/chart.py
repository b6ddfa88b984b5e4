"""The Helm chart and install manifests as the tests read them: paths, Helm's rendering
(through helm-python-sdk) and the objects in a rendering or an example file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) is not installed")

__all__ = ["CHART", "EXAMPLES", "INSTALL_YAML", "ROOT", "TRAINER_RBAC", "example_documents", "helm", "objects", "render"]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mpnn-operator"
INSTALL_YAML = ROOT / "manifests" / "install.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
TRAINER_RBAC = EXAMPLES / "trainer-rbac.yaml"  # the one example that is not a network


def render(values: dict[str, Any] | None = None, *, name: str = "mpnn-operator",
           namespace: str = "mpnn-system") -> dict[str, str]:
    """Helm's rendering of the chart: template path -> text (NOTES.txt included)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=name, namespace=namespace, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a rendering (NOTES.txt left out)."""
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def example_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
