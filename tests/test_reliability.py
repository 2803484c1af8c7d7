"""Reliability under faults, inside one event loop.

Real redis-server processes, the fault-injecting `ChaosProxy` and the fake
IdP on loopback stand in for a fleet's Redis and IdP; several `TokenCache`
objects on one Redis stand in for several workers.  Every token a test
receives is checked against its own ``exp`` claim, and every test bounds the
requests the IdP received.  Whole worker processes are killed in
``test_reliability_processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson
import pytest
import redis.asyncio as aioredis

from _support import claims, wait_until
from tokenfleet import (
    CacheClosedError,
    ClientCredentials,
    IdPUnavailableError,
    InvalidClientError,
    InvalidScopeError,
    RateLimitedError,
    RetryPolicy,
    Token,
    TokenCache,
    TokenFleetError,
)
from tokenfleet._fleet import rounded_up_time
from tokenfleet.testing import ChaosProxy, FakeIdP, RedisServer, ScriptedFailure

NAMESPACE = "reliability"
REDIS_TIMEOUT = 0.2
# What a loaded 2-core machine may add to a wait that is bounded in theory.
SLACK = 0.5
# A call that neither waits on Redis nor on the IdP returns well within this.
PROMPT = 0.1

PRIMARY = ClientCredentials("0oa-reliability-primary", "Primary-Secret-4f1c-e9a2")
OTHER = ClientCredentials("0oa-reliability-other", "Other-Secret-77b0-13d5")
SHORT_LIVED = ClientCredentials("0oa-reliability-short", "Short-Secret-2a9e-c081")
READ = ("submissions.read",)
WRITE = ("submissions.write",)
BOTH = ("submissions.read", "submissions.write")

# Loading 2000 keys at half a millisecond each keeps a restarted server in
# LOADING for about a second.
LOADING_KEYS = 2000
LOADING_ARGS = (
    *("--key-load-delay", "500"),
    *("--loading-process-events-interval-bytes", "1024"),
)


# Fixtures ------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test, which may break it at will."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[ChaosProxy]:
    """A chaos proxy in forward mode in front of the test's server."""
    async with ChaosProxy(redis_server.host, redis_server.port) as chaos:
        yield chaos


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A direct client to the test's server, to look at and reconfigure it."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdP]:
    """A fake IdP issuing one-minute tokens (three seconds for SHORT_LIVED).

    Its clock is rounded up to whole seconds, so a token's ``exp`` claim is
    never earlier than its issue time plus ``expires_in``.
    """
    async with FakeIdP(expires_in=60, clock=rounded_up_time) as fake:
        for credentials in (PRIMARY, OTHER):
            fake.add_client(
                credentials.client_id, credentials.client_secret, scopes=BOTH
            )
        fake.add_client(
            SHORT_LIVED.client_id, SHORT_LIVED.client_secret, scopes=BOTH, expires_in=3
        )
        yield fake


# Helpers ---------------------------------------------------------------------------


def cache_for(url: str | None, **options: Any) -> TokenCache:
    """A cache with short Redis timeouts and no IdP retries unless overridden."""
    settings: dict[str, Any] = {
        "namespace": NAMESPACE,
        "redis_timeout": REDIS_TIMEOUT,
        "retry": RetryPolicy(max_attempts=1),
        "unavailable_cooldown": 0.5,
    }
    settings.update(options)
    return TokenCache(url, **settings)


def expiry(token: Token) -> float:
    """Return the ``exp`` claim of a token minted by `FakeIdP`."""
    return float(claims(token.access_token)["exp"])


async def fetch_token(
    cache: TokenCache,
    idp: FakeIdP,
    scopes: tuple[str, ...] = READ,
    credentials: ClientCredentials = PRIMARY,
) -> Token:
    """Get a token and check that it has not expired by its own claim."""
    token = await cache.get_token(credentials, token_url=idp.token_url, scopes=scopes)
    assert time.time() < expiry(token), "an expired token was served"
    return token


async def timed(call: Awaitable[Token]) -> tuple[Token, float]:
    """Return the token *call* produced and the seconds it took."""
    started = time.monotonic()
    token = await call
    return token, time.monotonic() - started


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, what: str
) -> None:
    """Poll *check* every 10 ms until it holds; fail after *timeout* seconds."""
    with anyio.move_on_after(timeout):
        while True:
            if await check():
                return
            await anyio.sleep(0.01)
    msg = f"Within {timeout} s, {what} never happened."
    raise AssertionError(msg)


def redis_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The outage events the Redis store logged, in order."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "tokenfleet.redis"
    ]


def outage_cause(caplog: pytest.LogCaptureFixture) -> str | None:
    """The error class named by the first ``redis.unavailable`` record."""
    for record in caplog.records:
        if record.getMessage() == "redis.unavailable":
            cause: str | None = getattr(record, "error", None)
            return cause
    return None


async def recovered(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether the Redis store logged the end of an outage."""
    return "redis.recovered" in redis_events(caplog)


async def written_back(cache: TokenCache) -> bool:
    """Whether *cache* has written one token it fetched alone back to Redis."""
    return cache.stats().write_backs == 1


async def leased(admin: aioredis.Redis) -> bool:
    """Whether some worker holds a lease in Redis."""
    return bool(await admin.keys(f"{NAMESPACE}:*:lease"))


async def burst_from_three_workers(
    url: str, idp: FakeIdP, retry: RetryPolicy
) -> list[Token]:
    """Ask for the same token from ten callers on each of three workers at once."""
    async with contextlib.AsyncExitStack() as stack:
        caches = [
            await stack.enter_async_context(cache_for(url, retry=retry))
            for _ in range(3)
        ]
        return await asyncio.gather(
            *(fetch_token(cache, idp, READ) for cache in caches for _ in range(10))
        )


def inject(fault: str, proxy: ChaosProxy, server: RedisServer) -> None:
    """Break the way to Redis, or Redis itself, as *fault* names."""
    if fault == "refused":
        proxy.refuse()
    elif fault == "blackholed":
        proxy.blackhole()
    elif fault == "delayed":
        proxy.delay(10 * REDIS_TIMEOUT)
    elif fault == "cut":
        proxy.cut()
    elif fault == "killed":
        server.kill()
    elif fault == "hung":
        server.pause()
    else:
        msg = f"Unknown fault {fault!r}."
        raise ValueError(msg)


# Redis unavailable -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fault", ["refused", "blackholed", "delayed", "cut", "killed", "hung"]
)
async def test_redis_fault_falls_back_to_one_fetch_per_key(
    fault: str, redis_server: RedisServer, proxy: ChaosProxy, idp: FakeIdP
) -> None:
    """With Redis unreachable, callers get valid tokens from one fetch per key."""
    async with cache_for(proxy.url) as cache:
        warm = await fetch_token(cache, idp, READ)
        inject(fault, proxy, redis_server)

        started = time.monotonic()
        tokens = await asyncio.gather(
            *(fetch_token(cache, idp, scopes) for scopes in [READ, WRITE] * 20)
        )
        elapsed = time.monotonic() - started

    assert {token.access_token for token in tokens[0::2]} == {warm.access_token}
    assert len({token.access_token for token in tokens[1::2]}) == 1
    assert idp.issued() == 2
    assert elapsed < REDIS_TIMEOUT + SLACK


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["blackholed", "delayed", "hung"])
async def test_open_breaker_stops_waiting_on_redis(
    fault: str, redis_server: RedisServer, proxy: ChaosProxy, idp: FakeIdP
) -> None:
    """Only the first call of an outage waits, and for redis_timeout at most."""
    async with cache_for(proxy.url) as cache:
        await fetch_token(cache, idp, READ)
        inject(fault, proxy, redis_server)

        _, first = await timed(fetch_token(cache, idp, WRITE))
        _, second = await timed(fetch_token(cache, idp, BOTH))

    assert 0.75 * REDIS_TIMEOUT <= first < REDIS_TIMEOUT + SLACK
    assert second < PROMPT


@pytest.mark.anyio
async def test_busy_event_loop_is_not_taken_for_a_redis_outage(
    redis_server: RedisServer,
    proxy: ChaosProxy,
    idp: FakeIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis call whose timeout fires late because the loop was blocked gets a second chance."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    async with cache_for(redis_server.url) as writer, cache_for(proxy.url) as reader:
        shared = await fetch_token(writer, idp, READ)
        proxy.delay(REDIS_TIMEOUT / 4)

        # Block the loop from just after the reader's script leaves until
        # well past redis_timeout: the reply arrives meanwhile, but the
        # timeout fires (late) before the loop can read it.
        asyncio.get_running_loop().call_later(
            REDIS_TIMEOUT / 10, time.sleep, 3 * REDIS_TIMEOUT
        )
        read = await fetch_token(reader, idp, READ)

    assert read.access_token == shared.access_token
    assert reader.stats().fallback_fetches == 0
    assert redis_events(caplog) == []
    assert idp.issued() == 1


@pytest.mark.anyio
async def test_failing_idp_during_a_redis_outage_is_asked_once_per_cooldown(
    proxy: ChaosProxy, idp: FakeIdP
) -> None:
    """Without Redis to record a failure, the process remembers it itself."""
    idp.fail_always(ScriptedFailure(503))
    async with cache_for(proxy.url, unavailable_cooldown=0.5) as cache:
        proxy.refuse()
        failures = 0
        while failures < 10:
            with pytest.raises(IdPUnavailableError):
                await fetch_token(cache, idp, READ)
            failures += 1
            await anyio.sleep(0.01)
        during_cooldown = len(idp.requests)

        idp.fail_always(None)
        await anyio.sleep(0.5)
        await fetch_token(cache, idp, READ)

    assert during_cooldown == 1
    assert len(idp.requests) == 2


@pytest.mark.anyio
async def test_outage_logs_one_warning_when_it_starts_and_one_when_it_ends(
    proxy: ChaosProxy, idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """Many calls and several failed probes still log one line each way."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    keys = [(scopes, who) for who in (PRIMARY, OTHER) for scopes in (READ, WRITE)]

    async with cache_for(proxy.url) as cache:
        proxy.refuse()
        # Spread over 1.6 s, the calls outlast the probes at 0.5 s and 1.5 s.
        for scopes, credentials in keys:
            for _ in range(10):
                await fetch_token(cache, idp, scopes, credentials)
            await anyio.sleep(0.4)
        proxy.forward()
        await eventually(lambda: recovered(caplog), timeout=6.0, what="recovery")
        for scopes, credentials in keys:
            await fetch_token(cache, idp, scopes, credentials)

    assert redis_events(caplog) == ["redis.unavailable", "redis.recovered"]
    assert idp.issued() == len(keys)


@pytest.mark.anyio
async def test_token_fetched_during_an_outage_is_written_back(
    redis_server: RedisServer, proxy: ChaosProxy, idp: FakeIdP
) -> None:
    """When Redis returns empty-handed, the local token becomes the fleet's."""
    async with cache_for(proxy.url) as cache, cache_for(redis_server.url) as peer:
        proxy.refuse()
        local = await fetch_token(cache, idp, READ)
        proxy.forward()
        await eventually(
            lambda: written_back(cache), timeout=6.0, what="the write-back"
        )
        shared = await fetch_token(peer, idp, READ)

    assert shared.access_token == local.access_token
    assert idp.issued() == 1


@pytest.mark.anyio
async def test_tokens_a_restarted_redis_lost_are_given_back_to_it(
    redis_server: RedisServer, idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restarted empty gets the tokens processes hold, without IdP calls."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")

    async def unavailable() -> bool:
        return "redis.unavailable" in redis_events(caplog)

    async with (
        cache_for(redis_server.url) as cache,
        cache_for(redis_server.url) as peer,
    ):
        held = await fetch_token(cache, idp, READ)
        redis_server.kill()
        await eventually(unavailable, timeout=6.0, what="the outage")
        await anyio.to_thread.run_sync(redis_server.restart)
        await eventually(
            lambda: written_back(cache), timeout=6.0, what="the write-back"
        )
        shared = await fetch_token(peer, idp, READ)

    assert shared.access_token == held.access_token
    assert idp.issued() == 1


@pytest.mark.anyio
async def test_newer_redis_entry_wins_over_a_local_one(
    redis_server: RedisServer,
    proxy: ChaosProxy,
    idp: FakeIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After an outage, a worker drops its own token for the one in Redis."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    async with cache_for(proxy.url) as cache, cache_for(redis_server.url) as peer:
        proxy.refuse()
        local = await fetch_token(cache, idp, READ)
        shared = await fetch_token(peer, idp, READ)
        proxy.forward()
        await eventually(lambda: recovered(caplog), timeout=6.0, what="recovery")

        async def converged() -> bool:
            token = await fetch_token(cache, idp, READ)
            return token.access_token == shared.access_token

        await eventually(converged, timeout=2.0, what="adopting Redis's token")
        write_backs = cache.stats().write_backs

    assert local.access_token != shared.access_token
    assert write_backs == 0
    assert idp.issued() == 2


async def assert_refusal_is_one_outage(
    cache: TokenCache,
    idp: FakeIdP,
    caplog: pytest.LogCaptureFixture,
    mend: Callable[[], Awaitable[object]],
) -> None:
    """Fetch through a Redis that refuses writes, outlast two probes, mend it."""
    token = await fetch_token(cache, idp, WRITE)
    # Probes at 0.5 s and 1.5 s meet the refusing server.
    await anyio.sleep(1.6)
    assert (await fetch_token(cache, idp, WRITE)).access_token == token.access_token
    await mend()
    await eventually(lambda: written_back(cache), timeout=6.0, what="the write-back")
    assert redis_events(caplog) == ["redis.unavailable", "redis.recovered"]
    assert cache.stats().fallback_fetches == 1


@pytest.mark.anyio
async def test_read_only_replica_is_an_outage_until_promoted(
    redis_server: RedisServer,
    admin: aioredis.Redis,
    idp: FakeIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """READONLY falls back to local fetches, once, until writes work again."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    with RedisServer() as primary:
        async with cache_for(redis_server.url) as cache:
            await fetch_token(cache, idp, READ)
            await admin.replicaof(primary.host, primary.port)
            await assert_refusal_is_one_outage(
                cache, idp, caplog, lambda: admin.replicaof("NO", "ONE")
            )

    assert outage_cause(caplog) == "ReadOnlyError"
    assert idp.issued() == 2


@pytest.mark.anyio
async def test_out_of_memory_is_an_outage_until_memory_is_available(
    redis_server: RedisServer,
    admin: aioredis.Redis,
    idp: FakeIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OOM falls back to local fetches, once, until Redis accepts writes again."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    async with cache_for(redis_server.url) as cache:
        await fetch_token(cache, idp, READ)
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
        await assert_refusal_is_one_outage(
            cache, idp, caplog, lambda: admin.config_set("maxmemory", 0)
        )

    assert outage_cause(caplog) == "OutOfMemoryError"
    assert idp.issued() == 2


@pytest.mark.anyio
async def test_redis_loading_its_dataset_is_an_outage_until_loaded(
    idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache started while Redis loads serves tokens, then joins the fleet."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    with RedisServer(extra_args=LOADING_ARGS) as server:
        filler = aioredis.Redis.from_url(server.url)
        async with filler.pipeline(transaction=False) as pipeline:
            for index in range(LOADING_KEYS):
                pipeline.set(f"filler:{index}", b"x")
            await pipeline.execute()
        await filler.save()
        await filler.aclose()
        await anyio.to_thread.run_sync(server.restart)

        async with cache_for(server.url) as cache:
            local = await fetch_token(cache, idp, READ)
            await eventually(
                lambda: written_back(cache), timeout=8.0, what="the write-back"
            )

        async with cache_for(server.url) as peer:
            shared = await fetch_token(peer, idp, READ)

    assert outage_cause(caplog) == "BusyLoadingError"
    assert redis_events(caplog) == ["redis.unavailable", "redis.recovered"]
    assert shared.access_token == local.access_token
    assert idp.issued() == 1


# Leases ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lease_of_a_holder_cut_off_from_redis_expires_and_is_taken_over(
    redis_server: RedisServer, proxy: ChaosProxy, admin: aioredis.Redis, idp: FakeIdP
) -> None:
    """A holder that can no longer renew its lease is replaced when it expires."""
    # The lease lasts request_timeout + 1 = 1.8 s and is renewed every 0.6 s.
    lease, latency = 1.8, 0.7
    options = {"request_timeout": lease - 1.0}
    idp.latency = latency

    async with (
        cache_for(proxy.url, **options) as holder,
        cache_for(redis_server.url, **options) as taker,
    ):
        held_call = asyncio.create_task(fetch_token(holder, idp, READ))
        await eventually(lambda: leased(admin), timeout=2.0, what="taking the lease")
        proxy.blackhole()
        taken, waited = await timed(fetch_token(taker, idp, READ))
        held = await held_call

    # The taker waited for the lease to run out, then fetched once itself.
    assert lease - 0.3 <= waited <= lease + latency + SLACK
    assert taken.access_token != held.access_token
    assert idp.issued() == 2


@pytest.mark.anyio
async def test_waiter_stops_waiting_when_its_notice_connection_is_lost(
    redis_server: RedisServer, proxy: ChaosProxy, idp: FakeIdP
) -> None:
    """A waiter whose Redis goes away fetches at once instead of after the backstop."""
    latency = 0.8
    idp.latency = latency

    async with (
        cache_for(redis_server.url) as holder,
        cache_for(proxy.url) as waiter,
    ):
        held_call = asyncio.create_task(fetch_token(holder, idp, READ))
        await wait_until(lambda: len(idp.requests) >= 1, what="the holder's request")
        waiting_call = asyncio.create_task(fetch_token(waiter, idp, READ))
        await wait_until(lambda: waiter.stats().waits >= 1, what="the waiter waiting")

        refused_at = time.monotonic()
        proxy.refuse()
        fallback = await waiting_call
        served_after = time.monotonic() - refused_at
        held = await held_call

    # Without the wake-up it would wait for the 2 s backstop first.
    assert served_after < latency + 0.5
    assert waiter.stats().fallback_fetches == 1
    assert fallback.access_token != held.access_token


# IdP trouble --------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"), [(503, IdPUnavailableError), (429, RateLimitedError)]
)
async def test_requested_wait_is_a_fleet_wide_cooldown_for_the_key(
    status: int, error: type[TokenFleetError], redis_server: RedisServer, idp: FakeIdP
) -> None:
    """After a Retry-After, no worker asks for that key until the wait is over."""
    idp.fail_next(ScriptedFailure(status, headers={"Retry-After": "1"}))
    async with (
        cache_for(redis_server.url) as first,
        cache_for(redis_server.url) as second,
    ):
        with pytest.raises(error):
            await fetch_token(first, idp, READ)

        started = time.monotonic()
        refusals = await asyncio.gather(
            *(fetch_token(second, idp, READ) for _ in range(10)),
            return_exceptions=True,
        )
        refused_within = time.monotonic() - started
        during_cooldown = len(idp.requests)

        await anyio.sleep(1.1)
        await fetch_token(second, idp, READ)

    assert all(type(refusal) is error for refusal in refusals)
    assert refused_within < PROMPT
    assert during_cooldown == 1
    assert len(idp.requests) == 2


@pytest.mark.anyio
async def test_rate_limit_bucket_pauses_every_client_of_the_token_url(
    redis_server: RedisServer, idp: FakeIdP
) -> None:
    """A 429 with X-Rate-Limit headers stops every client of the URL, fleet-wide."""
    reset = time.time() + 1.0
    idp.fail_next(
        ScriptedFailure(
            429,
            headers={
                "X-Rate-Limit-Limit": "600",
                "X-Rate-Limit-Remaining": "0",
                "X-Rate-Limit-Reset": f"{reset:.3f}",
            },
        )
    )
    async with (
        cache_for(redis_server.url) as first,
        cache_for(redis_server.url) as second,
    ):
        with pytest.raises(RateLimitedError) as limited:
            await fetch_token(first, idp, READ, PRIMARY)

        refusals = await asyncio.gather(
            *(fetch_token(second, idp, WRITE, OTHER) for _ in range(10)),
            return_exceptions=True,
        )
        during_cooldown = len(idp.requests)

        await anyio.sleep(reset - time.time() + 0.1)
        await fetch_token(second, idp, WRITE, OTHER)

    assert limited.value.endpoint_wide
    assert all(
        isinstance(refusal, RateLimitedError) and refusal.endpoint_wide
        for refusal in refusals
    )
    assert during_cooldown == 1
    assert len(idp.requests) == 2


@pytest.mark.anyio
async def test_rate_limited_lease_holder_waits_out_the_reset_alone(
    redis_server: RedisServer, idp: FakeIdP
) -> None:
    """With retries on, one worker waits for the reset; the rest wait for it."""
    reset = time.time() + 0.5
    idp.fail_next(
        ScriptedFailure(
            429,
            headers={"X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Reset": f"{reset}"},
        )
    )
    retry = RetryPolicy(deadline=5.0, initial_backoff=0.05)

    tokens = await burst_from_three_workers(redis_server.url, idp, retry)

    assert len({token.access_token for token in tokens}) == 1
    assert [request.status for request in idp.requests] == [429, 200]
    assert idp.requests[1].at - idp.requests[0].at >= 0.4


@pytest.mark.anyio
async def test_rate_limit_bucket_is_shared_while_the_holder_waits_it_out(
    redis_server: RedisServer, idp: FakeIdP
) -> None:
    """Other clients of the URL back off while one lease holder waits for the reset."""
    reset = time.time() + 0.6
    idp.fail_next(
        ScriptedFailure(
            429,
            headers={"X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Reset": f"{reset}"},
        )
    )
    retry = RetryPolicy(deadline=5.0, initial_backoff=0.05)

    async with (
        cache_for(redis_server.url, retry=retry) as holder,
        cache_for(redis_server.url) as other,
    ):
        waiting = asyncio.ensure_future(fetch_token(holder, idp, READ, PRIMARY))
        await wait_until(lambda: len(idp.requests) >= 1, what="first request")
        await anyio.sleep(0.1)

        with pytest.raises(RateLimitedError) as refused:
            await fetch_token(other, idp, WRITE, OTHER)
        requests_while_waiting = len(idp.requests)

        await waiting

    assert refused.value.endpoint_wide
    assert requests_while_waiting == 1
    assert [request.status for request in idp.requests] == [429, 200]


@pytest.mark.anyio
async def test_burst_of_503_is_retried_by_one_lease_holder_for_the_fleet(
    redis_server: RedisServer, idp: FakeIdP
) -> None:
    """Three workers, thirty callers, three 503s: four requests in all."""
    idp.fail_next(*[ScriptedFailure(503)] * 3)
    retry = RetryPolicy(deadline=5.0, initial_backoff=0.05, max_backoff=0.2)

    tokens = await burst_from_three_workers(redis_server.url, idp, retry)

    assert len({token.access_token for token in tokens}) == 1
    assert [request.status for request in idp.requests] == [503, 503, 503, 200]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("credentials", "scopes", "error"),
    [
        (
            ClientCredentials(PRIMARY.client_id, "Wrong-Secret-0000"),
            READ,
            InvalidClientError,
        ),
        (PRIMARY, ("admin.everything",), InvalidScopeError),
    ],
    ids=["invalid_client", "invalid_scope"],
)
async def test_rejected_credentials_are_remembered_fleet_wide(
    credentials: ClientCredentials,
    scopes: tuple[str, ...],
    error: type[TokenFleetError],
    redis_server: RedisServer,
    idp: FakeIdP,
) -> None:
    """Every worker gets the same typed error at once, for failure_ttl."""
    async with (
        cache_for(redis_server.url, failure_ttl=1.0) as first,
        cache_for(redis_server.url, failure_ttl=1.0) as second,
    ):
        with pytest.raises(error):
            await fetch_token(first, idp, scopes, credentials)

        started = time.monotonic()
        refusals = await asyncio.gather(
            *(fetch_token(second, idp, scopes, credentials) for _ in range(20)),
            return_exceptions=True,
        )
        refused_within = time.monotonic() - started
        during_failure_ttl = len(idp.requests)

        await anyio.sleep(1.1)
        with pytest.raises(error):
            await fetch_token(second, idp, scopes, credentials)

    assert all(type(refusal) is error for refusal in refusals)
    assert refused_within < PROMPT
    assert during_failure_ttl == 1
    assert len(idp.requests) == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "failure",
    [
        ScriptedFailure(503),
        ScriptedFailure(200, delay=1.0),
        ScriptedFailure(
            200, body=b"<html>maintenance</html>", content_type="text/html"
        ),
    ],
    ids=["503", "timeout", "garbage"],
)
async def test_failed_refresh_keeps_serving_the_current_token(
    failure: ScriptedFailure, redis_server: RedisServer, idp: FakeIdP
) -> None:
    """While refreshes fail, callers keep the valid token; then it is replaced."""
    # A 3 s token is served for 2.7 s and due for refresh after 1.05-1.5 s.
    options = {
        "refresh_ratio": 0.5,
        "request_timeout": 0.25,
        "unavailable_cooldown": 0.2,
    }
    async with cache_for(redis_server.url, **options) as cache:
        first, _ = await timed(fetch_token(cache, idp, READ, SHORT_LIVED))
        fetched_at = time.monotonic()
        idp.fail_always(failure)

        slowest = 0.0
        while time.monotonic() < fetched_at + 1.8:
            token, took = await timed(fetch_token(cache, idp, READ, SHORT_LIVED))
            assert token.access_token == first.access_token
            slowest = max(slowest, took)
            await anyio.sleep(0.02)
        failed_refreshes = len(idp.requests) - 1
        idp.fail_always(None)

        while token.access_token == first.access_token:
            token, took = await timed(fetch_token(cache, idp, READ, SHORT_LIVED))
            slowest = max(slowest, took)
            await anyio.sleep(0.01)
        replaced_after = time.monotonic() - fetched_at
        stats = cache.stats()

    assert slowest < PROMPT
    assert 1 <= failed_refreshes <= 6
    assert replaced_after < 2.7
    assert stats.errors == {}
    assert stats.refresh_ahead == 1


# Clocks --------------------------------------------------------------------------------


class SteppedClock:
    """A clock moved by hand, whose wall and monotonic readings can part."""

    def __init__(self) -> None:
        self._wall = time.time()
        self._monotonic = 1_000.0

    def time(self) -> float:
        """Return the wall-clock reading."""
        return self._wall

    def monotonic(self) -> float:
        """Return the monotonic (boot-time) reading."""
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        """Move both readings by *seconds* at once."""
        self.suspend(max(0.0, seconds))
        await anyio.lowlevel.checkpoint()

    def set_wall_back(self, seconds: float) -> None:
        """Move the wall clock back, as an NTP step does; monotonic time goes on."""
        self._wall -= seconds

    def step_monotonic(self, seconds: float) -> None:
        """Let *seconds* pass on the monotonic clock only."""
        self._monotonic += seconds

    def suspend(self, seconds: float) -> None:
        """Let *seconds* pass on both clocks in one step, as a suspend does."""
        self._wall += seconds
        self._monotonic += seconds


@pytest.mark.anyio
async def test_wall_clock_set_back_does_not_extend_a_token(idp: FakeIdP) -> None:
    """Expiry is measured on the monotonic clock, whatever the wall clock says."""
    clock = SteppedClock()
    async with cache_for(None, clock=clock) as cache:
        first = await fetch_token(cache, idp, READ)
        # A minute-long token is served for 54 s; 55 s pass while the wall
        # clock is set an hour back.
        clock.set_wall_back(3600)
        clock.step_monotonic(55)
        second = await fetch_token(cache, idp, READ)

    assert second.access_token != first.access_token
    assert idp.issued() == 2


@pytest.mark.anyio
async def test_token_is_not_served_after_a_suspension_past_its_expiry(
    idp: FakeIdP,
) -> None:
    """A process waking from a long suspend fetches rather than serve stale."""
    clock = SteppedClock()
    async with cache_for(None, clock=clock) as cache:
        first = await fetch_token(cache, idp, READ)
        clock.suspend(55)
        second = await fetch_token(cache, idp, READ)

    assert second.access_token != first.access_token
    assert idp.issued() == 2


# Cancellation and shutdown ----------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_caller_leaves_no_lease_and_a_whole_entry(
    redis_server: RedisServer, admin: aioredis.Redis, idp: FakeIdP
) -> None:
    """The fetch a cancelled caller started completes and commits for others."""
    idp.latency = 0.3
    async with cache_for(redis_server.url) as cache:
        with anyio.move_on_after(0.05) as scope:
            await fetch_token(cache, idp, READ)

        async def settled() -> bool:
            leases = await admin.keys(f"{NAMESPACE}:*:lease")
            tokens = await admin.keys(f"{NAMESPACE}:*:token")
            return not leases and len(tokens) == 1

        await eventually(settled, timeout=2.0, what="the commit")
        (key,) = await admin.keys(f"{NAMESPACE}:*:token")
        entry = await admin.get(key)
        token = await fetch_token(cache, idp, READ)

    assert isinstance(entry, bytes)
    assert scope.cancelled_caught
    assert orjson.loads(entry[32:])["t"] == token.access_token
    assert idp.issued() == 1


@pytest.mark.anyio
async def test_closing_releases_held_leases_and_stops_background_tasks(
    redis_server: RedisServer, admin: aioredis.Redis, idp: FakeIdP
) -> None:
    """aclose() does not wait for the IdP, frees the lease and leaves no task."""
    idp.latency = 5.0

    # Closed at ten moments around taking the lease and starting the fetch,
    # so that a cancellation lost at any of them shows.
    for attempt in range(10):
        cache = cache_for(redis_server.url)
        await cache.start()
        caller = asyncio.create_task(fetch_token(cache, idp, READ))
        await eventually(lambda: leased(admin), timeout=2.0, what="taking the lease")
        await anyio.sleep(attempt / 1000)

        started = time.monotonic()
        await cache.aclose()
        closing = time.monotonic() - started

        with pytest.raises(CacheClosedError):
            await caller
        assert closing < SLACK
        assert not await leased(admin)
        assert not [
            task
            for task in asyncio.all_tasks()
            if task.get_name().startswith("tokenfleet-")
        ]


@pytest.mark.anyio
async def test_closing_with_cancelled_callers_leaves_no_redis_connection(
    proxy: ChaosProxy, idp: FakeIdP
) -> None:
    """Cancelled callers and a close mid-flight leave no connection open."""
    # 40 ms each way: slow, but inside redis_timeout, so no outage starts.
    proxy.delay(0.04)
    cache = cache_for(proxy.url)
    await cache.start()
    callers = [
        asyncio.create_task(fetch_token(cache, idp, scopes, credentials))
        for scopes in (READ, WRITE, BOTH)
        for credentials in (PRIMARY, OTHER)
    ]
    await anyio.sleep(0.05)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await cache.aclose()

    async def disconnected() -> bool:
        return proxy.connections == 0

    await eventually(disconnected, timeout=2.0, what="closing every connection")
