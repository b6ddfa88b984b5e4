"""Environment variables that pass between a launcher and the ``mpnn serve`` processes it starts.

Local mode (:mod:`partition_server.client.local`) starts the servers; the server
(:mod:`partition_server.serving.main`) reads what it was given. Neither imports the other.
"""

from __future__ import annotations

__all__ = ["PARENT_PID_ENV"]

# The launcher's pid: the server exits when that process dies (PR_SET_PDEATHSIG and a check),
# so a killed `mpnn run` never leaves servers behind.
PARENT_PID_ENV = "MPNN_PARENT_PID"
