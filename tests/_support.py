"""What the cache tests share: a clock moved by hand, polling and token claims.

A plain module rather than conftest fixtures, so the test files that use it
say so with an import, and the names are checked by mypy.
"""

from __future__ import annotations

import base64
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import anyio.lowlevel
import orjson

from tokenfleet import ClientCredentials

CLIENT_ID = "0oa-tenant-primary"
CLIENT_SECRET = "s3cr3t-Primary-Secret-Value-7fd1c2"
SCOPES = ("submissions.read", "submissions.write")
CREDENTIALS = ClientCredentials(CLIENT_ID, CLIENT_SECRET)

# Attributes every LogRecord carries; what is left are the `extra` fields.
_STANDARD_RECORD_FIELDS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "taskName"}


class FakeClock:
    """A `tokenfleet._clock.Clock` that moves only when told to.

    `sleep` advances the clock by the time asked and returns after one trip
    through the event loop, so retry backoffs cost no real time.
    """

    def __init__(self, start: float = 1_000.0, wall: float | None = None) -> None:
        self._monotonic = start
        self._wall_offset = (time.time() if wall is None else wall) - start

    def time(self) -> float:
        """Return the fake Unix time, moving with the monotonic clock."""
        return self._monotonic + self._wall_offset

    def monotonic(self) -> float:
        """Return the fake monotonic time."""
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        """Advance by *seconds* at once, then let other tasks run."""
        self.advance(max(0.0, seconds))
        await anyio.lowlevel.checkpoint()

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by *seconds*."""
        self._monotonic += seconds


def rounded_up(clock: Callable[[], float]) -> Callable[[], float]:
    """Return *clock* rounded up to the whole second, for `FakeIdP(clock=...)`.

    The IdP truncates a token's ``exp`` claim to the second, and the cache
    believes an ``exp`` that comes before receipt + ``expires_in``.  On a
    clock that rounds up, ``exp`` never comes earlier, so every lifetime is
    exactly the ``expires_in`` the test chose.
    """
    return lambda: float(math.ceil(clock()))


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 5.0,
    what: str = "condition",
) -> None:
    """Poll *condition* every millisecond until it holds; fail after *timeout*.

    For states that only a background task or another server can bring
    about, where no event is there to wait on.  *condition* may be async.
    """
    with anyio.move_on_after(timeout):
        while True:
            holds = condition()
            if inspect.isawaitable(holds):
                holds = await holds
            if holds:
                return
            await anyio.sleep(0.001)
    msg = f"The {what} did not hold within {timeout} s."
    raise AssertionError(msg)


def claims(access_token: str) -> dict[str, Any]:
    """Return the claims of a JWT-shaped token minted by `FakeIdP`."""
    body = access_token.split(".")[1]
    decoded: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    )
    return decoded


def leaked_fields(
    records: Iterable[logging.LogRecord], secrets: Iterable[str]
) -> list[str]:
    """Name every log record field whose text contains one of *secrets*.

    The message, the formatted exception and every `extra` field are
    searched, the latter through their repr so containers count too.
    """
    secrets = [secret for secret in secrets if secret]
    leaks: list[str] = []
    for record in records:
        texts = {"message": record.getMessage()}
        if record.exc_info is not None:
            texts["exc_info"] = logging.Formatter().formatException(record.exc_info)
        for name, value in record.__dict__.items():
            if name not in _STANDARD_RECORD_FIELDS:
                texts[name] = repr(value)
        leaks.extend(
            f"{record.name}:{record.msg}:{name}"
            for name, text in texts.items()
            if any(secret in text for secret in secrets)
        )

    return leaks
