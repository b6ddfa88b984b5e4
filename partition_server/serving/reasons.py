"""Machine-readable reasons for a failed ``mpnn.v1.Partition`` call, sent as gRPC trailing metadata.

A status code alone can mean several things (ABORTED is a failed exchange *or* a weights version
this partition no longer keeps), and the human message may change wording at any time. So a
partition server that fails a call for a reason a client acts on attaches one trailing metadata
entry, ``mpnn-error: <reason>``, next to the status code and the unchanged human message; the
client reads the entry, never the text.

Reasons:

``weights-changed`` (with ABORTED)
    An inference ``RunPass`` asked for a weights version (optimizer step) this partition no
    longer keeps, or one ahead of it with no training step running (the engine's
    ``WeightsChanged``). A new pass with the entry point's current version may succeed.

``training-session`` (with PERMISSION_DENIED or FAILED_PRECONDITION)
    A training ``RunPass`` without the current training session's token, or an ``OpenTraining``
    while another session holds the partition (see ``training``).

``peer-lost`` (with ABORTED)
    A ``RunPass`` waited for a message from a peer whose stream to this partition broke (or was
    refused a message) while the pass ran: the message may be lost. The peer named is usually
    the root cause (it died or restarted); the driver prefers another partition's own failure
    for its error, and the pass may be retried.

``peer-streams`` (with RESOURCE_EXHAUSTED)
    An ``ExchangeStream`` beyond the streams this partition holds at once
    (``limits.ServerLimits.max_peer_streams``), refused before any message is read. The sender
    sends that peer unary ``Exchange`` calls for a while (``peers``).
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from partition_server.api.errors import ERROR_KEY, PEER_LOST, PEER_STREAMS, TRAINING_SESSION, WEIGHTS_CHANGED

__all__ = ["ERROR_KEY", "PEER_LOST", "PEER_STREAMS", "TRAINING_SESSION", "WEIGHTS_CHANGED", "abort", "reason_of"]

# ERROR_KEY (the trailing metadata key; gRPC keys are lower-case ASCII) and the reasons are
# defined in the api, so that clients read them without importing the serving side.


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, *,
          reason: str | None = None) -> NoReturn:
    """End the call with ``code`` and ``message``, and ``mpnn-error: reason`` when given.

    Raises:
        Exception: whatever ``context.abort`` raises to end the handler (always).
    """
    if reason is not None:
        context.set_trailing_metadata(((ERROR_KEY, reason),))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort returned")  # pragma: no cover


def reason_of(exc: BaseException | None) -> str | None:
    """The ``mpnn-error`` reason of the failed call behind ``exc``, or None.

    Looks at ``exc`` and its ``__cause__`` chain for a ``grpc.Call`` (a failed call's
    ``RpcError``; ``DriverError`` is raised ``from`` it) and reads its trailing metadata.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, grpc.Call):
            try:
                metadata = exc.trailing_metadata() or ()
            except Exception:  # noqa: BLE001 - a call object without metadata has no reason
                metadata = ()
            for key, value in metadata:
                if key == ERROR_KEY:
                    return value.decode() if isinstance(value, bytes) else value
        exc = exc.__cause__
    return None
