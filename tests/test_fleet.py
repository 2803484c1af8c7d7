"""Whole fleets of real worker processes against a private Redis and a fake IdP.

The async tests run `run_fleet` in a thread while the fake IdP answers on
their event loop; the module fixture runs the IdP in a thread of its own.
Either way the IdP's own count of issued tokens is the measure.  The expected counts are derived from the refresh schedule below,
not measured, so a cache that fetched once per process, or let a token run
out before refreshing it, fails them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest

from tokenfleet._fleet import (
    FleetResult,
    FleetSpec,
    register_tenants,
    rounded_up_time,
    run_fleet,
)
from tokenfleet.testing import FakeIdP, RedisServer

IDP_LATENCY = 0.1
LIFETIME = 3.0
REFRESH_RATIO = 0.75
REFRESH_JITTER = 0.05
INTERVAL = 0.01
# What a loaded 2-core machine may add to a fetch, to a Redis round trip and
# to the moment a task notices that a token is due.
SLACK = 0.15


@dataclass(frozen=True)
class FetchBounds:
    """The fewest and most tokens one cache needs for one tenant in a run."""

    fewest: int
    most: int


def fetch_bounds(duration: float) -> FetchBounds:
    """Bound the fetches of one tenant over *duration* from the refresh schedule.

    A token fetched in f seconds is due for refresh once it is
    ``REFRESH_RATIO * LIFETIME - early`` old, counted from its commit, with
    ``early`` drawn from [0, 3 * max(f, REFRESH_JITTER * LIFETIME)]; the next
    fetch starts with the first call after that.  The first fetch is at 0.
    """
    longest_fetch = IDP_LATENCY + SLACK
    most_early = 3 * max(longest_fetch, REFRESH_JITTER * LIFETIME)
    shortest_cycle = IDP_LATENCY + REFRESH_RATIO * LIFETIME - most_early
    longest_cycle = longest_fetch + REFRESH_RATIO * LIFETIME + INTERVAL + SLACK

    return FetchBounds(
        fewest=1 + math.floor((duration - SLACK) / longest_cycle),
        most=math.ceil(duration / shortest_cycle),
    )


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server, stopped after the test."""
    with RedisServer() as server:
        yield server


def fake_idp() -> FakeIdP:
    """The IdP of every fleet here; its exp claims never undercut expires_in."""
    return FakeIdP(latency=IDP_LATENCY, expires_in=LIFETIME, clock=rounded_up_time)


def several_lifetimes(token_url: str, redis_url: str | None) -> FleetSpec:
    """4 processes x 20 tasks x 3 tenants for 10 s of 3-second tokens."""
    return FleetSpec(
        token_url=token_url,
        redis_url=redis_url,
        processes=4,
        tasks=20,
        tenants=3,
        duration=10.0,
        interval=INTERVAL,
        expires_in=LIFETIME,
        cache_options={
            "refresh_ratio": REFRESH_RATIO,
            "refresh_jitter": REFRESH_JITTER,
        },
    )


async def run(spec: FleetSpec) -> FleetResult:
    """Run *spec* in a thread so that the IdP keeps answering on this loop."""
    return await anyio.to_thread.run_sync(run_fleet, spec)


@pytest.mark.fleet
@pytest.mark.anyio
async def test_cold_fleet_on_one_key_makes_one_idp_call(
    redis_server: RedisServer,
) -> None:
    """400 callers in 8 processes starting together get one token, fetched once."""
    async with FakeIdP(latency=IDP_LATENCY) as idp:
        spec = FleetSpec(
            token_url=idp.token_url,
            redis_url=redis_server.url,
            processes=8,
            tasks=50,
            calls=10,
            duration=None,
            interval=INTERVAL,
        )
        register_tenants(idp, spec)

        result = await run(spec)

    assert idp.issued() == 1
    assert result.failures == {}
    assert result.calls == 8 * 50 * 10
    assert result.stats.idp_fetches == 1


@dataclass(frozen=True)
class SharedRun:
    """A Redis-backed fleet run over several lifetimes, and what the IdP issued."""

    spec: FleetSpec
    result: FleetResult
    issued: dict[str, int]


@pytest.fixture(scope="module")
def shared_run() -> Iterator[SharedRun]:
    """Run the several-lifetimes fleet once on Redis for the tests that read it."""
    idp = fake_idp()
    with RedisServer() as server, idp.running_in_thread():
        spec = several_lifetimes(idp.token_url, server.url)
        register_tenants(idp, spec)

        result = run_fleet(spec)
        issued = {c.client_id: idp.issued(c.client_id) for c in spec.credentials()}

        yield SharedRun(spec, result, issued)


@pytest.mark.fleet
def test_shared_fleet_fetches_once_per_lifetime_whatever_its_size(
    shared_run: SharedRun,
) -> None:
    """Over several lifetimes each tenant costs what one process alone would."""
    spec, issued = shared_run.spec, shared_run.issued
    assert spec.duration is not None
    bounds = fetch_bounds(spec.duration)

    for client_id, count in issued.items():
        assert bounds.fewest <= count <= bounds.most, (client_id, count, bounds)
    assert sum(issued.values()) <= spec.tenants * bounds.most
    assert shared_run.result.stats.idp_fetches == sum(issued.values())


@pytest.mark.fleet
def test_shared_fleet_serves_no_failure_and_no_expired_token(
    shared_run: SharedRun,
) -> None:
    """Across refreshes every call gets a token that has not expired."""
    result = shared_run.result

    assert result.calls > 0
    assert result.failures == {}
    assert result.expired == 0


@pytest.mark.fleet
def test_warm_callers_never_wait_for_the_idp(shared_run: SharedRun) -> None:
    """Once a task has its first token, refreshes happen behind its back."""
    spec, result = shared_run.spec, shared_run.result
    refreshes = sum(shared_run.issued.values()) - spec.tenants

    warm = result.warm_latency
    assert refreshes >= spec.tenants
    assert warm.count > 0.9 * result.calls
    assert warm.p99_ms < 10
    assert warm.max_ms < IDP_LATENCY * 1000


@pytest.mark.fleet
@pytest.mark.anyio
async def test_without_redis_every_process_fetches_for_itself() -> None:
    """The baseline: per-process caches cost the IdP one fetch per process."""
    async with fake_idp() as idp:
        spec = several_lifetimes(idp.token_url, None)
        register_tenants(idp, spec)

        result = await run(spec)
        issued = {c.client_id: idp.issued(c.client_id) for c in spec.credentials()}

    assert spec.duration is not None
    bounds = fetch_bounds(spec.duration)
    for client_id, count in issued.items():
        assert (
            spec.processes * bounds.fewest <= count <= spec.processes * bounds.most
        ), (client_id, count, bounds)
    assert result.failures == {}
    assert result.expired == 0
