"""Training sessions: the training lock and the optimizer configuration belong to a trainer's run.

A driver that trains opens a session on every partition (``OpenTraining``) with a random token and
the run's optimizer configuration, and sends the token with every training ``RunPass``. The
partition runs a training pass only for the current session, with that session's optimizer, so a
stray or hostile ``RunPass(train=true)`` (no token, or another one) is refused before it touches
the mailbox, the engine's training lock or the weights, and cannot change the optimizer: the
configuration is fixed for the whole run.

One session at a time. A new one replaces the current one only when the current one is idle: no
training pass running, and none for ``lease`` seconds (a trainer that died leaves a session that
lapses); or when its owner closes it (``CloseTraining`` with its token). The session lives in the
server, not the engine, so it survives lookup reloads; a restarted server has none.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from partition_server.engine import OptimizerConfig

__all__ = ["TOKEN_LENGTHS", "SessionRefused", "TrainingSessions"]

TOKEN_LENGTHS = range(16, 129)  # characters of a session token


class SessionRefused(Exception):
    """The call does not hold (or cannot take) the training session.

    Attributes:
        code: the gRPC status to answer with (PERMISSION_DENIED, FAILED_PRECONDITION or INVALID_ARGUMENT).
        message: what to say, naming the token's first characters and the session's age.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Session:
    token: str
    optimizer: OptimizerConfig
    last_used: float
    running: int = 0


class TrainingSessions:
    """The current training session of one partition server. Thread-safe.

    Args:
        lease: seconds without a training pass after which another session may replace the current one.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, lease: float, clock: Callable[[], float] = time.monotonic):
        self.lease = lease
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _Session | None = None

    def open(self, token: str, optimizer: OptimizerConfig) -> None:
        """Make ``token`` the current session, with ``optimizer`` for all its training passes.

        Re-opening the current session with the same optimizer is a no-op.

        Raises:
            SessionRefused: INVALID_ARGUMENT for a token of the wrong length or the current one
                with another optimizer; FAILED_PRECONDITION while another session is in use.
        """
        if len(token) not in TOKEN_LENGTHS:
            raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"session: a token of {TOKEN_LENGTHS.start}..{TOKEN_LENGTHS.stop - 1} characters "
                                 f"is required, got {len(token)}")
        with self._lock:
            now = self._clock()
            current = self._current
            if current is not None and current.token == token:
                if current.optimizer != optimizer:
                    raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                         f"session {token[:8]}…: the optimizer is fixed for the session "
                                         f"({current.optimizer}); open a new session to change it")
                return
            if current is not None:
                idle = now - current.last_used
                if current.running or idle < self.lease:
                    raise SessionRefused(grpc.StatusCode.FAILED_PRECONDITION,
                                         f"training session {current.token[:8]}… holds this partition "
                                         f"({current.running} training pass(es) running, last used {idle:.1f} s ago); "
                                         f"it can be replaced after {self.lease:g} s without a training pass")
            self._current = _Session(token, optimizer, now)

    def close(self, token: str) -> bool:
        """End the session ``token`` if it is the current one and no pass of it runs; returns whether it ended."""
        with self._lock:
            current = self._current
            if current is None or current.token != token or current.running:
                return False
            self._current = None
            return True

    def begin(self, token: str) -> OptimizerConfig:
        """Start a training pass of session ``token``; returns the session's optimizer. Pair with :meth:`end`.

        Raises:
            SessionRefused: PERMISSION_DENIED when ``token`` is not the current session.
        """
        with self._lock:
            current = self._current
            if current is None or not token or current.token != token:
                held = "no training session is open" if current is None else "another training session holds it"
                raise SessionRefused(grpc.StatusCode.PERMISSION_DENIED,
                                     f"a training RunPass needs the current training session's token "
                                     f"(got {'none' if not token else repr(token[:8] + '…')}); {held}")
            current.running += 1
            current.last_used = self._clock()
            return current.optimizer

    def end(self, token: str) -> None:
        """End a training pass that :meth:`begin` started."""
        with self._lock:
            current = self._current
            if current is not None and current.token == token:
                current.running = max(0, current.running - 1)
                current.last_used = self._clock()
