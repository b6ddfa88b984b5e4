"""Test aids: the single-process numpy reference network the engine is checked against, and an
in-memory transport. Production code never imports this package.
"""

from partition_server.testing.reference import ReferenceNetwork, gather_rows, slice_params
from partition_server.testing.transport import LocalTransport

__all__ = ["LocalTransport", "ReferenceNetwork", "gather_rows", "slice_params"]
