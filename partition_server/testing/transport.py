"""``LocalTransport``: an in-memory transport that runs partitions as threads of one process.

A test and benchmark aid: it implements ``partition_server.engine.Transport`` over one shared
``Mailbox`` per partition, with no serialisation and no gRPC, and counts what it sends.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterable, Mapping

import numpy as np

from partition_server.engine import Mailbox

__all__ = ["LocalTransport"]


class LocalTransport:
    """In-process transport: partitions are threads sharing one ``Mailbox`` per partition.

    Build a connected set with ``LocalTransport.group(n)``; give ``group[i]`` to partition
    ``i``'s engine. Sent arrays are copied (C-contiguous), as a wire would, so a receiver never
    aliases a sender's buffer. Counts what it sends.

    Attributes:
        index: the partition this transport sends from.
        mailboxes: ``{partition: Mailbox}`` shared by the group.
        messages_sent: messages sent so far.
        bytes_sent: payload bytes sent so far.
        sent_by: ``Counter`` of messages keyed by ``key[1:]`` (e.g. ``("fwd", 2)``).
    """

    def __init__(self, index: int, mailboxes: Mapping[int, Mailbox]):
        self.index = index
        self.mailboxes = mailboxes
        self.messages_sent = 0
        self.bytes_sent = 0
        self.sent_by: Counter = Counter()
        self._lock = threading.Lock()

    @classmethod
    def group(cls, n: int) -> list["LocalTransport"]:
        """``n`` transports, index 0..n-1, over a fresh shared set of mailboxes."""
        boxes = {i: Mailbox() for i in range(n)}
        return [cls(i, boxes) for i in range(n)]

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect: Iterable[int],
                 timeout: float) -> dict[int, np.ndarray]:
        """See ``Transport.exchange``: ``outgoing`` is ``{peer: [batch, width] float32}``.

        Raises:
            ValueError: a peer that is this partition or not in the group.
            TimeoutError: naming ``key`` and the missing peers.
            StepAborted: the step was discarded while waiting.
        """
        for peer, arr in outgoing.items():
            if peer == self.index or peer not in self.mailboxes:
                raise ValueError(f"peer: cannot send to partition {peer} from partition {self.index}")
            copy = np.array(arr, copy=True, order="C")
            self.mailboxes[peer].put(key, self.index, copy)
            with self._lock:
                self.messages_sent += 1
                self.bytes_sent += copy.nbytes
                self.sent_by[key[1:]] += 1
        return self.mailboxes[self.index].take_many(key, expect, timeout)

    def discard(self, pass_id: Any) -> int:
        """Drop this partition's leftovers of an aborted step (see ``Mailbox.discard``)."""
        return self.mailboxes[self.index].discard(pass_id)

    def reset_counters(self) -> None:
        """Zero ``messages_sent``, ``bytes_sent`` and ``sent_by``."""
        with self._lock:
            self.messages_sent = self.bytes_sent = 0
            self.sent_by = Counter()
