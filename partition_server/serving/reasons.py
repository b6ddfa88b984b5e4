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
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from partition_server.api.errors import ERROR_KEY, TRAINING_SESSION, WEIGHTS_CHANGED

__all__ = ["ERROR_KEY", "TRAINING_SESSION", "WEIGHTS_CHANGED", "abort", "reason_of"]

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
