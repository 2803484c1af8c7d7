"""One worker process of a benchmark fleet (started by `_fleet_run.run_fleet`).

Run as ``python benchmarks/_fleet_worker.py '<assignment JSON>'``.  The
worker sets up its token source, prints ``ready``, waits for ``go <t0>`` on
stdin (``t0`` on CLOCK_MONOTONIC, shared by every process of the machine),
runs its tasks from ``t0`` for ``duration`` seconds and prints one JSON
report line.  End of stdin before ``go`` makes it leave at once.

Token sources (``mode``):

- ``tokenfleet``: one `TokenCache` on the shared Redis;
- ``per-process``: one `TokenCache` with no Redis, so each process holds its
  own token per tenant (what per-process clients give);
- ``authlib``: one Authlib ``AsyncOAuth2Client`` per tenant, as its
  documentation suggests for client credentials.

Task ``j`` of worker ``w`` walks through every tenant in turn, starting at
``j * tenants // tasks + w``: the tasks start spread evenly over the tenants,
so every process asks for every tenant once per ``tenants / tasks`` calls of
each task (tasks starting side by side would sweep a narrow window of
tenants, and leave the others unasked for most of the run).  Each call is
counted in a 0.1 s time bucket and in one of three classes: ``cold`` (the
process has not yet seen a token for that tenant), ``expiry`` (within half a
second of the moment a token of that tenant, as this process saw it, stops
being usable: ``expires_at`` minus the safety margin) and ``steady``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokenfleet
from _common import LogHistogram, tenant_id, tenant_secret

EXPIRY_WINDOW = 0.5
CLASSES = ("cold", "steady", "expiry")


class Tally:
    """What this worker's callers saw, by class and by time bucket."""

    def __init__(self, bucket: float, tenants: int) -> None:
        self.bucket = bucket
        self.calls = 0
        self.expired = 0
        self.failures: Counter[str] = Counter()
        # class -> time bucket -> histogram
        self.latency: dict[str, dict[int, LogHistogram]] = {c: {} for c in CLASSES}
        self.failed_at: Counter[int] = Counter()
        # Per tenant, the last few moments at which a token stops being usable.
        self.ends: list[list[float]] = [[] for _ in range(tenants)]

    def classify(self, tenant: int, wall: float) -> str:
        ends = self.ends[tenant]
        if not ends:
            return "cold"
        if any(abs(wall - end) <= EXPIRY_WINDOW for end in ends):
            return "expiry"
        return "steady"

    def saw_token(self, tenant: int, end: float) -> None:
        ends = self.ends[tenant]
        if end not in ends:
            ends.append(end)
            if len(ends) > 3:
                del ends[0]

    def record(self, kind: str, since_start: float, seconds: float) -> None:
        slot = int(since_start / self.bucket)
        histograms = self.latency[kind]
        histogram = histograms.get(slot)
        if histogram is None:
            histogram = histograms[slot] = LogHistogram()
        histogram.record(seconds)
        self.calls += 1

    def report(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "expired": self.expired,
            "failures": dict(self.failures),
            "failed_at": {str(k): v for k, v in self.failed_at.items()},
            "latency": {
                kind: {str(slot): h.to_json() for slot, h in by_slot.items()}
                for kind, by_slot in self.latency.items()
            },
        }


class TokenSource:
    """Returns (access token, expires_at) for a tenant, however the mode does it."""

    async def start(self) -> None:
        """Connect whatever needs connecting before the start signal."""

    async def get(self, tenant: int) -> tuple[str, float]:
        """The token for *tenant* and its expiry in Unix seconds."""
        raise NotImplementedError

    async def aclose(self) -> dict[str, Any]:
        """Close, returning counters worth reporting."""
        return {}


class CacheSource(TokenSource):
    """A `TokenCache`, on Redis or on its own."""

    def __init__(self, assignment: dict[str, Any]) -> None:
        self._token_url = assignment["token_url"]
        self._scopes = ["submissions.read"]
        self._credentials = [
            tokenfleet.ClientCredentials(tenant_id(i), tenant_secret(i))
            for i in range(assignment["tenants"])
        ]
        redis_url = (
            assignment["redis_url"] if assignment["mode"] == "tokenfleet" else None
        )
        self._cache = tokenfleet.TokenCache(
            redis_url,
            local_max_entries=max(10_000, 2 * assignment["tenants"]),
            **assignment["cache_options"],
        )

    async def start(self) -> None:
        await self._cache.start()

    async def get(self, tenant: int) -> tuple[str, float]:
        token = await self._cache.get_token(
            self._credentials[tenant], token_url=self._token_url, scopes=self._scopes
        )
        return token.access_token, token.expires_at

    async def aclose(self) -> dict[str, Any]:
        stats = self._cache.stats()
        await self._cache.aclose()
        return {
            "local_hits": stats.local_hits,
            "store_hits": stats.store_hits,
            "idp_fetches": stats.idp_fetches,
            "waits": stats.waits,
            "refresh_ahead": stats.refresh_ahead,
            "fallback_fetches": stats.fallback_fetches,
            "write_backs": stats.write_backs,
            "errors": dict(stats.errors),
        }


class AuthlibSource(TokenSource):
    """One Authlib client per tenant, each fetching and refreshing its own token."""

    def __init__(self, assignment: dict[str, Any]) -> None:
        import warnings

        # Authlib 1.9 warns, on import, that its httpx module is deprecated,
        # after installing an 'always' filter for its warnings: import that
        # first, so the 'ignore' below comes ahead of it.
        import authlib.deprecate  # noqa: F401

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The httpx module is deprecated")
            from authlib.integrations.httpx_client import AsyncOAuth2Client

        self._clients = [
            AsyncOAuth2Client(
                client_id=tenant_id(i),
                client_secret=tenant_secret(i),
                token_endpoint=assignment["token_url"],
                grant_type="client_credentials",
                scope="submissions.read",
                # Same safety margin as the cache, so both switch tokens at
                # the same moment of a token's life.
                leeway=assignment["margin"],
            )
            for i in range(assignment["tenants"])
        ]
        self._first_fetch = [asyncio.Lock() for _ in self._clients]

    async def get(self, tenant: int) -> tuple[str, float]:
        client = self._clients[tenant]
        if not client.token:
            # Authlib's own lock only guards refreshes; without this one every
            # task of the process would fetch the first token.
            async with self._first_fetch[tenant]:
                if not client.token:
                    await client.fetch_token()
        await client.ensure_active_token(client.token)
        token = client.token
        return token["access_token"], float(token["expires_at"])

    async def aclose(self) -> dict[str, Any]:
        for client in self._clients:
            await client.aclose()
        return {}


async def call_repeatedly(
    source: TokenSource,
    tally: Tally,
    assignment: dict[str, Any],
    first_tenant: int,
    t0: float,
    deadline: float,
) -> None:
    """One task: ask for the next tenant, record, pause, until the deadline."""
    tenants = assignment["tenants"]
    interval = assignment["interval"]
    margin = assignment["margin"]
    tenant = first_tenant % tenants

    while True:
        started = time.monotonic()
        if started >= deadline:
            return
        wall = time.time()
        kind = tally.classify(tenant, wall)

        try:
            _token, expires_at = await source.get(tenant)
        except Exception as exc:
            tally.failures[type(exc).__name__] += 1
            tally.failed_at[int((started - t0) / tally.bucket)] += 1
        else:
            tally.saw_token(tenant, expires_at - margin)
            if time.time() >= expires_at:
                tally.expired += 1
        tally.record(kind, started - t0, time.monotonic() - started)

        tenant = (tenant + 1) % tenants
        await asyncio.sleep(interval)


async def work(assignment: dict[str, Any]) -> int:
    """Set up, wait for the start signal, run the tasks, report."""
    mode = assignment["mode"]
    source: TokenSource = (
        AuthlibSource(assignment) if mode == "authlib" else CacheSource(assignment)
    )
    await source.start()
    tally = Tally(assignment["bucket"], assignment["tenants"])

    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line.startswith("go "):
        await source.aclose()
        return 3
    t0 = float(line.split()[1])
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))

    deadline = t0 + assignment["duration"]
    tasks = assignment["tasks"]
    await asyncio.gather(
        *(
            call_repeatedly(
                source,
                tally,
                assignment,
                j * assignment["tenants"] // tasks + assignment["index"],
                t0,
                deadline,
            )
            for j in range(tasks)
        )
    )
    counters = await source.aclose()

    report = {
        "index": assignment["index"],
        "pid": os.getpid(),
        "counters": counters,
        **tally.report(),
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(work(orjson.loads(sys.argv[1]))))
