"""Attacks on the public ports (REST, and the inference gRPC API): issue 10's "Before" list, REST items.

Bounds asserted (defaults: 64 MiB bodies, 256 MiB of request bytes in flight, 16 REST worker threads):
the attacked server's peak RSS grows by less than :data:`RSS_BOUND`, errors are 4xx JSON with no
stack trace, and a legitimate inference answers within ``LEGIT_SECONDS`` during each attack.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib

import grpc
import numpy as np
import pytest

from partition_server.api.protos import grpc_predict_v2_pb2 as ipb
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as ipb_grpc
from tests.security.conftest import LEGIT_SECONDS, MiB, infer, peak_rss, post, reset_peak, threads, under_attack

RSS_BOUND = 200 * MiB   # growth of the attacked server's peak resident memory


def gzip_bomb(inflated: int) -> bytes:
    """One gzip member of ``inflated`` zero bytes (1 GiB packs into about 1 MB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(16 * MiB)
    return b"".join([packer.compress(chunk) for _ in range(inflated // len(chunk))] + [packer.flush()])


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb(1 << 30)


def assert_bounded(target, before: int, what: str) -> int:
    grown = peak_rss(target.pid(0)) - before
    assert grown < RSS_BOUND, f"{what}: server 0's peak RSS grew by {grown / MiB:.0f} MiB"
    return grown


def test_gzip_bomb_is_413_inflating_no_more_than_the_limit(target, bomb):
    assert len(bomb) < 1.1 * MiB
    before = reset_peak(target.pid(0))
    replies, legit = under_attack(target, lambda: post(target.rest(), target.infer_path(), bomb,
                                                       {"Content-Encoding": "gzip"}), attackers=4)
    # Each bomb is refused: 413 once it inflates past 64 MiB, or 503 once the bombs together
    # hold the server's 128 MiB budget of request bytes in flight.
    errors = [(status, json.loads(raw)["error"]) for status, raw, _ in replies]
    assert all((s == 413 and "decompresses to more than 67108864 bytes" in e)
               or (s == 503 and "bytes of requests in flight" in e) for s, e in errors), errors
    status, raw, _ = post(target.rest(), target.infer_path(), bomb, {"Content-Encoding": "gzip"})   # alone
    assert status == 413 and "decompresses to more than 67108864 bytes" in json.loads(raw)["error"], raw
    grown = assert_bounded(target, before, "four 1 MB gzip bombs at once")
    assert max(legit) < LEGIT_SECONDS, legit
    print(f"gzip bomb x4: peak RSS +{grown / MiB:.0f} MiB, legit max {max(legit):.2f} s")


def test_many_gzip_members_are_refused_not_inflated_one_by_one(target):
    member = gzip.compress(b" ")
    body = member * (2 * MiB // len(member))   # 2 MB of members (issue: 9.3 s before)
    before = reset_peak(target.pid(0))
    replies, legit = under_attack(target, lambda: post(target.rest(), target.infer_path(), body,
                                                       {"Content-Encoding": "gzip"}))
    status, raw, _ = replies[0]
    assert status == 400 and "exactly one compressed member" in json.loads(raw)["error"], raw
    grown = assert_bounded(target, before, "a body of many gzip members")
    assert max(legit) < LEGIT_SECONDS, legit
    print(f"gzip members: peak RSS +{grown / MiB:.0f} MiB, legit max {max(legit):.2f} s")


def test_json_data_is_not_expanded_into_python_floats(target):
    # 48 MiB of JSON numbers (12M of them: ~400 MiB as Python floats) under a shape that takes 64.
    numbers = b"0.5," * (12 * MiB)
    body = (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ['
            + numbers[:-1] + b"]}]}")
    before = reset_peak(target.pid(0))
    replies, legit = under_attack(target, lambda: post(target.rest(), target.infer_path(), body))
    status, raw, _ = replies[0]
    assert status == 400 and f"{12 * MiB} elements do not fit shape [1, 64]" in json.loads(raw)["error"], raw
    grown = assert_bounded(target, before, "48 MiB of JSON numbers")
    assert max(legit) < LEGIT_SECONDS, legit
    print(f"json numbers: peak RSS +{grown / MiB:.0f} MiB, legit max {max(legit):.2f} s")


def test_json_that_is_not_plain_numbers_is_bounded_before_parsing(target):
    body = (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ['
            + b"true," * (6 * MiB) + b"true]}]}")   # 30 MiB of JSON that json.loads would expand
    before = reset_peak(target.pid(0))
    replies, legit = under_attack(target, lambda: post(target.rest(), target.infer_path(), body))
    status, raw, _ = replies[0]
    assert status == 413 and "outside its numeric" in json.loads(raw)["error"], raw
    grown = assert_bounded(target, before, "30 MiB of JSON true")
    assert max(legit) < LEGIT_SECONDS, legit
    print(f"json true: peak RSS +{grown / MiB:.0f} MiB, legit max {max(legit):.2f} s")


@pytest.mark.parametrize("body, message", [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"inputs": [{"name": "input", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}", "nested too deeply"),
    (b'{"inputs": [', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
], ids=["deep", "deep-data", "cut", "not-utf8"])
def test_bad_json_is_400_without_a_stack_trace(target, body, message):
    status, raw, content_type = post(target.rest(), target.infer_path(), body)
    assert status == 400 and content_type == "application/json", (status, raw)
    assert message in json.loads(raw)["error"] and b"Traceback" not in raw and b'File "' not in raw, raw


def test_non_finite_inputs_are_400_and_non_finite_outputs_valid_json(target):
    nan = (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [NaN'
           + b", 0" * 63 + b"]}]}")
    status, raw, _ = post(target.rest(), target.infer_path(), nan)
    assert status == 400 and "NaN" in json.loads(raw)["error"], raw
    # Finite FP32 inputs so large that the layers overflow: the outputs are NaN.
    huge = np.full((1, 64), 3e38, np.float32)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": huge.ravel().tolist()}]}).encode()
    status, raw, content_type = post(target.rest(), target.infer_path(), body)
    assert status == 200 and content_type == "application/json", raw
    reply = json.loads(raw, parse_constant=lambda c: pytest.fail(f"bare {c} in the reply: {raw[:200]!r}"))
    output = reply["outputs"][0]
    assert output["parameters"]["non_finite"] == output["data"].count(None) > 0


def test_stalled_connections_hold_no_threads(target):
    pid = target.pid(0)
    before = threads(pid)
    socks = []
    try:
        for _ in range(300):   # the issue: 300 stalled connections held 315 threads
            s = socket.create_connection(target.rest(), timeout=10)
            s.sendall(b"POST " + target.infer_path().encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            socks.append(s)
        _, legit = under_attack(target, lambda: None)
        assert max(legit) < LEGIT_SECONDS, legit
        grown = threads(pid) - before
        assert grown <= 16, f"{grown} more threads with 300 stalled connections"
        print(f"300 stalled connections: +{grown} threads, legit max {max(legit):.2f} s")
    finally:
        for s in socks:
            s.close()


def test_public_grpc_message_limit_is_64_mib(target):
    with grpc.insecure_channel(f"127.0.0.1:{target.dep.ports[0]}",  # the public gRPC port
                               options=[("grpc.max_send_message_length", 128 * MiB)]) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        rows = 65 * MiB // (64 * 4) + 1
        request = ipb.ModelInferRequest(model_name=target.name)
        request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        request.raw_input_contents.append(bytes(rows * 64 * 4))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Refused by gRPC itself before the message is decoded (the public port's receive limit).
    assert "larger than max" in info.value.details() and "67108864" in info.value.details()
    infer(target)
