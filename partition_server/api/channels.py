"""gRPC channel and server options shared by the partition servers and their clients."""

from __future__ import annotations

__all__ = ["CHANNEL_OPTIONS", "MAX_MESSAGE_BYTES"]

# gRPC's default 4 MiB limit is far below one [batch, units] activation of a wide layer.
MAX_MESSAGE_BYTES = 1 << 30
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
