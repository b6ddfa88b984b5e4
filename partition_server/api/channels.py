"""gRPC channel and server options shared by the partition servers and their clients."""

from __future__ import annotations

__all__ = ["CHANNEL_OPTIONS", "MAX_MESSAGE_BYTES"]

# gRPC's default 4 MiB limit is far below one [batch, units] activation of a wide layer.
MAX_MESSAGE_BYTES = 1 << 30
# Reconnect backoff: gRPC's default grows to 120 s, so a channel to a partition that was down for
# a minute would stay failing long after it is back. Partitions come back within seconds (a
# restarted process or pod); retry connecting at least every second.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *RECONNECT_OPTIONS]
