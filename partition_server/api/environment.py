"""Environment variables that pass between a launcher and the ``mpnn serve`` processes it starts.

Local mode (:mod:`partition_server.client.local`) starts the servers; the server
(:mod:`partition_server.serving.main`) reads what it was given. Neither imports the other.
"""

from __future__ import annotations

__all__ = ["ALLOCATOR_ENV", "PARENT_PID_ENV", "PEER_KEY_BYTES", "PEER_KEY_FILE_ENV", "PEER_KEY_ITEM"]

# The launcher's pid: the server exits when that process dies (PR_SET_PDEATHSIG and a check),
# so a killed `mpnn run` never leaves servers behind.
PARENT_PID_ENV = "MPNN_PARENT_PID"

# The file holding the network's peer key (raw bytes): the mounted Secret <name>-peer-key in a
# cluster (item PEER_KEY_ITEM), a file `mpnn run` writes (mode 0600) in local mode.
PEER_KEY_FILE_ENV = "MPNN_PEER_KEY_FILE"
PEER_KEY_ITEM = "key"
PEER_KEY_BYTES = 32  # 256 bits

# glibc's allocator for a partition server: two arenas instead of one per thread (16 on 2 cores),
# so that the arrays every pass frees and allocates again are reused rather than given back to
# the kernel and faulted in again (about a sixth of a server's CPU per step at W=1024; see
# serving.main.configure_allocator, which sets the thresholds). An environment variable because
# glibc fixes the arena limit when the first thread allocates, before a server's code runs.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2"}
