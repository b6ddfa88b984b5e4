"""The driver's fan-out (``Driver._all``) when a partition's channel never answers at all."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from partition_server.api.distributor import Distribution, distribute
from partition_server.api.lookup import LookupTable
from partition_server.client import driver as driver_module
from partition_server.client.driver import Driver, DriverError

UNITS = [4, 3]


class SilentCall:
    """A call future that never completes (its channel's gRPC thread is gone)."""

    def __init__(self):
        self.cancelled = False

    def add_done_callback(self, _callback):
        pass

    def done(self):
        return False

    def cancel(self):
        self.cancelled = True
        return True


class SilentChannel:
    def __init__(self):
        self.calls: list[SilentCall] = []

    def unary_unary(self, _method, *_args, **_kwargs):
        channel = self

        class MultiCallable:
            def future(self, _request, timeout=None, **_kw):
                call = SilentCall()
                channel.calls.append(call)
                return call

        return MultiCallable()

    stream_unary = unary_stream = stream_stream = unary_unary


@pytest.fixture
def silent(monkeypatch):
    monkeypatch.setattr(driver_module, "ANSWER_GRACE", 0.1)
    channel = SilentChannel()
    table = LookupTable.build("net", UNITS, distribute(UNITS, 2, Distribution()), ["a:1", "b:2"])
    return Driver(table, timeout=0.2, channels=lambda _address: channel), channel


@pytest.mark.parametrize("call", [lambda d: d.status(), lambda d: d.step(np.zeros((1, 5), np.float32))],
                         ids=["status", "pass"])
def test_a_channel_that_never_answers_fails_the_call_instead_of_blocking(silent, call):
    driver, channel = silent
    began = time.monotonic()
    with pytest.raises(DriverError) as err:
        call(driver)
    assert time.monotonic() - began < 5
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "no answer" in str(err.value)
    assert "partition(s) [0, 1]" in str(err.value)
    assert len(channel.calls) == 2 and all(c.cancelled for c in channel.calls)
