"""``mpnn distribute MANIFEST [--partitions N]``: lookup.json on stdout, exit 2 on a bad manifest."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(ROOT / "operator")):
    if _p not in sys.path:
        sys.path.append(_p)

from partition_server.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402
from partition_server.api.distributor import Distribution, distribute  # noqa: E402
from partition_server.api.lookup import LookupTable  # noqa: E402

BASE = {
    "apiVersion": "mpnn.dev/v1alpha1",
    "kind": "NeuralNetwork",
    "metadata": {"name": "digits"},
    "spec": {
        "model": {"inputs": 64, "layers": [{"units": 128}, {"units": 64}, {"units": 10, "activation": "softmax"}]},
        "partitions": 4,
    },
}


def write(tmp_path: Path, doc: dict, name: str = "nn.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def manifest(**spec) -> dict:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def run_ok(capsys, argv) -> LookupTable:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == EXIT_OK == 0, err
    return LookupTable.from_dict(json.loads(out))


def run_bad(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == EXIT_USAGE == 2
    assert out == ""
    return err


# --------------------------------------------------------------------------- success


def test_prints_valid_lookup_json(tmp_path, capsys):
    t = run_ok(capsys, ["distribute", write(tmp_path, manifest())])
    assert t.network == "digits"
    assert list(t.addresses) == [f"digits-{i}.digits.default.svc.cluster.local:50052" for i in range(4)]
    assert t.layer_units == (128, 64, 10)
    assert [list(t.owners(k)) for k in range(3)] == distribute([128, 64, 10], 4, Distribution())
    assert [(r.start, r.end) for r in t.owners(2)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_output_is_exactly_the_table_json(tmp_path, capsys):
    path = write(tmp_path, manifest())
    assert main(["distribute", path]) == 0
    out = capsys.readouterr().out
    assert out == LookupTable.from_dict(json.loads(out)).to_json(indent=2)
    assert json.loads(out)["apiVersion"] == "mpnn.dev/lookup/v2"


def test_deterministic(tmp_path, capsys):
    path = write(tmp_path, manifest())
    main(["distribute", path])
    first = capsys.readouterr().out
    main(["distribute", path])
    assert capsys.readouterr().out == first


def test_namespace_port_and_cluster_domain(tmp_path, capsys):
    doc = manifest(server={"peerPort": 6000})
    doc["metadata"]["namespace"] = "ml"
    doc["metadata"]["name"] = "net"
    t = run_ok(capsys, ["distribute", write(tmp_path, doc), "--cluster-domain", "corp.internal"])
    assert list(t.addresses) == [f"net-{i}.net.ml.svc.corp.internal:6000" for i in range(4)]


def test_partitions_override(tmp_path, capsys):
    t = run_ok(capsys, ["distribute", write(tmp_path, manifest()), "--partitions", "6"])
    assert t.num_partitions == 6
    assert list(t.addresses) == [f"digits-{i}.digits.default.svc.cluster.local:50052" for i in range(6)]
    assert [(r.partition, r.start, r.end) for r in t.owners(2)] == [
        (0, 0, 2), (1, 2, 4), (2, 4, 6), (3, 6, 8), (4, 8, 9), (5, 9, 10)]


def test_count_strategy(tmp_path, capsys):
    doc = manifest(partitions=2, distribution={"strategy": "count", "counts": [150, 52]})
    t = run_ok(capsys, ["distribute", write(tmp_path, doc)])
    assert [(r.partition, r.start, r.end) for r in t.owners(0)] == [(0, 0, 128)]
    assert [(r.partition, r.start, r.end) for r in t.owners(1)] == [(0, 0, 22), (1, 22, 64)]
    assert [(r.partition, r.start, r.end) for r in t.owners(2)] == [(1, 0, 10)]


def test_layers_strategy(tmp_path, capsys):
    doc = manifest(partitions=2, distribution={"strategy": "layers", "layers": [[0], [1, 2]]})
    t = run_ok(capsys, ["distribute", write(tmp_path, doc)])
    assert [t.partitions_in_layer(k) for k in range(3)] == [[0], [1], [1]]


def test_example_manifest(capsys):
    t = run_ok(capsys, ["distribute", str(ROOT / "examples" / "digits.yaml")])
    assert t.network == "digits" and t.num_partitions == 4


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec,field", [
    ({"distribution": {"strategy": "count", "counts": [100, 100, 1, 2]}}, "spec.distribution.counts"),
    ({"distribution": {"strategy": "percentage", "percentages": [25, 25, 25]}}, "spec.distribution.percentages"),
    ({"distribution": {"strategy": "layers", "layers": [[0], [1], [1, 2], []]}}, "spec.distribution.layers[2][0]"),
    ({"partitions": 0}, "spec.partitions"),
    ({"partitions": 203}, "spec.partitions"),
    ({"partiton": 3}, "spec.partiton"),
])
def test_bad_manifest_exits_2_naming_the_field(tmp_path, capsys, spec, field):
    err = run_bad(capsys, ["distribute", write(tmp_path, manifest(**spec))])
    assert err.startswith("mpnn distribute: error: ")
    assert field in err


def test_bad_activation(tmp_path, capsys):
    doc = manifest()
    doc["spec"]["model"]["layers"][1]["activation"] = "softmax"
    assert "spec.model.layers[1].activation" in run_bad(capsys, ["distribute", write(tmp_path, doc)])


def test_partitions_override_that_no_longer_fits(tmp_path, capsys):
    doc = manifest(distribution={"strategy": "count", "counts": [50, 50, 51, 51]})
    path = write(tmp_path, doc)
    run_ok(capsys, ["distribute", path])
    err = run_bad(capsys, ["distribute", path, "--partitions", "3"])
    assert "spec.distribution.counts" in err


@pytest.mark.parametrize("n", ["0", "203"])
def test_partitions_override_out_of_range(tmp_path, capsys, n):
    assert "spec.partitions" in run_bad(capsys, ["distribute", write(tmp_path, manifest()), "--partitions", n])


def test_missing_file(tmp_path, capsys):
    err = run_bad(capsys, ["distribute", str(tmp_path / "absent.yaml")])
    assert "manifest" in err and "absent.yaml" in err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["distribute"])
    assert ei.value.code == 2


# --------------------------------------------------------------------------- as a process


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "partition_server.cli", *args], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=60)


def test_process_exit_codes(tmp_path):
    good = _cli("distribute", write(tmp_path, manifest(), "good.yaml"), "--partitions", "3")
    assert good.returncode == 0, good.stderr
    t = LookupTable.from_dict(json.loads(good.stdout))
    assert list(t.addresses) == [f"digits-{i}.digits.default.svc.cluster.local:50052" for i in range(3)]

    bad = _cli("distribute", write(tmp_path, manifest(distribution={"strategy": "ids", "ids": [["0:0-127"], [], [], []]}),
                                   "bad.yaml"))
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "spec.distribution.ids" in bad.stderr
