"""Free TCP ports for local mode and the tests' control plane: picked, then bound by another
process a moment later (standard library only)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_ports"]


def _ephemeral_range() -> tuple[int, int] | None:
    """The kernel's range for automatically assigned ports (Linux), or None where unknown."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago, held open together while picked.

    They come from below the kernel's ephemeral range where that leaves room (ports
    ``10000..low-1``): the kernel hands ports of that range to every outgoing connection and
    every bind to port 0, and one of those could take a port between this pick and the server's
    bind (``Address already in use``; seen with a busy cluster on the same machine). Elsewhere the
    OS picks.
    """
    span = _ephemeral_range()
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        tries = 0
        while span and span[0] > 12000 and len(socks) < n and tries < 200 * n:
            tries += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randrange(10000, span[0])))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
