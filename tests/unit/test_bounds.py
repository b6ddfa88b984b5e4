"""Bounds a caller cannot lift: mailbox caps, training sessions, ServerLimits, and the REST codec's
parsing and decompression (the attacks themselves, against real servers, are in tests/security)."""

from __future__ import annotations

import gzip
import json
import zlib

import grpc
import numpy as np
import pytest

from partition_server.api.manifest import LayerSpec, ModelSpec
from partition_server.engine import Mailbox, MailboxFull, OptimizerConfig
from partition_server.serving import rest_codec as rc
from partition_server.serving.limits import ByteBudget, ServerLimits
from partition_server.serving.protocol import InferenceError, ModelProtocol
from partition_server.serving.training import SessionRefused, TrainingSessions

MODEL = ModelProtocol("m", ModelSpec(4, (LayerSpec(3, "softmax"),)))
SGD = OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9)
TOKEN = "a" * 32


def arr(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes // 4, np.float32)


# ---------------------------------------------------------------- mailbox


def test_mailbox_caps_messages_of_passes_not_running_here_per_peer():
    box = Mailbox(early_bytes=100, early_entries=3, peer_bytes=1000, peer_entries=10)
    box.put(("p1", "fwd", 0), 0, arr(40))
    box.put(("p2", "fwd", 0), 0, arr(40))
    with pytest.raises(MailboxFull, match="partition 0 would hold 120 bytes for passes not running here"):
        box.put(("p3", "fwd", 0), 0, arr(40))
    box.put(("p3", "fwd", 0), 1, arr(40))  # another peer has its own allowance
    assert box.held(0) == (80, 2) and len(box.pending()) == 3
    # Once the pass runs here its messages count against the larger running-pass caps.
    box.open("p1")
    box.put(("p1", "fwd", 1), 0, arr(40))
    box.put(("p4", "fwd", 0), 0, arr(40))
    assert box.held(0) == (160, 4)


def test_mailbox_caps_bytes_and_entries_per_peer_for_running_passes_and_gives_them_back():
    box = Mailbox(peer_bytes=100, peer_entries=2)
    box.open("p")
    box.put(("p", "fwd", 0), 0, arr(60))
    with pytest.raises(MailboxFull, match="would hold 120 bytes"):
        box.put(("p", "fwd", 1), 0, arr(60))
    box.put(("p", "fwd", 1), 0, arr(20))
    with pytest.raises(MailboxFull, match="would hold 3 messages"):
        box.put(("p", "fwd", 2), 0, arr(4))
    box.take(("p", "fwd", 0), 0, timeout=1)
    box.put(("p", "fwd", 2), 0, arr(4))
    box.discard("p")
    assert box.held(0) == (0, 0) and box.pending() == []


def test_mailbox_keeps_a_message_of_a_pass_not_running_here_only_early_ttl():
    now = [0.0]
    box = Mailbox(clock=lambda: now[0], early_ttl=30.0)
    box.put(("ghost", "fwd", 0), 0, arr(8), ttl=3600)  # the caller's long deadline does not count
    now[0] = 31.0
    box.put(("other", "fwd", 0), 1, arr(8))
    assert [k[0] for k, _ in box.pending()] == ["other"] and box.held(0) == (0, 0)


# ---------------------------------------------------------------- training sessions


def test_a_training_pass_needs_the_current_session_and_gets_its_optimizer():
    sessions = TrainingSessions(lease=30.0)
    with pytest.raises(SessionRefused) as info:
        sessions.begin("")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "no training session is open" in info.value.message
    sessions.open(TOKEN, SGD)
    assert sessions.begin(TOKEN) == SGD
    sessions.end(TOKEN)
    with pytest.raises(SessionRefused, match="another training session holds it"):
        sessions.begin("b" * 32)


def test_a_session_in_use_cannot_be_replaced_until_its_lease_lapses():
    now = [0.0]
    sessions = TrainingSessions(lease=30.0, clock=lambda: now[0])
    sessions.open(TOKEN, SGD)
    sessions.begin(TOKEN)
    now[0] = 100.0
    with pytest.raises(SessionRefused) as info:  # a pass is running: never replaced
        sessions.open("b" * 32, OptimizerConfig("sgd", learning_rate=1e6))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "1 training pass(es) running" in info.value.message
    sessions.end(TOKEN)
    now[0] = 129.0
    with pytest.raises(SessionRefused, match="last used 29.0 s ago"):
        sessions.open("b" * 32, SGD)
    now[0] = 130.0
    sessions.open("b" * 32, SGD)
    with pytest.raises(SessionRefused):
        sessions.begin(TOKEN)


def test_session_optimizer_is_fixed_and_tokens_are_checked():
    sessions = TrainingSessions(lease=30.0)
    with pytest.raises(SessionRefused, match="a token of 16..128 characters is required, got 3"):
        sessions.open("abc", SGD)
    sessions.open(TOKEN, SGD)
    sessions.open(TOKEN, SGD)  # idempotent
    with pytest.raises(SessionRefused, match="the optimizer is fixed for the session"):
        sessions.open(TOKEN, OptimizerConfig("adam", learning_rate=0.01))
    assert not sessions.close("b" * 32)
    assert sessions.close(TOKEN)
    sessions.open("b" * 32, OptimizerConfig("adam", learning_rate=0.01))


# ---------------------------------------------------------------- limits


def test_server_limits_from_env_name_the_variable_and_value():
    assert ServerLimits.from_env({}) == ServerLimits()
    assert ServerLimits.from_env({"MPNN_MAX_PASS_SECONDS": "5"}).max_pass_seconds == 5.0
    with pytest.raises(ValueError, match="MPNN_MAILBOX_PEER_ENTRIES: must be an integer, got '1.5'"):
        ServerLimits.from_env({"MPNN_MAILBOX_PEER_ENTRIES": "1.5"})
    with pytest.raises(ValueError, match="max_pass_seconds: must be a finite number >= 0, got -1"):
        ServerLimits(max_pass_seconds=-1)
    with pytest.raises(ValueError, match="max_inflight_request_bytes"):
        ServerLimits(max_request_bytes=10, max_inflight_request_bytes=5)


def test_byte_budget_never_exceeds_its_capacity():
    budget = ByteBudget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    budget.give(100)
    assert budget.held == 0 and budget.take(100)


# ---------------------------------------------------------------- REST codec


def body(data, shape=(1, 4)) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(shape),
                                   "data": data}]}).encode()


def refused(raw: bytes) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        rc.parse_request(MODEL, raw, header_length=None)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value


@pytest.mark.parametrize("data", [[1, 2.5, -3e-2, 4E+1], [[1, 2.5, -3e-2, 4E+1]]], ids=["flat", "nested"])
def test_numeric_data_is_parsed_without_python_floats(data):
    x = rc.parse_request(MODEL, body(data), header_length=None).x
    np.testing.assert_array_equal(x, np.array([[1, 2.5, -0.03, 40]], np.float32))


def test_data_in_other_places_and_strings_that_look_like_data_are_left_alone():
    raw = json.dumps({"id": '"data": [1, 2]', "parameters": {"data": [1]},
                      "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                                  "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}).encode()
    req = rc.parse_request(MODEL, raw, header_length=None)
    assert req.fields["id"] == '"data": [1, 2]'
    assert req.x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_element_count_is_checked_before_the_numbers_are_parsed(monkeypatch):
    monkeypatch.setattr(rc._Numbers, "parse", lambda *a: pytest.fail("parsed before the count was checked"))
    assert "8 elements do not fit shape [1, 4]" in refused(body([0.5] * 8)).message


@pytest.mark.parametrize("raw, message", [
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [NaN, 1, 2, 3]}]}', "NaN"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, Infinity, 2, 3]}]}',
     "Infinity"),
    (body([1e39, 1, 2, 3]), "beyond FP32"),
    (body([[1, 2], [3]], shape=(1, 3)), "rectangular"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b"{bad", "not valid JSON"),
], ids=["nan", "infinity", "overflow", "ragged", "deep", "deep-inside", "malformed"])
def test_bad_json_is_invalid_argument(raw, message):
    assert message in refused(raw).message


def test_json_structure_outside_the_numbers_is_bounded():
    raw = json.dumps({"id": "x" * (rc.MAX_JSON_STRUCTURE_BYTES + 1), "inputs": []}).encode()
    with pytest.raises(rc.HttpError) as info:
        rc.parse_request(MODEL, raw, header_length=None)
    assert info.value.status == 413


def test_non_finite_outputs_are_valid_json():
    req = rc.parse_request(MODEL, body([1, 2, 3, 4]), header_length=None)
    blob, content_type, _ = rc.encode_reply("m", req, np.array([[np.nan, 0.5, np.inf]], np.float32))
    reply = json.loads(blob, parse_constant=lambda c: pytest.fail(f"bare {c} in the reply"))
    assert reply["outputs"][0]["data"] == [None, 0.5, None]
    assert reply["outputs"][0]["parameters"] == {"non_finite": 2}


def test_exactly_one_gzip_member_and_inflation_capped():
    raw = body([1, 2, 3, 4])
    assert rc.decode_body(gzip.compress(raw), encoding="gzip", limit=1 << 20) == raw
    assert rc.decode_body(gzip.compress(raw) + b"\0" * 8, encoding="gzip", limit=1 << 20) == raw
    assert rc.decode_body(zlib.compress(raw), encoding="deflate", limit=1 << 20) == raw
    with pytest.raises(InferenceError, match="exactly one compressed member"):
        rc.decode_body(gzip.compress(raw) + gzip.compress(b" "), encoding="gzip", limit=1 << 20)
    taken: list[int] = []
    with pytest.raises(rc.HttpError) as info:
        rc.decode_body(gzip.compress(b" " * (8 << 20)), encoding="gzip", limit=1 << 20, reserve=taken.append)
    assert info.value.status == 413 and sum(taken) <= 1 << 20
    with pytest.raises(InferenceError, match="cannot be decompressed"):
        rc.decode_body(gzip.compress(raw)[:-9], encoding="gzip", limit=1 << 20)
