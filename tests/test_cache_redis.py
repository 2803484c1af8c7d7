"""TokenCache on a real Redis: keys, entries, notices, failures, cancellation.

One private redis-server serves the module and is emptied before each test;
several `TokenCache` instances with clients of their own stand for the
processes of a fleet.  Tokens come from a `FakeIdP` over loopback HTTP, and
time is real: Redis TTLs run on Redis's clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from _support import (
    CLIENT_ID,
    CLIENT_SECRET,
    CREDENTIALS,
    SCOPES,
    claims,
    rounded_up,
    wait_until,
)
from tokenfleet import (
    CacheClosedError,
    ClientCredentials,
    ConfigurationError,
    InvalidClientError,
    Token,
    TokenCache,
    UnknownRegionError,
)
from tokenfleet.testing import FakeIdP, RedisServer

NAMESPACE = "tokenfleet"
KEY_PATTERN = re.compile(r"tokenfleet:\{[0-9a-f]{32}\}:(token|lease|failure)")

CacheFactory = Callable[..., Awaitable[TokenCache]]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the module."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client for inspecting Redis, which starts each test empty."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdP]:
    """A fake IdP on a loopback port that knows the primary client."""
    async with FakeIdP(clock=rounded_up(time.time)) as server:
        server.add_client(CLIENT_ID, CLIENT_SECRET, scopes=SCOPES)
        yield server


@pytest.fixture
async def make_cache(
    redis_server: RedisServer, admin: aioredis.Redis
) -> AsyncIterator[CacheFactory]:
    """Start caches on the module's Redis, each with its own client; close them after."""
    async with AsyncExitStack() as stack:

        async def make(**settings: Any) -> TokenCache:
            cache = TokenCache(redis_server.url, **settings)
            return await stack.enter_async_context(cache)

        yield make


async def get(cache: TokenCache, idp: FakeIdP, **kwargs: Any) -> Token:
    """Ask *cache* for a token of the primary client (or as *kwargs* say)."""
    kwargs.setdefault("scopes", SCOPES)
    credentials = kwargs.pop("credentials", CREDENTIALS)
    return await cache.get_token(credentials, token_url=idp.token_url, **kwargs)


async def keys(admin: aioredis.Redis, kind: str = "*") -> list[str]:
    """Every key in Redis whose name ends in ``:<kind>``."""
    return sorted([key.decode() async for key in admin.scan_iter(match=f"*:{kind}")])


async def value_of(admin: aioredis.Redis, name: str) -> bytes:
    """The string value of the key *name*, which must exist."""
    value = await admin.get(name)
    assert isinstance(value, bytes), f"{name} holds {value!r}"
    return value


def digest(access_token: str) -> str:
    """The digest naming *access_token* in entries and notices."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:32]


async def command_count(admin: aioredis.Redis) -> int:
    """The number of commands Redis has run, not counting INFO itself."""
    stats = await admin.info("commandstats")
    return sum(
        entry["calls"] for name, entry in stats.items() if name != "cmdstat_info"
    )


async def script_calls(admin: aioredis.Redis) -> int:
    """The number of Lua scripts Redis has run (each one round trip)."""
    stats = await admin.info("commandstats")
    return sum(
        stats.get(name, {}).get("calls", 0)
        for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


def tokenfleet_tasks() -> list[asyncio.Task[Any]]:
    """Unfinished tasks that run tokenfleet's own code."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        if not task.done() and (
            task.get_name().startswith("tokenfleet-")
            or re.search(r"tokenfleet/_\w+\.py$", filename)
        ):
            found.append(task)

    return found


# Keys ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_keys_are_bounded_and_hash_tagged(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """Huge client ids, scope sets and URLs still give short keys with a hash tag."""
    client_id = "0oa" + "x" * 2000
    scopes = [f"scope.{n:03}.{'s' * 50}" for n in range(100)]
    token_url = f"{idp.token_url}?tenant={'t' * 3000}"
    idp.add_client(client_id, "huge-client-secret", scopes=scopes)
    cache = await make_cache()

    await cache.get_token(
        ClientCredentials(client_id, "huge-client-secret"),
        token_url=token_url,
        scopes=scopes,
    )
    with pytest.raises(InvalidClientError):
        await cache.get_token(
            ClientCredentials(client_id, "not-it"), token_url=token_url, scopes=scopes
        )
    names = await keys(admin)

    assert sorted(name.rsplit(":", 1)[1] for name in names) == ["failure", "token"]
    assert all(KEY_PATTERN.fullmatch(name) for name in names), names
    assert all(len(name) <= 64 for name in names)


@pytest.mark.anyio
async def test_other_secret_never_reads_the_shared_entry(
    make_cache: CacheFactory, idp: FakeIdP
) -> None:
    """A worker with a wrong or rotated secret asks the IdP instead of reading Redis."""
    first, second = await make_cache(), await make_cache()
    original = await get(first, idp)

    with pytest.raises(InvalidClientError):
        await get(second, idp, credentials=ClientCredentials(CLIENT_ID, "guessed"))
    idp.add_client(CLIENT_ID, "rotated-secret", scopes=SCOPES)
    rotated = await get(
        second, idp, credentials=ClientCredentials(CLIENT_ID, "rotated-secret")
    )

    assert rotated.access_token != original.access_token
    assert [request.status for request in idp.requests] == [200, 401, 200]
    assert second.stats().store_hits == 0


@pytest.mark.anyio
async def test_redis_holds_no_secret_and_tokens_only_as_values(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """No key, value or notice holds a secret; tokens appear only as token values."""
    wrong = ClientCredentials(CLIENT_ID, "wrong-secret-4b7e01")
    notices: list[bytes] = []
    pubsub = admin.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(f"{NAMESPACE}:notices")
    cache = await make_cache()

    tokens = [await get(cache, idp)]
    await cache.invalidate(tokens[0])
    tokens.append(await get(cache, idp))
    tokens.append(await get(cache, idp, scopes=["submissions.read"]))
    with pytest.raises(InvalidClientError):
        await get(cache, idp, credentials=wrong)
    # Ignored subscribe confirmations also read as None, so read for a while.
    with anyio.move_on_after(0.3):
        while True:
            message = await pubsub.get_message(timeout=0.3)
            if message is not None:
                notices.append(message["data"])
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    contents = {name: await value_of(admin, name) for name in await keys(admin)}

    secrets = [CLIENT_SECRET.encode(), wrong.client_secret.encode()]
    access = [token.access_token.encode() for token in tokens]
    assert len(contents) == 3
    assert len(notices) >= 4
    for name, value in contents.items():
        assert not any(s in name.encode() or s in value for s in secrets)
        assert not any(s in name.encode() for s in access)
        if not name.endswith(":token"):
            assert not any(s in value for s in access)
    assert not any(s in notice for notice in notices for s in secrets + access)


# Entries -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("expires_in", "ttl"), [(3600, 3540.0), (300, 270.0), (10, 9.0)]
)
async def test_entry_ttl_is_lifetime_minus_margin(
    make_cache: CacheFactory,
    idp: FakeIdP,
    admin: aioredis.Redis,
    expires_in: int,
    ttl: float,
) -> None:
    """Redis expires the entry when only the safety margin of the token is left."""
    idp.expires_in = expires_in
    cache = await make_cache()

    await get(cache, idp)
    (name,) = await keys(admin, "token")
    pttl = await admin.pttl(name)

    assert ttl * 1000 - 500 <= pttl <= ttl * 1000


@pytest.mark.anyio
async def test_entry_payload_is_digest_and_json(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """The stored value is the token's digest, then a JSON body a reader can parse."""
    cache = await make_cache()

    token = await get(cache, idp)
    (name,) = await keys(admin, "token")
    value = await value_of(admin, name)
    body = orjson.loads(value[32:])

    assert value[:32].decode() == digest(token.access_token)
    assert (body["t"], body["y"], body["m"]) == (token.access_token, "Bearer", 60_000)
    # Refresh starts 2700 s into the 3540 s the entry lives, or up to
    # three jitter scales (3 * 180 s) earlier.
    assert 840_000 <= body["r"] <= 1_380_000
    assert token.expires_at == pytest.approx(time.time() + 3600, abs=2)


# The in-process layer --------------------------------------------------------------


@pytest.mark.anyio
async def test_warm_hits_send_no_redis_commands(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """1000 lookups of a warm token leave Redis's command counters untouched."""
    cache = await make_cache()
    token = await get(cache, idp)
    before = await command_count(admin)

    started = time.perf_counter()
    for _ in range(1000):
        assert (await get(cache, idp)).access_token == token.access_token
    elapsed = time.perf_counter() - started

    assert await command_count(admin) == before
    assert cache.stats().local_hits == 1000
    assert elapsed < 0.5


@pytest.mark.anyio
async def test_concurrent_cold_callers_share_one_round_trip(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """500 callers of a cold entry cost one IdP request and a handful of Redis commands."""
    cache = await make_cache()
    # Another entry first, so that loading the scripts is not counted.
    await get(cache, idp, scopes=["submissions.read"])
    idp.latency = 0.05
    before = await script_calls(admin)
    tokens: list[Token] = []

    async def call() -> None:
        tokens.append(await get(cache, idp))

    async with anyio.create_task_group() as group:
        for _ in range(500):
            group.start_soon(call)

    assert len(tokens) == 500
    assert len({token.access_token for token in tokens}) == 1
    assert idp.issued(CLIENT_ID) == 2
    # Cooldown check, lease, commit: one script each, whatever the callers.
    assert await script_calls(admin) - before <= 4


@pytest.mark.anyio
async def test_many_cold_entries_at_once_all_go_through_redis(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """200 tenants looked up at once share Redis; none falls back to a private fetch."""
    tenants = [ClientCredentials(f"tenant-{n:03}", "secret") for n in range(200)]
    for tenant in tenants:
        idp.add_client(tenant.client_id, tenant.client_secret, scopes=SCOPES)
    cache = await make_cache()
    idp.latency = 0.05
    tokens: dict[str, Token] = {}

    async def call(tenant: ClientCredentials) -> None:
        tokens[tenant.client_id] = await get(cache, idp, credentials=tenant)

    async with anyio.create_task_group() as group:
        for tenant in tenants:
            group.start_soon(call, tenant)

    assert all(
        claims(tokens[t.client_id].access_token)["cid"] == t.client_id for t in tenants
    )
    assert cache.stats().fallback_fetches == 0
    assert len(await keys(admin, "token")) == 200


# Waiting for another worker -----------------------------------------------------------


@pytest.mark.anyio
async def test_waiter_wakes_on_the_commit_notice(
    make_cache: CacheFactory, idp: FakeIdP
) -> None:
    """A worker waiting on another's fetch returns as soon as the token is committed."""
    fetcher, waiter = await make_cache(), await make_cache()
    idp.latency = 0.3
    returned: dict[str, float] = {}
    tokens: dict[str, Token] = {}

    async def call(name: str, cache: TokenCache) -> None:
        tokens[name] = await get(cache, idp)
        returned[name] = time.perf_counter()

    async with anyio.create_task_group() as group:
        group.start_soon(call, "fetcher", fetcher)
        await wait_until(lambda: len(idp.requests) == 1, what="fetch to start")
        waiting_since = time.perf_counter()
        group.start_soon(call, "waiter", waiter)

    assert tokens["waiter"].access_token == tokens["fetcher"].access_token
    assert returned["waiter"] - returned["fetcher"] < 0.1
    assert returned["waiter"] - waiting_since > 0.1
    assert waiter.stats().waits >= 1
    assert waiter.stats().idp_fetches == 0
    assert idp.issued(CLIENT_ID) == 1


@pytest.mark.anyio
async def test_refresh_ahead_keeps_callers_from_waiting(
    make_cache: CacheFactory, idp: FakeIdP
) -> None:
    """Across several 3 s lifetimes, no caller after the first waits for the IdP."""
    idp.expires_in = 3
    idp.latency = 0.1
    cache = await make_cache()
    await get(cache, idp)
    latencies = []

    deadline = time.perf_counter() + 6.0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await get(cache, idp)
        latencies.append(time.perf_counter() - started)
        await anyio.sleep(0.02)

    # Any call that waited for the IdP would take its 100 ms latency.
    assert max(latencies) < 0.05
    assert len(latencies) > 100
    assert 3 <= idp.issued(CLIENT_ID) <= 4
    assert cache.stats().refresh_ahead == idp.issued(CLIENT_ID) - 1


# Invalidation -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_invalidate_leaves_a_newer_token_alone(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """Invalidating a token already replaced returns False and keeps the newer one."""
    cache = await make_cache()
    old = await get(cache, idp)
    await cache.invalidate(old)
    new = await get(cache, idp)

    deleted = await cache.invalidate(old)
    served = await get(cache, idp)
    (name,) = await keys(admin, "token")
    stored = await value_of(admin, name)

    assert deleted is False
    assert served.access_token == new.access_token != old.access_token
    assert stored[:32].decode() == digest(new.access_token)
    assert idp.issued(CLIENT_ID) == 2


@pytest.mark.anyio
async def test_invalidate_current_token_makes_the_next_call_fetch(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """Invalidating the current token deletes it, and the next caller gets a new one."""
    cache = await make_cache()
    old = await get(cache, idp)

    deleted = await cache.invalidate(old)
    remaining = await keys(admin, "token")
    new = await get(cache, idp)

    assert deleted is True
    assert remaining == []
    assert new.access_token != old.access_token
    assert idp.issued(CLIENT_ID) == 2


@pytest.mark.anyio
async def test_invalidate_notice_drops_the_token_in_other_workers(
    make_cache: CacheFactory, idp: FakeIdP
) -> None:
    """Another worker forgets an invalidated token when the notice arrives."""
    first, second = await make_cache(), await make_cache()
    old = await get(first, idp)
    assert (await get(second, idp)).access_token == old.access_token
    assert second.stats().local_entries == 1

    await first.invalidate(old)
    await wait_until(lambda: second.stats().local_entries == 0, what="notice")
    new = await get(second, idp)

    assert new.access_token != old.access_token
    assert second.stats().idp_fetches == 1
    assert idp.issued(CLIENT_ID) == 2


# Failure records ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_invalid_client_is_remembered_across_the_fleet(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """After one invalid_client, other workers fail at once without asking the IdP."""
    first, second = await make_cache(), await make_cache()
    wrong = ClientCredentials(CLIENT_ID, "revoked-secret")
    with pytest.raises(InvalidClientError):
        await get(first, idp, credentials=wrong)

    for _ in range(50):
        with pytest.raises(InvalidClientError):
            await get(second, idp, credentials=wrong)
    (failure,) = await keys(admin, "failure")

    assert len(idp.requests) == 1
    assert second.stats().errors == {"InvalidClientError": 50}
    assert second.stats().idp_fetches == 0
    assert 25_000 < await admin.pttl(failure) <= 30_000


# Bad input ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_args", "error"),
    [
        ({}, ConfigurationError),
        ({"stage": "prod"}, ConfigurationError),
        ({"cell": "eu-1"}, ConfigurationError),
        ({"stage": "prod", "cell": "eu-1", "token_url": "IDP"}, ConfigurationError),
        ({"stage": "prod", "cell": "mars-1"}, UnknownRegionError),
        ({"stage": "staging", "cell": "eu-1"}, UnknownRegionError),
        ({"token_url": "http://example.com/v1/token"}, ConfigurationError),
        ({"token_url": "ftp://127.0.0.1/v1/token"}, ConfigurationError),
        ({"token_url": "IDP", "scopes": ["two words"]}, ConfigurationError),
        ({"token_url": "IDP", "scopes": [""]}, ConfigurationError),
        ({"token_url": "IDP", "scopes": ['say"what']}, ConfigurationError),
        ({"token_url": "IDP", "scopes": [7]}, ConfigurationError),
        ({"token_url": "IDP", "scopes": 7}, ConfigurationError),
        ({"token_url": "IDP", "scopes": [["submissions.read"]]}, ConfigurationError),
        ({"stage": ["prod"], "cell": "eu-1"}, UnknownRegionError),
        ({"token_url": ["IDP"]}, ConfigurationError),
        ({"token_url": "IDP", "credentials": None}, ConfigurationError),
        (
            {"token_url": "IDP", "credentials": (CLIENT_ID, CLIENT_SECRET)},
            ConfigurationError,
        ),
    ],
    ids=repr,
)
async def test_bad_requests_change_nothing(
    make_cache: CacheFactory,
    idp: FakeIdP,
    admin: aioredis.Redis,
    request_args: dict[str, Any],
    error: type[Exception],
) -> None:
    """A request the cache refuses reaches neither Redis nor the IdP."""
    cache = await make_cache()
    await get(cache, idp)
    size, requests, stats = await admin.dbsize(), len(idp.requests), cache.stats()
    credentials = request_args.pop("credentials", CREDENTIALS)
    if request_args.get("token_url") == "IDP":
        request_args["token_url"] = idp.token_url

    with pytest.raises(error):
        await cache.get_token(credentials, **request_args)

    assert await admin.dbsize() == size
    assert len(idp.requests) == requests
    assert cache.stats() == stats


# Cancellation --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_caller_leaves_no_lease(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """A caller that gives up mid-fetch leaves a token in Redis and no lease behind."""
    cache = await make_cache()
    idp.latency = 0.3

    with anyio.move_on_after(0.05) as scope:
        await get(cache, idp)
    assert scope.cancelled_caught
    await wait_until(lambda: _has_token(admin), what="token to be committed")

    assert await keys(admin, "lease") == []
    assert claims((await get(cache, idp)).access_token)["cid"] == CLIENT_ID
    assert idp.issued(CLIENT_ID) == 1


async def _has_token(admin: aioredis.Redis) -> bool:
    return bool(await keys(admin, "token"))


@pytest.mark.anyio
async def test_cancelled_caller_does_not_disturb_the_others(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """When one caller of a shared fetch is cancelled, the rest still get the token."""
    cache = await make_cache()
    idp.latency = 0.3
    tokens: list[Token] = []

    async def impatient() -> None:
        with anyio.move_on_after(0.05):
            await get(cache, idp)

    async def patient() -> None:
        tokens.append(await get(cache, idp))

    async with anyio.create_task_group() as group:
        group.start_soon(impatient)
        for _ in range(5):
            group.start_soon(patient)

    assert len(tokens) == 5
    assert len({token.access_token for token in tokens}) == 1
    assert await keys(admin, "lease") == []
    assert idp.issued(CLIENT_ID) == 1


@pytest.mark.anyio
async def test_closing_during_a_fetch_releases_the_lease(
    make_cache: CacheFactory, idp: FakeIdP, admin: aioredis.Redis
) -> None:
    """aclose() mid-fetch frees the lease, ends every task and tells the caller why."""
    cache = await make_cache()
    idp.latency = 0.3
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            await get(cache, idp)
        except CacheClosedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(call)
        await wait_until(lambda: len(idp.requests) == 1, what="fetch to start")
        assert len(await keys(admin, "lease")) == 1
        await cache.aclose()

    assert await keys(admin, "lease") == []
    assert tokenfleet_tasks() == []
    assert [type(exc) for exc in outcome] == [CacheClosedError]


# Stats --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stats_count_store_hits_and_local_hits(
    make_cache: CacheFactory, idp: FakeIdP
) -> None:
    """A token read from Redis counts as a store hit, later lookups as local hits."""
    first, second = await make_cache(), await make_cache()
    await get(first, idp)

    await get(second, idp)
    await get(second, idp)
    stats = second.stats()

    assert (stats.store_hits, stats.local_hits, stats.idp_fetches) == (1, 1, 0)
    assert (stats.waits, stats.errors) == (0, {})
    assert first.stats().idp_fetches == 1
