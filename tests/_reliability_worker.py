"""A worker process for the reliability tests: one TokenCache, many callers.

``test_reliability_processes.py`` starts it as ``python _reliability_worker.py``
with its settings as JSON in the ``RELIABILITY_WORKER`` environment variable,
which keeps client secrets out of the process list.  The worker builds its
cache, prints a ``ready`` event, starts its callers when a line arrives on
stdin and stops them when stdin closes, then prints a ``done`` event.

Every event is one JSON line on stdout, flushed at once, so that a worker
killed with SIGKILL has reported everything up to its death:

- ``token``: a caller received an access token this process had not seen
  before, with its ``jti`` and ``exp`` claims;
- ``failure``: a call raised, with the error class;
- ``expired``: a call returned a token whose ``exp`` claim had passed;
- ``log``: tokenfleet logged a warning (``redis.unavailable`` ...);
- ``done``: the number of calls, the slowest call made by a task that
  already held a token, and the cache's counters.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import orjson

from tokenfleet import ClientCredentials, Token, TokenCache

SETTINGS_VARIABLE = "RELIABILITY_WORKER"


def emit(event: str, **fields: Any) -> None:
    """Print one event as a JSON line and flush it."""
    line = orjson.dumps({"event": event, "at": time.time(), **fields})
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


def claims(token: Token) -> dict[str, Any]:
    """Return the claims of a JWT-shaped access token, unverified."""
    body = token.access_token.split(".")[1]
    decoded: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    )
    return decoded


class WarningRelay(logging.Handler):
    """Forwards tokenfleet's warnings as ``log`` events."""

    def emit(self, record: logging.LogRecord) -> None:
        """Print the record's event name and error field."""
        emit(
            "log",
            name=record.getMessage(),
            logger=record.name,
            error=getattr(record, "error", None),
        )


class Tally:
    """What the callers of this process saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.slowest_warm = 0.0
        self.seen: set[str] = set()


async def call_repeatedly(
    cache: TokenCache,
    credentials: ClientCredentials,
    settings: dict[str, Any],
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    """Ask for a token every interval until *stop* is set; report what came."""
    warm = False
    while not stop.is_set():
        began = time.monotonic()
        try:
            token = await cache.get_token(
                credentials,
                token_url=settings["token_url"],
                scopes=settings["scopes"],
            )
        except Exception as exc:
            emit("failure", client=credentials.client_id, error=type(exc).__name__)
            token = None
        took = time.monotonic() - began
        returned_at = time.time()

        tally.calls += 1
        if warm:
            tally.slowest_warm = max(tally.slowest_warm, took)
        if token is not None:
            warm = True
            token_claims = claims(token)
            if returned_at >= token_claims["exp"]:
                emit("expired", client=credentials.client_id, exp=token_claims["exp"])
            if token.access_token not in tally.seen:
                tally.seen.add(token.access_token)
                emit(
                    "token",
                    client=credentials.client_id,
                    jti=token_claims["jti"],
                    exp=token_claims["exp"],
                )

        await asyncio.sleep(settings["interval"])


async def work(settings: dict[str, Any]) -> None:
    """Run callers on one cache from the start line until stdin closes."""
    relay = WarningRelay(logging.WARNING)
    tokenfleet_logger = logging.getLogger("tokenfleet")
    tokenfleet_logger.addHandler(relay)
    tokenfleet_logger.setLevel(logging.WARNING)

    clients = [ClientCredentials(cid, secret) for cid, secret in settings["clients"]]
    tally = Tally()
    stop = asyncio.Event()

    async with TokenCache(settings["redis_url"], **settings["cache"]) as cache:
        emit("ready", pid=os.getpid())
        if not await asyncio.to_thread(sys.stdin.readline):
            return

        callers = [
            asyncio.create_task(call_repeatedly(cache, client, settings, stop, tally))
            for client in clients
            for _ in range(settings["tasks"])
        ]
        await asyncio.to_thread(sys.stdin.readline)
        stop.set()
        await asyncio.gather(*callers)
        stats = asdict(cache.stats())

    emit("done", calls=tally.calls, slowest_warm=tally.slowest_warm, stats=stats)


def main() -> None:
    """Read the settings from the environment and run."""
    settings: dict[str, Any] = orjson.loads(os.environ[SETTINGS_VARIABLE])
    asyncio.run(work(settings))


if __name__ == "__main__":
    main()
