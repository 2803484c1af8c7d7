"""Reliability with real worker processes: Redis and lease holders killed.

Each worker (``_reliability_worker.py``) runs one `TokenCache` with many
calling tasks against a private redis-server and the fake IdP on this test's
event loop, and reports every token, failure and warning as it happens, so a
worker killed with SIGKILL has told everything up to its death.  Every token
is checked against its own ``exp`` claim inside the worker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest
import redis.asyncio as aioredis

from _support import wait_until
from tokenfleet import ClientCredentials
from tokenfleet._fleet import rounded_up_time
from tokenfleet.testing import FakeIdP, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.fleet]

WORKER_SCRIPT = Path(__file__).with_name("_reliability_worker.py")
NAMESPACE = "reliability-fleet"
CLIENTS = [
    ClientCredentials("0oa-fleet-alpha", "Alpha-Secret-51c2-90de"),
    ClientCredentials("0oa-fleet-beta", "Beta-Secret-0b7e-44a1"),
]
SCOPES = ["submissions.read"]
# What a loaded 2-core machine may add to a bound derived from the settings.
SLACK = 1.5
# The slowest a call may be when its caller already holds a valid token.
WARM_CALL_BOUND = 0.5


class Worker:
    """One worker process and the events it reported so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.pid = process.pid
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, settings: dict[str, Any]) -> Worker:
        """Start a worker with *settings* and wait until it is ready."""
        environment = {
            **os.environ,
            "RELIABILITY_WORKER": orjson.dumps(settings).decode(),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER_SCRIPT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=environment,
        )
        worker = cls(process)
        await worker.wait_for(worker.is_ready, 30.0, "ready")
        return worker

    async def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            self.events.append(orjson.loads(line))

    def is_ready(self) -> bool:
        """Whether the worker has built its cache and waits for the start."""
        return bool(self.named("ready"))

    def named(self, event: str) -> list[dict[str, Any]]:
        """The events of one kind, in order."""
        return [one for one in self.events if one["event"] == event]

    def tokens(self, client: ClientCredentials) -> list[dict[str, Any]]:
        """The new tokens this worker's callers received for *client*."""
        return [one for one in self.named("token") if one["client"] == client.client_id]

    def warnings(self) -> list[str]:
        """The names of the warnings tokenfleet logged in this worker."""
        return [one["name"] for one in self.named("log")]

    def go(self) -> None:
        """Tell the worker's callers to start."""
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(b"go\n")

    async def stop(self) -> dict[str, Any]:
        """Stop the callers, let the cache close, and return the ``done`` event."""
        stdin = self.process.stdin
        assert stdin is not None
        stdin.close()
        with anyio.fail_after(15.0):
            await self.process.wait()
            await self._reader
        (done,) = self.named("done")
        return done

    def kill(self) -> None:
        """SIGKILL the worker, as an OOM killer or a crash would."""
        self.process.kill()

    async def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: str
    ) -> None:
        """Poll *condition* until it holds; fail after *timeout* seconds."""
        await wait_for(condition, timeout, f"worker {self.pid}: {what}")

    async def wait_for_tokens(
        self, client: ClientCredentials, count: int, timeout: float
    ) -> None:
        """Wait until this worker has seen *count* tokens for *client*."""

        def enough() -> bool:
            return len(self.tokens(client)) >= count

        await self.wait_for(enough, timeout, f"{count} token(s) for {client.client_id}")

    async def wait_for_warning(self, name: str, timeout: float) -> None:
        """Wait until tokenfleet logged the warning *name* in this worker."""

        def logged() -> bool:
            return name in self.warnings()

        await self.wait_for(logged, timeout, f"the warning {name}")

    async def discard(self) -> None:
        """Kill the worker if it still runs and wait for it."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *condition* every 10 ms until it holds; fail after *timeout*."""
    with anyio.move_on_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)
    msg = f"Within {timeout} s, this never held: {what}."
    raise AssertionError(msg)


@contextlib.asynccontextmanager
async def fleet(count: int, settings: dict[str, Any]) -> AsyncIterator[list[Worker]]:
    """Start *count* workers and release their callers together."""
    workers: list[Worker] = []
    try:
        for _ in range(count):
            workers.append(await Worker.start(settings))
        for worker in workers:
            worker.go()
        yield workers
    finally:
        for worker in workers:
            await worker.discard()


def settings_for(
    redis_url: str,
    idp: FakeIdP,
    clients: list[ClientCredentials],
    *,
    tasks: int,
    cache: dict[str, Any],
) -> dict[str, Any]:
    """Worker settings: who asks for what, how often, with which cache options."""
    return {
        "redis_url": redis_url,
        "token_url": idp.token_url,
        "clients": [[one.client_id, one.client_secret] for one in clients],
        "scopes": SCOPES,
        "tasks": tasks,
        "interval": 0.01,
        "cache": {"namespace": NAMESPACE, "redis_timeout": 0.2, **cache},
    }


def assert_callers_unharmed(
    workers: list[Worker], summaries: list[dict[str, Any]]
) -> None:
    """No call failed, no token was expired, no warm call waited."""
    for worker in workers:
        assert worker.named("failure") == []
        assert worker.named("expired") == []
    for summary in summaries:
        assert summary["calls"] > 0
        assert summary["slowest_warm"] < WARM_CALL_BOUND


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A direct client to the test's server, to find lease holders."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=1.0)
    yield client
    await client.aclose()


async def idp_for(expires_in: float) -> FakeIdP:
    """A started fake IdP that knows `CLIENTS`, with whole-second claims."""
    idp = FakeIdP(expires_in=expires_in, clock=rounded_up_time)
    for client in CLIENTS:
        idp.add_client(client.client_id, client.client_secret, scopes=SCOPES)
    await idp.start()
    return idp


async def kill_lease_holder_mid_fetch(
    admin: aioredis.Redis, idp: FakeIdP, workers: list[Worker]
) -> Worker:
    """SIGKILL the worker holding the fetch lease once the IdP has its request."""
    received = len(idp.requests)
    holder_pid = await lease_holder(admin, timeout=5.0)
    await wait_for(lambda: len(idp.requests) > received, 5.0, "the holder's request")

    (holder,) = [worker for worker in workers if worker.pid == holder_pid]
    holder.kill()
    return holder


async def fleet_jti(admin: aioredis.Redis, client: ClientCredentials) -> str | None:
    """The ``jti`` of the token Redis holds for *client*, if any."""
    for key in await admin.keys(f"{NAMESPACE}:*:token"):
        payload = await admin.get(key)
        if not isinstance(payload, bytes):
            continue
        token = orjson.loads(payload[32:])["t"]
        body = token.split(".")[1]
        token_claims = orjson.loads(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        )
        if token_claims["cid"] == client.client_id:
            jti: str = token_claims["jti"]
            return jti
    return None


async def wait_for_convergence(
    admin: aioredis.Redis, workers: list[Worker], timeout: float
) -> None:
    """Wait until every worker's latest token for each client is Redis's."""
    with anyio.move_on_after(timeout):
        while True:
            shared = {client: await fleet_jti(admin, client) for client in CLIENTS}
            if all(
                worker.tokens(client)[-1]["jti"] == shared[client]
                for worker in workers
                for client in CLIENTS
            ):
                return
            await anyio.sleep(0.01)
    msg = f"Within {timeout} s, the workers did not all serve the tokens in Redis."
    raise AssertionError(msg)


async def lease_holder(admin: aioredis.Redis, timeout: float) -> int:
    """Wait for a fetch lease in Redis and return the pid of its holder."""
    with anyio.fail_after(timeout):
        while True:
            keys = await admin.keys(f"{NAMESPACE}:*:lease")
            owner = await admin.get(keys[0]) if keys else None
            if isinstance(owner, bytes):
                # Owners are spelled "<pid>-<random>-<counter>".
                return int(owner.split(b"-")[0])
            await anyio.sleep(0.005)


async def test_redis_killed_and_restarted_under_load(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Workers keep valid tokens through kill -9 and restart, then converge."""
    # 8 s tokens are refreshed 2.8-4 s after their fetch, during the outage.
    idp = await idp_for(expires_in=8)
    settings = settings_for(
        redis_server.url, idp, CLIENTS, tasks=5, cache={"refresh_ratio": 0.5}
    )
    try:
        async with fleet(3, settings) as workers:
            for worker in workers:
                for client in CLIENTS:
                    await worker.wait_for_tokens(client, 1, timeout=10.0)
            redis_server.kill()
            before_outage = len(idp.requests)

            for worker in workers:
                await worker.wait_for_warning("redis.unavailable", timeout=8.0)
            # Keep Redis down until the refreshes fall due, so that the
            # outage has tokens fetched by processes alone to write back.
            await wait_until(
                lambda: len(idp.requests) > before_outage,
                timeout=8.0,
                what="a refresh during the outage",
            )
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(redis_server.restart)
            for worker in workers:
                await worker.wait_for_warning("redis.recovered", timeout=8.0)
            during_outage = len(idp.requests) - before_outage

            await anyio.sleep(1.0)
            await wait_for_convergence(admin, workers, timeout=2.0)
            after_recovery = len(idp.requests) - before_outage - during_outage
            summaries = [await worker.stop() for worker in workers]
    finally:
        await idp.stop()

    assert_callers_unharmed(workers, summaries)
    for worker in workers:
        assert worker.warnings() == ["redis.unavailable", "redis.recovered"]
    # At most one fetch per process and key while Redis was away, at most one
    # per key for the whole fleet once it was back.
    assert 1 <= during_outage <= len(workers) * len(CLIENTS)
    assert after_recovery <= len(CLIENTS)
    assert 1 <= sum(s["stats"]["write_backs"] for s in summaries) <= len(CLIENTS)


async def test_killed_lease_holder_goes_unnoticed_by_callers_holding_tokens(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A refresh holder killed mid-fetch is replaced once its lease expires."""
    # 10 s tokens, served 8 s, refreshed 2 s after their fetch; the lease is
    # request_timeout + 1 = 3 s.  The IdP is slow for the refresh that the
    # holder dies in, and quick again for its replacement: the early refresh
    # of a token scales with how long its fetch took.
    lease, latency = 3.0, 1.5
    idp = await idp_for(expires_in=10)
    settings = settings_for(
        redis_server.url,
        idp,
        CLIENTS[:1],
        tasks=5,
        cache={
            "request_timeout": lease - 1.0,
            "refresh_ratio": 0.2,
            "refresh_jitter": 0.0,
            "margin_ratio": 0.2,
        },
    )
    (client,) = CLIENTS[:1]
    try:
        async with fleet(3, settings) as workers:
            for worker in workers:
                await worker.wait_for_tokens(client, 1, timeout=10.0)
            idp.latency = latency

            holder = await kill_lease_holder_mid_fetch(admin, idp, workers)
            killed_at = time.monotonic()
            idp.latency = 0.0
            survivors = [worker for worker in workers if worker is not holder]

            for worker in survivors:
                await worker.wait_for_tokens(client, 2, timeout=lease + 2 * SLACK)
            replaced_after = time.monotonic() - killed_at
            summaries = [await worker.stop() for worker in survivors]
    finally:
        await idp.stop()

    assert_callers_unharmed(survivors, summaries)
    # No survivor fetched while the dead holder's lease was still there.
    assert lease - 0.5 <= replaced_after <= lease + 2 * SLACK
    assert len({worker.tokens(client)[1]["jti"] for worker in survivors}) == 1
    # The first token, the dead holder's and its replacement.
    assert idp.issued() == 3


async def test_killed_lease_holder_at_cold_start_is_replaced_within_the_lease(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Callers waiting on a holder killed mid-fetch get a token after its lease."""
    lease, latency = 3.0, 1.5
    idp = await idp_for(expires_in=60)
    idp.latency = latency
    settings = settings_for(
        redis_server.url,
        idp,
        CLIENTS[:1],
        tasks=3,
        cache={"request_timeout": lease - 1.0},
    )
    (client,) = CLIENTS[:1]
    try:
        async with fleet(3, settings) as workers:
            holder = await kill_lease_holder_mid_fetch(admin, idp, workers)
            killed_at = time.monotonic()
            survivors = [worker for worker in workers if worker is not holder]

            for worker in survivors:
                await worker.wait_for_tokens(
                    client, 1, timeout=lease + latency + 2 * SLACK
                )
            served_after = time.monotonic() - killed_at
            summaries = [await worker.stop() for worker in survivors]
    finally:
        await idp.stop()

    for worker in survivors:
        assert worker.named("failure") == []
        assert worker.named("expired") == []
    assert all(summary["calls"] > 0 for summary in summaries)
    assert lease - 0.5 + latency <= served_after <= lease + latency + 2 * SLACK
    assert len({worker.tokens(client)[0]["jti"] for worker in survivors}) == 1
    # The dead holder's token and its replacement.
    assert idp.issued() == 2
