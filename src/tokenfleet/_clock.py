"""Time, behind a seam that tests can move by hand."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where tokenfleet reads the time and waits.

    `time` is the wall clock (Unix seconds), used only for what crosses
    process boundaries (``expires_at``, ``Retry-After`` dates).  `monotonic`
    measures every deadline inside a process.
    """

    def time(self) -> float:
        """Return the wall-clock time in Unix seconds."""
        ...

    def monotonic(self) -> float:
        """Return a clock that never goes backwards, in seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for *seconds*."""
        ...


# CLOCK_BOOTTIME keeps counting while the machine is suspended, where
# CLOCK_MONOTONIC stops: a token cached before a suspend must not look
# younger than it is afterwards.
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


# A partial of a builtin is called without a Python frame: this sits on the
# hot path of every cache hit.
monotonic: Callable[[], float] = (
    functools.partial(time.clock_gettime, _BOOTTIME)
    if _BOOTTIME is not None
    else time.monotonic
)


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """Return `time.time()`."""
        return time.time()

    def monotonic(self) -> float:
        """Return the time since boot, suspend included, where the OS has it."""
        return monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the event loop."""
        await anyio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
