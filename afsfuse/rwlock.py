"""A trio read-write lock with writer preference.

A vnode's status and promise are replaced together under the write lock and
read under the read lock (DESIGN.md P6).  Writers are preferred so a steady
stream of getattr calls cannot starve a validation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

log = logging.getLogger(__name__)


class RWLock:
    """Many readers or one writer; not reentrant (a writer must not re-take it)."""

    __slots__ = ("_readers", "_rlot", "_waiting_writers", "_wlot", "_writer")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        # Parking lots only once someone waits: a vnode cache holds one lock
        # per vnode (100,000s), and most are never contended.
        self._rlot: trio.lowlevel.ParkingLot | None = None
        self._wlot: trio.lowlevel.ParkingLot | None = None

    @property
    def readers(self) -> int:
        return self._readers

    def free_for_read(self) -> bool:
        """Whether a reader would get the lock at once (no writer holds it or
        waits for it): a reader that needs no await while reading may then
        read without taking it, which is the same as taking and releasing it
        with nothing run in between."""
        return not self._writer and not self._waiting_writers

    async def acquire_read(self) -> None:
        await trio.lowlevel.checkpoint()
        while self._writer or self._waiting_writers:
            if self._rlot is None:
                self._rlot = trio.lowlevel.ParkingLot()
            await self._rlot.park()
        self._readers += 1

    def release_read(self) -> None:
        self._readers -= 1
        self._wake()

    async def acquire_write(self) -> None:
        await trio.lowlevel.checkpoint()
        self._waiting_writers += 1
        acquired = False
        try:
            while self._writer or self._readers:
                if self._wlot is None:
                    self._wlot = trio.lowlevel.ParkingLot()
                await self._wlot.park()
            self._writer = acquired = True
        finally:
            self._waiting_writers -= 1
            if not acquired:  # cancelled while waiting: let others proceed
                self._wake()

    def try_acquire_write(self) -> bool:
        """Take the write lock without waiting; False if anyone holds it."""
        if self._writer or self._readers:
            return False
        self._writer = True
        return True

    def release_write(self) -> None:
        self._writer = False
        self._wake()

    def _wake(self) -> None:
        if self._writer:
            return
        if self._waiting_writers:
            if not self._readers and self._wlot is not None:
                self._wlot.unpark()
        elif self._rlot is not None:
            self._rlot.unpark_all()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        await self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()
