"""A thread-safe mailbox: where a partition's incoming tensors wait for its engine.

Transports deliver each peer's message for a step, phase and layer into the
receiving partition's mailbox (``put``); the engine thread blocks in ``take``
until it arrives. This decouples the gRPC handler threads that receive from the
engine thread that computes (the batched per-(layer, peer) exchange of
``DESIGN.md``, "Execution engine"; the idea of remote neurons reached through
messages is from "Multi Part Deployment of Neural Network", arXiv 2506.01387).

Keys are tuples whose first element is the step id, e.g.
``(pass_id, "fwd", layer)``; ``src`` is the sending partition's index.

Bounds: what a peer (even an authenticated but buggy or hostile one) can make a partition hold
is capped per ``src``, in bytes and in entries, and more tightly for passes that are not running
here (:meth:`Mailbox.open`): such a message is kept only as an *early* arrival (its sender's pass
started before this partition's own ``RunPass`` of it) within ``early_bytes`` / ``early_entries``
and for at most ``early_ttl`` seconds. A ``put`` beyond a cap raises :class:`MailboxFull`.

Lost messages: a transport that learns that messages from ``src`` may have been lost (the stream
carrying them broke, or was refused) calls :meth:`Mailbox.lost`; a pass running here, or with
messages from ``src`` waiting here, then fails at once with :class:`~.transport.ExchangeError`
(:class:`PeerLost`) naming ``src`` when it waits for (or asks for) a message from ``src`` that has not arrived,
instead of waiting out its deadline.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable, Iterable

import numpy as np

from partition_server.engine.transport import ExchangeError

__all__ = ["Mailbox", "MailboxFull", "PeerLost", "StepAborted"]

MiB = 1 << 20


class StepAborted(RuntimeError):
    """``take`` was waiting for (or asked for) a message of a step that has been discarded."""


class PeerLost(ExchangeError):
    """A pass waits for a message from ``src`` that may have been lost (:meth:`Mailbox.lost`)."""

    def __init__(self, message: str, src: int):
        super().__init__(message)
        self.src = src


class MailboxFull(RuntimeError):
    """A ``put`` would take a peer past its bytes or entries in this mailbox; nothing was stored."""


class Mailbox:
    """Messages for one partition, keyed by ``(key, src)``.

    Each ``(key, src)`` is delivered at most once: a second ``put`` while the
    first is still waiting raises ``ValueError``. ``discard(pass_id)`` drops a
    step's leftovers and remembers the id (the last ``remember_discarded``
    ids), so late messages for an aborted step are dropped rather than kept
    forever, and takers blocked on it wake with ``StepAborted``. Step ids must
    therefore be unique: a retried step needs a new id.

    A message that nobody takes (its step never runs here: the receiver's Step was
    refused or never sent) expires: every ``put`` and ``take`` first drops the messages
    whose time to live has passed.

    Args:
        remember_discarded: how many discarded step ids to remember.
        expire_after: default time to live of a message, seconds.
        clock: monotonic seconds (tests pass a fake one).
        peer_bytes, peer_entries: array bytes (``nbytes``) and messages one ``src`` may have
            waiting here in all; None: no cap.
        early_bytes, early_entries: of those, for passes not opened here (:meth:`open`); None: no cap.
        early_ttl: longest time to live of a message for a pass not opened here, seconds.
    """

    def __init__(self, remember_discarded: int = 1024, expire_after: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, *, peer_bytes: int | None = 512 * MiB,
                 peer_entries: int | None = 4096, early_bytes: int | None = 64 * MiB,
                 early_entries: int | None = 64, early_ttl: float = 30.0):
        self._cond = threading.Condition()
        self._slots: dict[tuple[tuple, int], tuple[np.ndarray, float]] = {}
        self._early: set[tuple[tuple, int]] = set()           # slots of passes not opened here
        self._open: dict[Hashable, int] = {}                  # pass id -> RunPass calls running it
        self._held: dict[int, list[int]] = {}                 # src -> [bytes, entries, early bytes, early entries]
        self._caps = (peer_bytes, peer_entries, early_bytes, early_entries)
        self._early_ttl = early_ttl
        self._discarded: OrderedDict[Hashable, None] = OrderedDict()
        self._remember = remember_discarded
        self._expire_after = expire_after
        self._clock = clock
        self._next_expiry = float("inf")
        self._lost: OrderedDict[Hashable, dict[int, str]] = OrderedDict()  # pass id -> {src: why}
        # key -> per waiting take_many, the srcs it still waits for: a put wakes the takers only
        # when it completes one of these sets (not at every message, which would wake the engine
        # P-1 times a round).
        self._awaited: dict[tuple, list[set[int]]] = {}

    def lost(self, src: int, reason: str) -> list[Hashable]:
        """Say that messages from ``src`` may have been lost (``reason``: why, for the error).

        Every pass running here, and every pass with a message from ``src`` waiting here, is
        marked: its :meth:`take_many` of a message from ``src`` not yet arrived raises
        :class:`~.transport.ExchangeError` at once (a waiting one wakes). Marks are dropped with
        :meth:`discard`; at most ``remember_discarded`` passes stay marked.

        Returns:
            the pass ids marked.
        """
        with self._cond:
            passes = list(self._open) + [k[0] for (k, s) in self._slots if s == src and k[0] not in self._open]
            passes = list(dict.fromkeys(passes))
            for pass_id in passes:
                self._lost.setdefault(pass_id, {})[src] = reason
                self._lost.move_to_end(pass_id)
            while len(self._lost) > self._remember:
                self._lost.popitem(last=False)
            if passes:
                self._cond.notify_all()
            return passes

    def open(self, pass_id: Hashable, ttl: float | None = None) -> None:
        """Say that ``pass_id`` runs here now (until :meth:`discard`): its messages, including the
        early ones already waiting, count as a running pass's, and wait up to ``ttl`` seconds
        (default ``expire_after``)."""
        with self._cond:
            now = self._expire()
            self._open[pass_id] = self._open.get(pass_id, 0) + 1
            expires = now + (self._expire_after if ttl is None else max(0.0, ttl))
            for slot in [slot for slot in self._early if slot[0][0] == pass_id]:
                self._early.discard(slot)
                held = self._held[slot[1]]
                held[2] -= self._slots[slot][0].nbytes
                held[3] -= 1
                self._slots[slot] = (self._slots[slot][0], expires)
            self._next_expiry = min([self._next_expiry] + [e for (k, _), (_, e) in self._slots.items()
                                                           if k[0] == pass_id])

    def put(self, key: tuple, src: int, array: np.ndarray, ttl: float | None = None) -> bool:
        """Deliver ``array`` from partition ``src`` under ``key``.

        The array is stored as given (not copied); the sender must not modify it.

        Args:
            ttl: seconds the message waits to be taken before it is dropped (default
                ``expire_after``; at most ``early_ttl`` for a pass not opened here).

        Returns:
            True if stored, False if dropped because ``key``'s step was discarded.
        Raises:
            ValueError: a message for the same ``(key, src)`` is already waiting.
            MailboxFull: ``src`` would hold more than its bytes or entries (nothing is stored).
        """
        with self._cond:
            now = self._expire()
            if key[0] in self._discarded:
                return False
            slot = (key, src)
            if slot in self._slots:
                raise ValueError(f"duplicate message for key {key!r} from partition {src}")
            early = key[0] not in self._open
            ttl = self._expire_after if ttl is None else max(0.0, ttl)
            if early:
                ttl = min(ttl, self._early_ttl)
            held = self._held.setdefault(src, [0, 0, 0, 0])
            want = [held[0] + array.nbytes, held[1] + 1, held[2] + array.nbytes, held[3] + 1]
            names = ("bytes", "messages", "bytes for passes not running here", "messages for passes not running here")
            for i, (cap, name) in enumerate(zip(self._caps, names)):
                if cap is not None and (i < 2 or early) and want[i] > cap:
                    raise MailboxFull(f"partition {src} would hold {want[i]} {name} in this mailbox, more than "
                                      f"its {cap}; message for key {key!r} refused")
            held[0], held[1] = want[0], want[1]
            if early:
                held[2], held[3] = want[2], want[3]
                self._early.add(slot)
            expires = now + ttl
            self._slots[slot] = (array, expires)
            self._next_expiry = min(self._next_expiry, expires)
            completed = False
            for awaited in self._awaited.get(key, ()):
                awaited.discard(src)
                completed = completed or not awaited
            if completed:
                self._cond.notify_all()
            return True

    def _drop(self, slot: tuple[tuple, int]) -> np.ndarray:
        """Remove ``slot`` and give its bytes and entry back to its src (caller holds the lock)."""
        array, _ = self._slots.pop(slot)
        held = self._held[slot[1]]
        held[0] -= array.nbytes
        held[1] -= 1
        if slot in self._early:
            self._early.discard(slot)
            held[2] -= array.nbytes
            held[3] -= 1
        if not held[1]:
            del self._held[slot[1]]
        return array

    def held(self, src: int) -> tuple[int, int]:
        """``(bytes, messages)`` waiting here from ``src``."""
        with self._cond:
            held = self._held.get(src, [0, 0])
            return held[0], held[1]

    def _expire(self) -> float:
        """Drop the messages whose time to live has passed (caller holds the lock); returns now."""
        now = self._clock()
        if now >= self._next_expiry:
            for slot in [slot for slot, (_, expires) in self._slots.items() if expires <= now]:
                self._drop(slot)
            self._next_expiry = min((expires for _, expires in self._slots.values()), default=float("inf"))
        return now

    def take(self, key: tuple, src: int, timeout: float) -> np.ndarray:
        """Remove and return the message from ``src`` under ``key``, waiting up to ``timeout`` seconds.

        Raises:
            TimeoutError: nothing arrived in time; the message names ``key`` and ``src``.
            StepAborted: the step was discarded before the message was taken.
        """
        return self.take_many(key, [src], timeout)[src]

    def take_many(self, key: tuple, srcs: Iterable[int], timeout: float) -> dict[int, np.ndarray]:
        """Remove and return one message from each of ``srcs`` under ``key``, within one deadline.

        Messages are removed only when all have arrived, so a timeout leaves the
        arrived ones in place (``discard`` cleans them up).

        Returns:
            ``{src: array}`` for every requested src.
        Raises:
            TimeoutError: the deadline passed; the message names ``key`` and every missing src.
            StepAborted: the step was discarded while waiting.
            PeerLost: a missing src's messages to this pass may have been lost (:meth:`lost`);
                the message names the src and why.
        """
        wanted = list(dict.fromkeys(srcs))
        deadline = time.monotonic() + max(0.0, timeout)
        awaited: set[int] = set()
        with self._cond:
            self._expire()
            self._awaited.setdefault(key, []).append(awaited)
            try:
                while True:
                    if key[0] in self._discarded:
                        raise StepAborted(f"step {key[0]!r} was discarded while waiting for key {key!r}")
                    missing = [s for s in wanted if (key, s) not in self._slots]
                    if not missing:
                        return {s: self._drop((key, s)) for s in wanted}
                    lost = self._lost.get(key[0])
                    if lost and any(s in lost for s in missing):
                        s = next(s for s in missing if s in lost)
                        raise PeerLost(f"messages of pass {key[0]!r} from partition {s} may have been lost "
                                       f"({lost[s]}); waiting for key {key!r}", s)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"timed out after {timeout:g}s waiting for key {key!r} from partition(s) "
                            f"{', '.join(map(str, missing))}")
                    awaited.clear()
                    awaited.update(missing)
                    self._cond.wait(remaining)
            finally:
                waiting = self._awaited[key]
                waiting.remove(awaited)
                if not waiting:
                    del self._awaited[key]

    def discard(self, pass_id: Hashable) -> int:
        """Drop every waiting message of ``pass_id``, drop its late arrivals, and wake its takers.

        Returns:
            how many waiting messages were dropped.
        """
        with self._cond:
            stale = [slot for slot in self._slots if slot[0][0] == pass_id]
            for slot in stale:
                self._drop(slot)
            self._open.pop(pass_id, None)
            self._lost.pop(pass_id, None)
            self._discarded[pass_id] = None
            self._discarded.move_to_end(pass_id)
            while len(self._discarded) > self._remember:
                self._discarded.popitem(last=False)
            self._cond.notify_all()
            return len(stale)

    def pending(self) -> list[tuple[tuple, int]]:
        """The ``(key, src)`` pairs waiting to be taken (for diagnostics and tests)."""
        with self._cond:
            return list(self._slots)
