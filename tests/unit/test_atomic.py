"""The one atomic-write helper: complete files only, no temp files left, exclusive mode, durability calls."""

import os

import pytest

from partition_server.storage import atomic
from partition_server.storage.atomic import atomic_path, write_atomically


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "lookup.json"
    write_atomically(target, "first")
    write_atomically(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert os.listdir(tmp_path) == ["lookup.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_exclusive_never_replaces(tmp_path):
    target = tmp_path / "commit.json"
    write_atomically(target, "a", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomically(target, "b", exclusive=True)
    assert target.read_text() == "a"
    assert os.listdir(tmp_path) == ["commit.json"]


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))  # a directory?
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_atomically(tmp_path / "network.json", "{}")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_missing_directory_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "absent" / "x", "data")
