"""``mpnn serve``: one partition server as a process, until SIGTERM or SIGINT.

The ``mpnn`` CLI (``partition_server.cli``) parses and checks the arguments; this module finds
the partition index (``--partition``, else a StatefulSet pod's hostname ordinal), reads the
network document, runs :class:`~partition_server.serving.server.PartitionServer` and stops it on
a signal. Started by ``mpnn run`` (``MPNN_PARENT_PID`` set), the process also ends when its
parent dies.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from partition_server import logs
from partition_server.api.environment import PARENT_PID_ENV
from partition_server.api.manifest import network_batching, parse_network_document
from partition_server.api.peer_auth import PeerCredentials, TlsFiles, read_key
from partition_server.serving.limits import ServerLimits
from partition_server.serving.server import PartitionServer

__all__ = ["configure_allocator", "exit_with_parent", "main", "partition_from_hostname", "peer_credentials"]

log = logging.getLogger("mpnn.server")


def partition_from_hostname(hostname: str | None = None) -> int:
    """A StatefulSet pod's ordinal: ``digits-3`` → 3 (default: this host's name).

    Raises:
        ValueError: the name has no ``-<ordinal>`` suffix.
    """
    hostname = hostname or socket.gethostname()
    m = re.search(r"-(\d+)$", hostname.split(".")[0])
    if not m:
        raise ValueError(f"partition: not given (--partition / MPNN_PARTITION) and hostname {hostname!r} has no ordinal")
    return int(m.group(1))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def configure_allocator(*, mmap_threshold: int = 1 << 20, trim_threshold: int = 16 << 20) -> bool:
    """Tune glibc's allocator for a partition server, before its threads start. Returns whether
    it took effect (False off glibc). Its arenas are limited by ``api.environment.ALLOCATOR_ENV``,
    which the launchers set (glibc fixes that limit before this code runs).

    - ``mmap_threshold`` (bytes, ``M_MMAP_THRESHOLD``): every allocation this large or larger is
      mapped on its own and unmapped when freed (this also stops glibc from raising the
      threshold after such frees). Without it, a burst of large messages that the server refuses
      or drops (tensors, request bodies) stays resident in the allocator's arenas.
    - ``trim_threshold`` (bytes, ``M_TRIM_THRESHOLD``): the smaller arrays of every pass
      (activations, messages) are freed and allocated again each step; with glibc's trim at
      128 KiB (its default once the mmap threshold is fixed) their pages go back to the kernel
      and fault in again. Each arena may keep up to this many free bytes instead.
    """
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def exit_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the parent process dies (``PR_SET_PDEATHSIG``), so a local
    server never outlives ``mpnn run``, even one killed with SIGKILL. Done here, after exec,
    rather than in a ``preexec_fn``, which would make the parent fork() with gRPC threads running.

    Raises:
        SystemExit: the parent already died before the request took effect.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        raise SystemExit(f"partition server: parent process {parent_pid} is gone")


def peer_credentials(network: str, args: Any) -> PeerCredentials:
    """The network's peer key from ``args.peer_key_file``, and TLS files from ``args.tls_dir`` if given.

    Raises:
        FieldError: naming the flag and the path that cannot be used.
    """
    tls = TlsFiles.from_dir(args.tls_dir) if args.tls_dir else None
    return PeerCredentials(network, read_key(args.peer_key_file), tls)


def main(args: Any) -> int:
    """``mpnn serve``: run one partition server until SIGTERM or SIGINT (or, started by
    ``mpnn run``, until its parent dies). Returns the exit code, 0.

    Args:
        args: the parsed ``mpnn serve`` arguments (``partition``, ``network``, ``lookup``,
            ``model_dir``, ``host``, ``port``, ``peer_port``, ``http_port``, ``peer_key_file``, ``tls_dir``,
            ``log_level``).

    Raises:
        FieldError: no readable peer key (``--peer-key-file``) or TLS directory (``--tls-dir``).
    """
    logs.configure(args.log_level)
    limits = ServerLimits.from_env()  # a bad MPNN_* bound fails here, naming the variable and its value
    configure_allocator()
    if os.environ.get(PARENT_PID_ENV):
        exit_with_parent(int(os.environ[PARENT_PID_ENV]))
    index = args.partition if args.partition is not None else partition_from_hostname()
    network = json.loads(Path(args.network).read_text())
    name, model = parse_network_document(network)
    credentials = peer_credentials(name, args)
    server = PartitionServer(index, name, model, lookup_path=args.lookup, model_dir=args.model_dir,
                             credentials=credentials, limits=limits, batching=network_batching(network))
    server.start(args.host, args.port, peer_port=args.peer_port, http_port=args.http_port or None)
    done = threading.Event()

    def shutdown(signum, frame):  # noqa: ARG001 - signal handler signature
        log.info("stopping", extra={"partition": index, "signal": signum})
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    while not done.wait(1.0):
        pass
    server.stop()
    return 0
