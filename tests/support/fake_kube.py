"""An in-memory stand-in for :class:`mpnn_operator.kube.Kube`, for reconciler tests without a cluster.

It applies as server-side apply does for the reconciler's purposes (a write only when the
applied content differs; a ``spec`` field set by a create or a controller and left out of
the next apply stays), merge-patches status as the API server does, and records every
write (``writes``) and every object as the reconciler sent it (``sent``). The real API
server runs the same scenarios in ``tests/cluster/test_operator.py``.
"""

from __future__ import annotations

import copy
import datetime as dt

from mpnn_operator import naming
from partition_server.api.lookup import LookupTable

__all__ = ["FakeKube"]


def _now():
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKube:
    """Objects keyed by (kind, namespace, name); counts writes. As with server-side apply, a
    ``spec`` field that the last apply did not set but someone else did (a create, a
    controller) stays when an apply leaves it out."""

    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.sent: list[dict] = []  # every object given to apply or create, as given
        self._rv = 0
        self._applied: dict[tuple, set[str]] = {}  # spec fields set by the last apply

    def _bump(self, obj):
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def get(self, api_version, kind, *, name, namespace=None):
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list(self, api_version, kind, *, namespace, label_selector):
        want = dict(term.split("=", 1) for term in label_selector.split(",") if term)
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and (namespace is None or ns == namespace)
                and all(o["metadata"].get("labels", {}).get(a) == b for a, b in want.items())]

    def apply(self, obj, _op="apply"):
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        current = self.objects.get(key)
        new = copy.deepcopy(obj)
        if _op == "apply":
            self.sent.append(copy.deepcopy(obj))
            applied, self._applied[key] = self._applied.get(key, set()), set(new.get("spec") or {})
        if current is not None:
            new["metadata"] = {**current["metadata"], **new["metadata"]}
            others = {k: v for k, v in (current.get("spec") or {}).items()
                      if k not in applied and k not in (new.get("spec") or {})}
            if others:
                new["spec"] = {**others, **(new.get("spec") or {})}
            if "status" in current:
                new["status"] = current["status"]
            if new == current:
                return copy.deepcopy(current)
            if new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        else:
            new["metadata"].update(generation=1, uid=new["metadata"].get("uid") or f"uid-{self._rv + 1}",
                                   creationTimestamp=new["metadata"].get("creationTimestamp") or _now())
        self._bump(new)
        self.objects[key] = new
        if _op == "apply":
            self.writes.append(("apply",) + key[:1] + key[2:])
        return copy.deepcopy(new)

    def create(self, obj):
        if (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) in self.objects:
            return None
        self.writes.append(("create", obj["kind"], obj["metadata"]["name"]))
        self.sent.append(copy.deepcopy(obj))
        return self.apply(obj, _op="create")

    def delete(self, api_version, kind, *, name, namespace=None, propagation="Background"):
        self.writes.append(("delete", kind, name))
        self._applied.pop((kind, namespace, name), None)
        return self.objects.pop((kind, namespace, name), None) is not None

    def patch_status(self, api_version, kind, *, name, namespace, status):
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            return None
        obj["status"] = _merge_patch(obj.get("status", {}), status)
        self._bump(obj)
        self.writes.append(("status", kind, name))
        return copy.deepcopy(obj)

    # test helpers
    def create_network(self, doc):
        doc = copy.deepcopy(doc)
        doc["metadata"].update(namespace="ns", uid="uid-1")
        self.apply(doc)

    def edit(self, kind, name, **spec):
        obj = self.get("", kind, name=name, namespace="ns")
        obj["spec"].update(spec)
        obj.pop("status", None)
        self.apply(obj)

    def lookup(self, name="digits"):
        cm = self.objects[("ConfigMap", "ns", naming.lookup_name(name))]
        return LookupTable.from_configmap(cm)


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch, as the API server applies it to status: maps merge, None deletes."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out
