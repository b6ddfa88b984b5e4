#!/usr/bin/env python3
"""Write a one-layer OCI image archive (an OCI image layout in a tar) from a root filesystem.

No registry and no daemon: the layer is a deterministic tar of ROOTFS (entries sorted,
mtimes clamped to SOURCE_DATE_EPOCH, numeric owners only, gzip without a timestamp), and
the config, manifest and index are plain JSON. The result imports with
``ctr -n k8s.io images import`` and copies to a registry with
``skopeo copy oci-archive:FILE docker://REGISTRY/NAME:TAG``.

    oci.py ROOTFS OUT.tar --name ghcr.io/mpnn/mpnn:0.1.0 [--entrypoint mpnn] [--cmd --help]
           [--user 65532:65532] [--workdir /home/mpnn] [--env K=V ...] [--label K=V ...]

Only the standard library. Prints the manifest digest.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path

# Directories whose contents the runtime provides; kept as empty directories.
EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp")


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes (and counts) what goes through it into ``out``."""

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.out.write(b)
        return len(b)


def _walk(rootfs: Path):
    """Sorted depth-first walk: ('a', 'a/b', 'a/b/c', 'a/c', 'b', ...)."""

    def rec(rel: str):
        full = rootfs / rel if rel else rootfs
        for name in sorted(os.listdir(full), key=os.fsencode):
            r = f"{rel}/{name}" if rel else name
            yield r
            if not rel and name in EMPTY_DIRS:
                continue
            if stat.S_ISDIR(os.lstat(rootfs / r).st_mode):
                yield from rec(r)

    yield from rec("")


def write_layer(rootfs: Path, out, epoch: int) -> tuple[str, str, int]:
    """Write the gzipped layer tar to ``out``; return (diff_id, digest, size)."""
    hashed = _HashingWriter(out)
    raw_sha = hashlib.sha256()

    class _Tee(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raw_sha.update(b)
            return gz.write(b)

    gz = gzip.GzipFile(filename="", mode="wb", fileobj=hashed, mtime=0, compresslevel=6)
    tee = io.BufferedWriter(_Tee(), buffer_size=1 << 20)
    inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(rootfs):
            full = rootfs / rel
            st = os.lstat(full)
            ti = tarfile.TarInfo(rel)
            ti.mode = stat.S_IMODE(st.st_mode)
            ti.uid, ti.gid = st.st_uid, st.st_gid
            ti.uname = ti.gname = ""
            ti.mtime = min(int(st.st_mtime), epoch)
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in inodes:
                ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, inodes[key], 0
                tar.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                inodes[key] = rel
                ti.size = st.st_size
                with open(full, "rb") as f:
                    tar.addfile(ti, f)
            elif stat.S_ISDIR(st.st_mode):
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif stat.S_ISLNK(st.st_mode):
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(full)
                tar.addfile(ti)
            else:
                continue  # device nodes, sockets, fifos: the runtime provides /dev
    tee.flush()
    gz.close()
    return "sha256:" + raw_sha.hexdigest(), "sha256:" + hashed.sha.hexdigest(), hashed.size


def _canon(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(rootfs: Path, out: Path, name: str, entrypoint: list[str], cmd: list[str], user: str,
          workdir: str, env: list[str], labels: dict[str, str], epoch: int) -> str:
    import datetime

    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".oci.") as tmp:
        tmp = Path(tmp)
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        with open(tmp / "layer", "wb") as f:
            diff_id, layer_digest, layer_size = write_layer(rootfs, f, epoch)
        os.replace(tmp / "layer", blobs / layer_digest.split(":")[1])

        def blob(data: bytes) -> tuple[str, int]:
            d = hashlib.sha256(data).hexdigest()
            (blobs / d).write_bytes(data)
            return "sha256:" + d, len(data)

        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "User": user,
                "Entrypoint": entrypoint,
                "Cmd": cmd,
                "Env": env,
                "WorkingDir": workdir,
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created, "created_by": "hack/image/oci.py"}],
        }
        config_digest, config_size = blob(_canon(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": layer_size}],
        }
        manifest_digest, manifest_size = blob(_canon(manifest))
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": tag},
            }],
        }
        (tmp / "index.json").write_bytes(_canon(index))
        (tmp / "oci-layout").write_bytes(_canon({"imageLayoutVersion": "1.0.0"}))
        part = tmp / "archive.tar"
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in ["oci-layout", "index.json", "blobs", "blobs/sha256",
                        *(f"blobs/sha256/{p}" for p in sorted(os.listdir(blobs)))]:
                ti = tar.gettarinfo(str(tmp / rel), arcname=rel)
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = epoch
                ti.mode = 0o755 if ti.isdir() else 0o644
                if ti.isreg():
                    with open(tmp / rel, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
        os.replace(part, out)
    return manifest_digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rootfs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", required=True, help="image name with tag (io.containerd.image.name)")
    p.add_argument("--entrypoint", action="append", default=[])
    p.add_argument("--cmd", action="append", default=[])
    p.add_argument("--user", default="0:0")
    p.add_argument("--workdir", default="/")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--epoch", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    a = p.parse_args(argv)
    labels = dict(kv.split("=", 1) for kv in a.label)
    print(build(a.rootfs, a.out, a.name, a.entrypoint, a.cmd, a.user, a.workdir, a.env, labels, a.epoch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
