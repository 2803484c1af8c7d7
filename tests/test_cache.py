"""TokenCache within one process: the memory store, a fake clock, a real IdP.

Every token comes from a `FakeIdP` over loopback HTTP; time only moves when
a test advances the `FakeClock`, so lifetimes of minutes are simulated in
milliseconds.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis

from _support import (
    CLIENT_ID,
    CLIENT_SECRET,
    CREDENTIALS,
    SCOPES,
    FakeClock,
    claims,
    leaked_fields,
    rounded_up,
    wait_until,
)
from tokenfleet import (
    ClientCredentials,
    ConfigurationError,
    IdPUnavailableError,
    InvalidClientError,
    RetryPolicy,
    Token,
    TokenCache,
)
from tokenfleet._endpoint import basic_authorization
from tokenfleet.testing import FakeIdP, ScriptedFailure

# With refresh_jitter=0 and a lifetime of 100 s: the margin is 10 s, so the
# token stops being served at 90 s, and refresh starts at 75 s.
LIFETIME = 100.0
SERVED_FOR = 90.0
REFRESH_AT = 75.0


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test says so."""
    return FakeClock()


@pytest.fixture
async def idp(clock: FakeClock) -> AsyncIterator[FakeIdP]:
    """A fake IdP on the fake clock that knows the primary client."""
    async with FakeIdP(expires_in=LIFETIME, clock=rounded_up(clock.time)) as server:
        server.add_client(CLIENT_ID, CLIENT_SECRET, scopes=SCOPES)
        yield server


@pytest.fixture
async def cache(clock: FakeClock) -> AsyncIterator[TokenCache]:
    """A memory-store cache on the fake clock, with refresh times not jittered."""
    async with TokenCache(
        clock=clock, refresh_jitter=0, rng=random.Random(7)
    ) as started:
        yield started


async def settle() -> None:
    """Let tasks spawned by the last call take their first steps."""
    for _ in range(3):
        await anyio.lowlevel.checkpoint()


async def get(cache: TokenCache, idp: FakeIdP, **kwargs: Any) -> Token:
    """Ask *cache* for a token of the primary client (or as *kwargs* say)."""
    kwargs.setdefault("scopes", SCOPES)
    credentials = kwargs.pop("credentials", CREDENTIALS)
    return await cache.get_token(credentials, token_url=idp.token_url, **kwargs)


# Keys ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_scope_order_and_duplicates_share_one_entry(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """Scope lists that name the same set get the same token from one IdP call."""
    first = await get(cache, idp, scopes=["submissions.write", "submissions.read"])
    second = await get(
        cache, idp, scopes=["submissions.read", "submissions.write", "submissions.read"]
    )
    third = await get(cache, idp, scopes="submissions.write submissions.read")

    assert first.access_token == second.access_token == third.access_token
    assert idp.issued(CLIENT_ID) == 1
    assert first.scopes == SCOPES


@pytest.mark.anyio
async def test_different_scope_sets_get_different_tokens(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """Each scope set is its own entry, with a token granted for that set."""
    read = await get(cache, idp, scopes=["submissions.read"])
    both = await get(cache, idp, scopes=SCOPES)

    assert read.access_token != both.access_token
    assert claims(read.access_token)["scp"] == ["submissions.read"]
    assert sorted(claims(both.access_token)["scp"]) == list(SCOPES)
    assert idp.issued(CLIENT_ID) == 2


@pytest.mark.anyio
async def test_wrong_secret_never_receives_the_cached_token(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """A wrong secret goes to the IdP, which refuses it, instead of hitting the cache."""
    await get(cache, idp)
    impostor = ClientCredentials(CLIENT_ID, "not-the-secret")

    with pytest.raises(InvalidClientError):
        await get(cache, idp, credentials=impostor)

    requests = idp.requests
    assert len(requests) == 2
    assert (requests[1].client_id, requests[1].status) == (CLIENT_ID, 401)


@pytest.mark.anyio
async def test_rotated_secret_gets_a_token_of_its_own(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """After a secret rotation the new secret is sent to the IdP for a fresh token."""
    old = await get(cache, idp)
    idp.add_client(CLIENT_ID, "rotated-secret-2", scopes=SCOPES)

    new = await get(
        cache, idp, credentials=ClientCredentials(CLIENT_ID, "rotated-secret-2")
    )

    assert new.access_token != old.access_token
    assert idp.issued(CLIENT_ID) == 2
    assert [request.status for request in idp.requests] == [200, 200]


# Entries and the in-process layer ------------------------------------------


@pytest.mark.anyio
async def test_expires_at_is_now_plus_lifetime(
    cache: TokenCache, idp: FakeIdP, clock: FakeClock
) -> None:
    """A fresh token's expires_at is the wall-clock time of the fetch plus expires_in."""
    token = await get(cache, idp)

    assert token.expires_at == pytest.approx(clock.time() + LIFETIME, abs=0.01)
    assert token.token_type == "Bearer"
    assert token.authorization == f"Bearer {token.access_token}"


@pytest.mark.anyio
async def test_token_within_its_margin_is_not_served(
    cache: TokenCache, idp: FakeIdP, clock: FakeClock
) -> None:
    """Once only the safety margin is left, the next caller gets a new token."""
    old = await get(cache, idp)
    clock.advance(SERVED_FOR)

    new = await get(cache, idp)

    assert new.access_token != old.access_token
    assert idp.issued(CLIENT_ID) == 2
    assert cache.stats().local_hits == 0
    assert new.expires_at - clock.time() == pytest.approx(LIFETIME, abs=0.01)


@pytest.mark.anyio
async def test_local_layer_is_bounded_and_still_right_per_tenant(
    clock: FakeClock, idp: FakeIdP
) -> None:
    """With 200 tenants and room for 50, every tenant still gets its own token."""
    tenants = [
        ClientCredentials(f"tenant-{n:03}", f"secret-{n:03}") for n in range(200)
    ]
    for tenant in tenants:
        idp.add_client(tenant.client_id, tenant.client_secret, scopes=SCOPES)
    seen: dict[str, str] = {}

    async with TokenCache(clock=clock, local_max_entries=50) as cache:
        for _round in range(2):
            for tenant in tenants:
                token = await get(cache, idp, credentials=tenant)

                assert claims(token.access_token)["cid"] == tenant.client_id
                assert seen.setdefault(tenant.client_id, token.access_token) == (
                    token.access_token
                )
                assert cache.stats().local_entries <= 50

        stats = cache.stats()

    assert idp.issued() == 200
    assert stats.store_hits == 200
    assert stats.local_entries == 50


@pytest.mark.anyio
async def test_concurrent_cold_callers_share_one_fetch(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """500 callers of a cold entry wait for one IdP request and get its token."""
    idp.latency = 0.05
    tokens: list[Token] = []

    async def call() -> None:
        tokens.append(await get(cache, idp))

    async with anyio.create_task_group() as group:
        for _ in range(500):
            group.start_soon(call)

    assert len(tokens) == 500
    assert len({token.access_token for token in tokens}) == 1
    assert idp.issued(CLIENT_ID) == 1
    # Had they queued on the store's lease instead, each would count a wait.
    assert (cache.stats().idp_fetches, cache.stats().waits) == (1, 0)


# Refresh ahead ---------------------------------------------------------------


@pytest.mark.anyio
async def test_refresh_serves_current_token_while_fetching(
    cache: TokenCache, idp: FakeIdP, clock: FakeClock
) -> None:
    """Past the refresh point callers get the current token at once; one refresh runs."""
    old = await get(cache, idp)
    clock.advance(REFRESH_AT + 1)
    idp.latency = 0.2

    latencies = []
    with anyio.fail_after(5):
        while cache.stats().refresh_ahead == 0:
            started = time.perf_counter()
            token = await get(cache, idp)
            latencies.append(time.perf_counter() - started)
            assert token.access_token == old.access_token
            await anyio.sleep(0.01)
    new = await get(cache, idp)

    assert new.access_token != old.access_token
    assert len(latencies) >= 10
    assert max(latencies) < 0.05
    assert idp.issued(CLIENT_ID) == 2
    assert cache.stats().refresh_ahead == 1


@pytest.mark.anyio
async def test_refresh_failure_keeps_serving_current_token(
    clock: FakeClock, idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh the IdP refuses leaves the current token in service until a retry works."""
    caplog.set_level(logging.WARNING, logger="tokenfleet")
    async with TokenCache(
        clock=clock, refresh_jitter=0, retry=RetryPolicy(max_attempts=1)
    ) as cache:
        old = await get(cache, idp)
        clock.advance(REFRESH_AT + 1)
        idp.fail_always(ScriptedFailure(status=503))

        assert (await get(cache, idp)).access_token == old.access_token
        await wait_until(
            lambda: any(r.msg == "entry.refresh_failed" for r in caplog.records),
            what="failed refresh",
        )
        for _ in range(20):
            assert (await get(cache, idp)).access_token == old.access_token
        await settle()
        fetches_in_cooldown = cache.stats().idp_fetches

        idp.fail_always(None)
        clock.advance(3.0)
        assert (await get(cache, idp)).access_token == old.access_token
        await wait_until(lambda: cache.stats().refresh_ahead == 1, what="refresh")
        new = await get(cache, idp)

    assert fetches_in_cooldown == 2
    assert new.access_token != old.access_token
    assert [request.status for request in idp.requests] == [200, 503, 200]
    assert cache.stats().errors == {}


@pytest.mark.anyio
async def test_ten_second_lifetimes_are_fetched_every_seven_seconds_or_so(
    clock: FakeClock, idp: FakeIdP
) -> None:
    """Default settings on 10 s tokens: about one fetch per 7 s, never a refresh loop."""
    idp.expires_in = 10
    least_left = float("inf")

    async with TokenCache(clock=clock, rng=random.Random(11)) as cache:
        for _step in range(400):
            clock.advance(0.25)
            token = await get(cache, idp)
            least_left = min(least_left, token.expires_at - clock.time())

            # No simulated time may pass while a fetch is on the wire, or
            # the fetch would look seconds long to the cache.
            await settle()
            await wait_until(
                lambda: (s := cache.stats()).idp_fetches == 1 + s.refresh_ahead,
                what="fetch in flight to finish",
            )
        stats = cache.stats()

    # Refresh starts at 7.5 s of age minus at most 1.5 s of jitter, and a
    # token is never served in its last second (the margin): 100 s hold
    # between 100 / 9 and 100 / 6 lifetimes after the first fetch.
    assert 12 <= idp.issued(CLIENT_ID) <= 17
    assert stats.refresh_ahead == idp.issued(CLIENT_ID) - 1
    assert least_left >= 1.0 - 1e-6


# Bad input -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "settings",
    [
        {"refresh_ratio": 1.5},
        {"refresh_ratio": 0},
        {"refresh_ratio": float("nan")},
        {"margin_ratio": 0.6},
        {"refresh_ratio": 0.9, "margin_ratio": 0.2},
        {"refresh_jitter": -0.1},
        {"refresh_jitter": 0.5},
        {"max_margin": 0},
        {"failure_ttl": -1.0},
        {"unavailable_cooldown": float("inf")},
        {"redis_timeout": True},
        {"local_max_entries": 0},
        {"local_max_entries": 2.5},
        {"namespace": "two words"},
        {"namespace": "{tagged}"},
        {"namespace": ""},
        {"fingerprint_key": b"too-short"},
        {"request_timeout": 0},
        {"basic_auth": "digest"},
    ],
    ids=repr,
)
async def test_bad_settings_raise_configuration_error(settings: dict[str, Any]) -> None:
    """Each invalid setting is refused when the cache is created."""
    with pytest.raises(ConfigurationError):
        TokenCache(**settings)


@pytest.mark.anyio
async def test_redis_url_and_client_together_are_refused() -> None:
    """Naming Redis twice is a configuration error, not a silent choice."""
    client = aioredis.Redis(host="127.0.0.1", port=1)
    try:
        with pytest.raises(ConfigurationError, match="either redis_url or redis"):
            TokenCache("redis://127.0.0.1:1/0", redis=client)
    finally:
        await client.aclose()


# Secrets ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_reprs_show_neither_secret_nor_token(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """Credentials, tokens, the cache and its stats print without secret or token."""
    token = await get(cache, idp)

    shown = [
        repr(CREDENTIALS),
        repr(token),
        str(token),
        repr(cache),
        repr(cache.stats()),
    ]

    assert all(CLIENT_SECRET not in text for text in shown)
    assert all(token.access_token not in text for text in shown)
    assert CLIENT_ID in repr(token)
    assert "***" in repr(CREDENTIALS)


@pytest.mark.anyio
async def test_logs_hold_neither_secret_nor_token(
    cache: TokenCache,
    idp: FakeIdP,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run through fetch, refresh, invalidation and failures logs no secret or token."""
    caplog.set_level(logging.DEBUG)
    wrong = ClientCredentials(CLIENT_ID, "wrong-secret-9c1e77")
    tokens = [await get(cache, idp)]

    clock.advance(REFRESH_AT + 1)
    await get(cache, idp)
    await wait_until(lambda: cache.stats().refresh_ahead == 1, what="refresh")
    tokens.append(await get(cache, idp))
    await cache.invalidate(tokens[-1])
    tokens.append(await get(cache, idp))
    with pytest.raises(InvalidClientError) as refused:
        await get(cache, idp, credentials=wrong)
    idp.fail_next(ScriptedFailure(status=400))
    with pytest.raises(Exception, match="400"):
        await get(cache, idp, scopes=["submissions.read"])

    secrets = [CLIENT_SECRET, wrong.client_secret]
    secrets += [
        basic_authorization(c, "rfc6749").split()[1] for c in (CREDENTIALS, wrong)
    ]
    secrets += [token.access_token for token in tokens]
    events = {record.msg for record in caplog.records}

    assert leaked_fields(caplog.records, secrets) == []
    assert all(secret not in str(refused.value) for secret in secrets)
    assert {"entry.fetched", "entry.invalidated", "entry.fetch_failed"} <= events
    assert len({token.access_token for token in tokens}) == 3


# Stats -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stats_count_hits_fetches_invalidations_and_errors(
    cache: TokenCache, idp: FakeIdP
) -> None:
    """Each lookup is counted once, under what actually served it."""
    token = await get(cache, idp)
    for _ in range(3):
        await get(cache, idp)
    await cache.invalidate(token)
    await get(cache, idp)
    with pytest.raises(InvalidClientError):
        await get(cache, idp, credentials=ClientCredentials(CLIENT_ID, "wrong"))
    idp.fail_next(ScriptedFailure(status=503, drop=True))
    async with TokenCache(retry=RetryPolicy(max_attempts=1)) as other:
        with pytest.raises(IdPUnavailableError):
            await get(other, idp)
        other_stats = other.stats()

    stats = cache.stats()

    assert (stats.local_hits, stats.store_hits, stats.idp_fetches) == (3, 0, 3)
    assert (stats.invalidations, stats.waits, stats.refresh_ahead) == (1, 0, 0)
    assert stats.errors == {"InvalidClientError": 1}
    assert stats.local_entries == 1
    assert other_stats.errors == {"IdPUnavailableError": 1}
    assert other_stats.idp_fetches == 1
