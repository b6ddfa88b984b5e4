"""The image `make image` builds (hack/image/build.sh, an OCI archive) and the Dockerfile agree:
same Python major.minor, user, entrypoint, command, working directory, environment, and the same
installed project (`.[operator]`, no dev extras) with its dependencies.

The archive for the current tree is looked up by its content key (`build.sh --print-path`); when it
has not been built the test skips (fails with CI=true, where `make test` builds it first as root)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# What `python -m venv` puts into every venv besides the project (same in both images).
VENV_SEED = {"pip", "setuptools"}


def _archive() -> Path:
    out = subprocess.run(["bash", str(ROOT / "hack/image/build.sh"), "--print-path"], capture_output=True,
                         text=True, check=True).stdout.strip()
    path = Path(out)
    if not path.is_file():
        msg = f"the image for this tree is not built ({path}); run `make image`"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(msg + " (CI=true)", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def image() -> dict:
    """Config, distributions and a few files of the archive's single layer."""
    with tarfile.open(_archive()) as outer:
        def blob(digest: str):
            return outer.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
        index = json.load(outer.extractfile("index.json"))
        manifest = json.load(blob(index["manifests"][0]["digest"]))
        config = json.load(blob(manifest["config"]["digest"]))
        assert len(manifest["layers"]) == 1
        dists, files, passwd = {}, set(), ""
        with tarfile.open(fileobj=blob(manifest["layers"][0]["digest"]), mode="r|gz") as layer:
            for m in layer:
                files.add(m.name)
                hit = re.fullmatch(r"opt/mpnn/lib/python(\d+\.\d+)/site-packages/([^/]+)\.dist-info/METADATA", m.name)
                if hit:
                    text = layer.extractfile(m).read().decode()
                    name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip()
                    version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
                    dists[canonicalize_name(name)] = version
                elif m.name == "etc/passwd":
                    passwd = layer.extractfile(m).read().decode()
    return {"index": index, "config": config, "dists": dists, "files": files, "passwd": passwd}


def _dockerfile() -> dict:
    text = DOCKERFILE.read_text()
    out = {"env": {}}
    out["python"] = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", text).group(1)
    out["user"] = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    out["entrypoint"] = json.loads(re.findall(r"^ENTRYPOINT (.+)$", text, re.M)[-1])
    out["cmd"] = json.loads(re.findall(r"^CMD (.+)$", text, re.M)[-1])
    out["workdir"] = re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1]
    env = re.search(r"^ENV PATH=(.*?)(?=^\S)", text, re.M | re.S).group(0)
    for k, v in re.findall(r"(\w+)=(\S+)", env.replace("\\\n", " ")):
        out["env"][k] = v
    out["extras"] = re.search(r'pip install "\.\[([\w,]+)\]"', text).group(1).split(",")
    return out


def _closure(extras: list[str]) -> set[str]:
    """Distributions `pip install .[extras]` installs, from this environment's metadata."""
    seen, todo = set(), [("mpnn", tuple(extras))]
    while todo:
        name, ex = todo.pop()
        key = canonicalize_name(name)
        if (key, ex) in seen:
            continue
        seen.add((key, ex))
        for req in metadata.requires(name) or []:
            r = Requirement(req)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if r.marker is None or any(r.marker.evaluate(e) for e in envs):
                todo.append((r.name, tuple(sorted(r.extras))))
    return {k for k, _ in seen}


def test_config_matches_the_dockerfile(image):
    d, cfg = _dockerfile(), image["config"]["config"]
    assert cfg["User"] == d["user"] == "65532:65532"
    assert cfg["Entrypoint"] == d["entrypoint"] == ["mpnn"]
    assert cfg["Cmd"] == d["cmd"]
    assert cfg["WorkingDir"] == d["workdir"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    for k, v in d["env"].items():
        if k == "PATH":
            assert env["PATH"].startswith(v.split(":$PATH")[0] + ":"), env["PATH"]
        else:
            assert env[k] == v, k
    assert cfg["Labels"]["dev.mpnn.python"] == d["python"]
    assert f"usr/bin/python{d['python']}" in image["files"]
    assert f"opt/mpnn/lib/python{d['python']}/site-packages" in image["files"]
    assert re.search(r"^mpnn:x:65532:65532:", image["passwd"], re.M), image["passwd"]
    assert "home/mpnn" in image["files"]


def test_same_installed_project(image):
    d = _dockerfile()
    assert d["extras"] == ["operator"]
    installed = set(image["dists"]) - VENV_SEED
    assert installed == _closure(d["extras"]), (
        f"only in the image: {sorted(installed - _closure(d['extras']))}; "
        f"only in the Dockerfile's install: {sorted(_closure(d['extras']) - installed)}")
    assert image["dists"]["mpnn"] == metadata.version("mpnn")
    # No dev extras, no test tools.
    assert not {"pytest", "grpcio-tools", "tritonclient", "import-linter"} & installed


def test_archive_names_the_chart_image(image):
    version = metadata.version("mpnn")
    (m,) = image["index"]["manifests"]
    assert m["annotations"]["io.containerd.image.name"] == f"ghcr.io/mpnn/mpnn:{version}"
    assert m["annotations"]["org.opencontainers.image.ref.name"] == version
