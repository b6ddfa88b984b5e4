"""The sender's bounded window to one peer (``serving.peers._Outbox``) and the mailbox's lost
marks (``Mailbox.lost``): the two halves of what a broken peer stream does to a pass."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from partition_server.engine import ExchangeError, Mailbox
from partition_server.serving.peers import _Outbox


def test_the_window_bounds_messages_and_bytes_and_a_full_one_times_out():
    box = _Outbox(max_messages=2, max_bytes=100)
    assert box.put("a", 10, 1) and box.put("b", 10, 1)
    with pytest.raises(TimeoutError, match="2 messages \\(20 bytes\\) are waiting"):
        box.put("c", 10, 0.05)
    assert next(box) == "a"           # gRPC took one: room again
    assert box.put("c", 85, 1)
    with pytest.raises(TimeoutError):
        box.put("d", 10, 0.05)        # 2 messages, 95 bytes: 10 more do not fit
    assert [next(box), next(box)] == ["b", "c"]
    assert box.put("big", 1000, 1)    # larger than the window: queued alone
    with pytest.raises(TimeoutError):
        box.put("e", 1, 0.05)


def test_a_full_window_wakes_its_sender_when_grpc_takes_a_message():
    box = _Outbox(max_messages=1, max_bytes=100)
    box.put("a", 1, 1)
    threading.Timer(0.1, lambda: next(box)).start()
    assert box.put("b", 1, 10)


def test_messages_past_their_pass_timeout_are_dropped_not_sent():
    box = _Outbox(max_messages=10, max_bytes=100)
    box.put("stale", 1, 0.01)
    box.put("fresh", 1, 60)
    time.sleep(0.05)
    assert next(box) == "fresh"


def test_closing_drains_or_drops_and_ends_the_iterator():
    box = _Outbox(max_messages=10, max_bytes=100)
    box.put("a", 1, 60)
    box.close(drain=True)
    assert not box.put("b", 1, 60)
    assert list(box) == ["a", b""]   # and the closing message: the receiver sees an end, not a break
    box = _Outbox(max_messages=10, max_bytes=100)
    box.put("a", 1, 60)
    waiting = threading.Thread(target=lambda: list(box))
    box.close(drain=False)
    waiting.start()
    waiting.join(5)
    assert not waiting.is_alive()


def test_a_lost_source_fails_the_passes_waiting_for_it_at_once():
    box = Mailbox()
    box.open("run")
    box.put(("early", "fwd", 0), 2, np.ones(1, np.float32))   # a pass not running here, from 2
    box.put(("run", "fwd", 0), 1, np.ones(1, np.float32))
    errors = []

    def wait():
        try:
            box.take_many(("run", "fwd", 1), [1, 2], 60)
        except ExchangeError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    assert box.lost(2, "its stream broke") == ["run", "early"]
    waiter.join(5)
    assert not waiter.is_alive()
    assert "pass 'run' from partition 2 may have been lost (its stream broke)" in str(errors[0])
    # What did arrive is still taken; other sources are not affected.
    np.testing.assert_array_equal(box.take(("run", "fwd", 0), 1, 1), np.ones(1, np.float32))
    with pytest.raises(TimeoutError):
        box.take(("run", "fwd", 2), 1, 0.05)
    with pytest.raises(ExchangeError):
        box.take(("early", "fwd", 1), 2, 60)
    # A pass opened after the loss, and one discarded, carry no mark.
    box.open("later")
    with pytest.raises(TimeoutError):
        box.take(("later", "fwd", 0), 2, 0.05)
    box.discard("run")
    box.open("run2")
    with pytest.raises(TimeoutError):
        box.take(("run2", "fwd", 0), 2, 0.05)


@pytest.mark.parametrize("shape, layer, source, version", [
    ((4, 3), 0, 0, "sha256:abc"), ((128, 300), 5, 3, "v"), ((0, 7), 2, 1, ""), ((5,), 0, 2, "x" * 200),
    ((3, 2), -1, 1, "v")])
def test_the_streamed_message_is_byte_for_byte_the_protobuf_encoding(shape, layer, source, version):
    from partition_server.api.protos import mpnn_pb2 as pb
    from partition_server.api.wire import encode_exchange, to_tensor

    arr = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = pb.ExchangeRequest(lookup_version=version, pass_id="pass", phase="fwd.1", layer=layer, source=source,
                              tensor=to_tensor(arr))
    got, payload = encode_exchange(lookup_version=version, pass_id="pass", phase="fwd.1", layer=layer,
                                   source=source, array=arr)
    assert payload == arr.nbytes
    assert got == want.SerializeToString()
    assert pb.ExchangeRequest.FromString(got) == want
    # A strided view is sent as its contiguous copy.
    view = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    got, _ = encode_exchange(lookup_version="v", pass_id="p", phase="bwd", layer=1, source=0, array=view)
    assert pb.ExchangeRequest.FromString(got).tensor == to_tensor(view)
