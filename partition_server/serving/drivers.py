"""What an inference entry point keeps between passes: a driver per lookup version, and pass slots.

:class:`DriverCache` holds the :class:`~partition_server.client.driver.Driver` (one channel per
partition, the server's peer channels when given) of the lookup table this server serves, built once per table version so requests
follow lookup reloads; the previous version's driver stays open for passes that started under
it. :class:`PassSlots` bounds the passes an entry point runs at once, with a limit given at each
acquire because it follows the table's partition count.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import grpc

from partition_server.api.lookup import LookupTable
from partition_server.api.peer_auth import PeerCredentials
from partition_server.client.driver import Driver

__all__ = ["DriverCache", "PassSlots"]


class DriverCache:
    """Drivers by lookup version; at most the current and the previous one stay open.

    Args:
        timeout: default deadline of each driver call, seconds.
        credentials: sign (and encrypt) the calls to the partitions' peer ports.
        channels: the channels to use (``Driver``'s ``channels``), else each driver opens its own.
    """

    def __init__(self, timeout: float, credentials: PeerCredentials | None = None,
                 channels: Callable[[str], grpc.Channel] | None = None):
        self.timeout = timeout
        self.credentials = credentials
        self.channels = channels
        self._drivers: dict[str, Driver] = {}
        self._lock = threading.Lock()

    def get(self, table: LookupTable) -> Driver:
        """The driver for ``table``'s version; drivers of versions before the previous one are closed."""
        with self._lock:
            driver = self._drivers.get(table.version)
            if driver is None:
                # The previous table's driver stays open for passes that started under it.
                for version in list(self._drivers)[:-1]:
                    self._drivers.pop(version).close()
                driver = Driver(table, timeout=self.timeout, credentials=self.credentials, channels=self.channels)
                self._drivers[table.version] = driver
            return driver

    def close(self) -> None:
        """Close every driver (their channels); a later :meth:`get` opens a new one."""
        with self._lock:
            for driver in self._drivers.values():
                driver.close()
            self._drivers.clear()


class PassSlots:
    """A counting semaphore whose limit is given at each acquire (it follows the lookup table)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0

    def acquire(self, limit: int, timeout: float) -> bool:
        """Take a slot while fewer than ``limit`` are taken, waiting up to ``timeout`` seconds.

        Returns:
            True with a slot (give it back with :meth:`release`), False when none came in time.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy >= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._busy += 1
            return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        with self._cond:
            self._busy -= 1
            self._cond.notify()
