"""A private asyncio event loop in a daemon thread, for synchronous callers.

The fake IdP and the chaos proxy are asyncio servers; synchronous tests,
benchmarks and demos run them on a loop of their own in a background thread
and hand it coroutines to start and stop them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class LoopThread:
    """An event loop running in a daemon thread until `close`.

    The loop shuts down the way `asyncio.run` does: tasks still pending are
    cancelled, async generators closed and the default executor shut down.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        # asyncio.Event binds to a loop when first awaited, so it can be made
        # here and waited on in the thread.
        self._closing = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(
        self, coroutine: Coroutine[Any, Any, _T], *, timeout: float | None = None
    ) -> _T:
        """Run *coroutine* on the loop and return its result here."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=timeout)

    def close(self, *, timeout: float | None = None) -> None:
        """Shut the loop down and wait up to *timeout* seconds for the thread."""
        self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with asyncio.Runner(loop_factory=lambda: self._loop) as runner:
            runner.run(self._closing.wait())
