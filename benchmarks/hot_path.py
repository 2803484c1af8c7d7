"""Hot path: what one `get_token` costs, next to the alternatives and the floors.

Three situations, each measured beside a floor no cache can beat and beside
other ways of holding a token:

- in-process hit: tokenfleet's in-process layer; an async function reading
  a dict (the floor); Authlib's ``AsyncOAuth2Client`` holding its own token;
- Redis hit (the in-process layer emptied before each call, the token in
  Redis): tokenfleet; a raw redis-py ``GET`` of the very value tokenfleet
  stores (the floor); cashews on its Redis backend, with and without its
  lock (a cache with no in-process layer);
- cold miss (no token anywhere): tokenfleet; one token request with no cache
  around it (the floor); Authlib ``fetch_token``; cashews.

Everything runs in one event loop, one call at a time, against a private
``redis-server`` and the fake IdP (no added latency) in a child process.
Run it with ``python benchmarks/hot_path.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

import _common
import tokenfleet
from _common import IdPProcess, Options, Progress, fmt

NAME = "hot_path"
SCOPES = ["submissions.read"]
TARGET_LOCAL = 3.0
TARGET_REDIS = 1.3


@dataclass
class Alternative:
    """One way of getting a token, measured in one situation."""

    situation: str
    name: str
    call: Callable[[], Awaitable[object]]
    before: Callable[[], Awaitable[object] | None] | None = None
    floor: bool = False
    samples: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Sizes:
    """How many calls each round makes, per situation."""

    rounds: int
    tight: dict[str, int]
    timed: dict[str, int]


FULL = Sizes(
    rounds=7,
    tight={"in-process hit": 100_000, "Redis hit": 3_000, "cold miss": 0},
    timed={"in-process hit": 40_000, "Redis hit": 3_000, "cold miss": 250},
)
QUICK = Sizes(
    rounds=2,
    tight={"in-process hit": 2_000, "Redis hit": 100, "cold miss": 0},
    timed={"in-process hit": 2_000, "Redis hit": 100, "cold miss": 10},
)
SITUATIONS = ("in-process hit", "Redis hit", "cold miss")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, then write hot_path.json, hot_path.md and hot_path.png."""
    options = _common.parse_options(NAME, __doc__.splitlines()[0], argv)
    results = asyncio.run(_measure(options))

    markdown = _markdown(results)
    figure = _chart(results)
    paths = _common.write_results(options, NAME, results, markdown, {"": figure})
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)

    return 0


async def _measure(options: Options) -> dict[str, Any]:
    sizes = QUICK if options.quick else FULL
    with _common.redis_server() as server, IdPProcess(tenants=1) as idp:
        async with _Contenders(server.url, idp.token_url) as contenders:
            alternatives = await contenders.alternatives()
            progress = Progress(NAME, sizes.rounds * len(alternatives) + 1)
            overhead = await _common.clock_overhead_ns()
            progress.step(f"clock read costs {overhead:.0f} ns per timed call")

            for round_no in range(1, sizes.rounds + 1):
                for alt in alternatives:
                    await _measure_round(alt, sizes)
                    progress.step(
                        f"round {round_no}/{sizes.rounds}: {alt.situation}, {alt.name}"
                    )

            payload_bytes = contenders.payload_bytes
            token_chars = contenders.token_chars

    return {
        "settings": {
            "rounds": sizes.rounds,
            "tight_calls_per_round": sizes.tight,
            "timed_calls_per_round": sizes.timed,
            "scopes": SCOPES,
            "redis_payload_bytes": payload_bytes,
            "token_chars": token_chars,
            "idp_latency_s": 0.0,
        },
        "clock_overhead_ns": overhead,
        "targets": {
            "in_process_hit_vs_dict": TARGET_LOCAL,
            "redis_hit_vs_get": TARGET_REDIS,
        },
        "rows": _summarise(alternatives),
    }


async def _measure_round(alt: Alternative, sizes: Sizes) -> None:
    # A few untimed calls first, so connection set-up and caches of the
    # interpreter are not charged to the first sample.
    await _common.timed_calls(alt.call, 5, alt.before)
    gc.collect()

    tight = sizes.tight[alt.situation]
    if tight and alt.before is None:
        alt.rates.append(await _common.calls_per_second(alt.call, tight))
    elif tight:
        # The layer-emptying step is part of this loop; it is a dict clear,
        # a few tens of nanoseconds next to a Redis round trip.
        async def with_before() -> None:
            assert alt.before is not None
            pending = alt.before()
            if pending is not None:
                await pending
            await alt.call()

        alt.rates.append(await _common.calls_per_second(with_before, tight))

    alt.samples.extend(
        await _common.timed_calls(alt.call, sizes.timed[alt.situation], alt.before)
    )


class _Contenders:
    """Everything the alternatives need, set up once and closed at the end."""

    def __init__(self, redis_url: str, token_url: str) -> None:
        self.redis_url = redis_url
        self.token_url = token_url
        self.credentials = tokenfleet.ClientCredentials(
            _common.tenant_id(0), _common.tenant_secret(0)
        )
        self.payload_bytes = 0
        self.token_chars = 0
        self._closers: list[Callable[[], Awaitable[object]]] = []

    async def __aenter__(self) -> _Contenders:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for close in reversed(self._closers):
            await close()

    async def alternatives(self) -> list[Alternative]:
        """Build every alternative, warmed up, in measuring order."""
        local = await self._tokenfleet()
        authlib = await self._authlib()
        cashews_locked = await self._cashews(lock=True)
        cashews_plain = await self._cashews(lock=False)
        floors = await self._floors()

        return [
            floors["dict"],
            local["hit"],
            authlib["hit"],
            floors["get"],
            floors["timed get"],
            local["redis"],
            cashews_plain["hit"],
            cashews_locked["hit"],
            floors["fetch"],
            local["miss"],
            authlib["miss"],
            cashews_plain["miss"],
            cashews_locked["miss"],
        ]

    async def _tokenfleet(self) -> dict[str, Alternative]:
        cache = tokenfleet.TokenCache(redis_url=self.redis_url)
        await cache.start()
        self._closers.append(cache.aclose)
        creds, url = self.credentials, self.token_url

        token = await cache.get_token(creds, token_url=url, scopes=SCOPES)
        self.token_chars = len(token.access_token)
        raw = aioredis.Redis.from_url(self.redis_url)
        self._closers.append(raw.aclose)
        (self._token_key,) = await raw.keys("tokenfleet:*:token")
        self.payload_bytes = len(await raw.get(self._token_key) or b"")

        # A partial, not a wrapping coroutine: the floors are called the same
        # way, so neither side pays for an extra frame.
        get = functools.partial(cache.get_token, creds, token_url=url, scopes=SCOPES)

        # Emptying the in-process layer reaches into the cache's internals on
        # purpose: it is the only way to make every call a Redis hit.
        def forget_local() -> None:
            cache._local.clear()

        async def forget_everywhere() -> None:
            cache._local.clear()
            await raw.delete(self._token_key)

        return {
            "hit": Alternative("in-process hit", "tokenfleet", get),
            "redis": Alternative("Redis hit", "tokenfleet", get, before=forget_local),
            "miss": Alternative(
                "cold miss", "tokenfleet", get, before=forget_everywhere
            ),
        }

    async def _authlib(self) -> dict[str, Alternative]:
        # Authlib 1.9 warns, on import, that its httpx module is deprecated,
        # after installing an 'always' filter for its warnings: import that
        # first, so the 'ignore' below comes ahead of it.
        import authlib.deprecate  # noqa: F401

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The httpx module is deprecated")
            from authlib.integrations.httpx_client import AsyncOAuth2Client

        client = AsyncOAuth2Client(
            client_id=self.credentials.client_id,
            client_secret=self.credentials.client_secret,
            token_endpoint=self.token_url,
            grant_type="client_credentials",
            scope=" ".join(SCOPES),
        )
        self._closers.append(client.aclose)
        await client.fetch_token()

        # What Authlib's own request() does before each call: take the
        # client's lock, check expiry, then use the token it holds.
        async def hit() -> object:
            await client.ensure_active_token(client.token)
            return client.token["access_token"]

        async def fetch() -> object:
            return await client.fetch_token()

        return {
            "hit": Alternative("in-process hit", "Authlib AsyncOAuth2Client", hit),
            "miss": Alternative("cold miss", "Authlib fetch_token", fetch),
        }

    async def _cashews(self, *, lock: bool) -> dict[str, Alternative]:
        from cashews import Cache

        cache = Cache()
        cache.setup(self.redis_url)

        async def close() -> None:
            # cashews closes its redis-py client with the deprecated close();
            # that warning is theirs, and must not fail a run with -W error.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", "Call to deprecated close", DeprecationWarning
                )
                await cache.close()

        self._closers.append(close)
        endpoint = tokenfleet.TokenEndpointClient()
        self._closers.append(endpoint.aclose)
        creds, url = self.credentials, self.token_url
        key = f"bench:{'locked' if lock else 'plain'}:{{client_id}}"

        @cache(ttl=3000, key=key, lock=lock)
        async def token_for(client_id: str) -> str:
            response = await endpoint.fetch(creds, url, tuple(SCOPES))
            return response.access_token

        get = functools.partial(token_for, creds.client_id)

        async def forget() -> None:
            await cache.delete(key.format(client_id=creds.client_id))

        await get()
        label = "cashews, Redis, lock" if lock else "cashews, Redis, no lock"

        return {
            "hit": Alternative("Redis hit", label, get),
            "miss": Alternative("cold miss", label, get, before=forget),
        }

    async def _floors(self) -> dict[str, Alternative]:
        tokens = {"token": "x" * self.token_chars}

        async def lookup(key: str) -> object:
            return tokens[key]

        from_dict = functools.partial(lookup, "token")

        raw = aioredis.Redis.from_url(self.redis_url)
        self._closers.append(raw.aclose)
        token_key = self._token_key

        get = functools.partial(raw.get, token_key)

        # The same GET on a client configured as tokenfleet configures its
        # own (socket timeouts, no retries): the share of the Redis-hit cost
        # that comes from redis-py's timeout handling rather than the cache.
        timed = aioredis.Redis.from_url(
            self.redis_url,
            socket_connect_timeout=0.25,
            socket_timeout=0.25,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._closers.append(timed.aclose)
        timed_get = functools.partial(timed.get, token_key)

        endpoint = tokenfleet.TokenEndpointClient()
        self._closers.append(endpoint.aclose)
        creds, url = self.credentials, self.token_url
        scopes = tuple(SCOPES)

        fetch = functools.partial(endpoint.fetch, creds, url, scopes)

        await get()
        await timed_get()
        await fetch()

        return {
            "dict": Alternative(
                "in-process hit", "floor: async dict lookup", from_dict, floor=True
            ),
            "get": Alternative(
                "Redis hit", "floor: redis-py GET, same value", get, floor=True
            ),
            "timed get": Alternative(
                "Redis hit", "reference: GET with socket timeouts", timed_get
            ),
            "fetch": Alternative(
                "cold miss", "floor: one token request, no cache", fetch, floor=True
            ),
        }


def _summarise(alternatives: list[Alternative]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    floors = {alt.situation: alt for alt in alternatives if alt.floor}

    for alt in alternatives:
        latency = _common.latency_summary(alt.samples)
        # Misses have no tight loop: their rate is one over the mean latency.
        rate = _median(alt.rates) if alt.rates else 1e6 / latency["mean"]
        floor = floors[alt.situation]
        floor_latency = _common.latency_summary(floor.samples)
        floor_rate = (
            _median(floor.rates) if floor.rates else 1e6 / floor_latency["mean"]
        )
        rows.append(
            {
                "situation": alt.situation,
                "name": alt.name,
                "floor": alt.floor,
                "calls_per_second": rate,
                "cost_us": 1e6 / rate,
                "latency_us": latency,
                "cost_vs_floor": floor_rate / rate,
                "p50_vs_floor": latency["p50"] / floor_latency["p50"],
                "p99_vs_floor": latency["p99"] / floor_latency["p99"],
            }
        )

    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    rows = [
        [
            row["situation"],
            row["name"],
            fmt(row["calls_per_second"], 0),
            fmt(row["cost_us"], 2),
            fmt(row["latency_us"]["p50"], 2),
            fmt(row["latency_us"]["p99"], 2),
            fmt(row["latency_us"]["p99.9"], 2),
            f"{row['cost_vs_floor']:.2f}x",
            f"{row['p50_vs_floor']:.2f}x",
        ]
        for row in results["rows"]
    ]
    table = _common.markdown_table(
        [
            "situation",
            "alternative",
            "calls/s",
            "cost µs",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "cost / floor",
            "p50 / floor",
        ],
        rows,
    )
    by_name = {(r["situation"], r["name"]): r for r in results["rows"]}
    local = by_name[("in-process hit", "tokenfleet")]
    redis_hit = by_name[("Redis hit", "tokenfleet")]

    return (
        f"### Hot path: one `get_token`, one task ({settings['rounds']} interleaved rounds)\n\n"
        + table
        + "\n"
        + f"- In-process hit: {local['cost_vs_floor']:.2f}x the dict floor per call "
        + f"(target {TARGET_LOCAL:.1f}x: {'met' if local['cost_vs_floor'] <= TARGET_LOCAL else 'missed'}); "
        + f"p50 {local['p50_vs_floor']:.2f}x.\n"
        + f"- Redis hit: {redis_hit['cost_vs_floor']:.2f}x the raw GET per call "
        + f"(target {TARGET_REDIS:.1f}x: {'met' if redis_hit['cost_vs_floor'] <= TARGET_REDIS else 'missed'}); "
        + f"p50 {redis_hit['p50_vs_floor']:.2f}x.\n"
        + "- Cost = 1 / calls per second of a tight loop (misses: the mean latency). "
        + f"Percentiles include the clock read, {results['clock_overhead_ns']:.0f} ns. "
        + f"Redis value {settings['redis_payload_bytes']} bytes, token {settings['token_chars']} characters.\n"
    )


def _chart(results: dict[str, Any]) -> Any:
    rows = results["rows"]
    figure = _common.new_figure(8, 5.5)
    ax = figure.subplots()
    colours = dict(zip(SITUATIONS, ("#4477aa", "#228833", "#ee6677"), strict=True))
    positions = list(range(len(rows)))

    for position, row in zip(positions, rows, strict=True):
        ax.barh(
            position,
            row["latency_us"]["p50"],
            color=colours[row["situation"]],
            alpha=0.5 if row["floor"] else 1.0,
        )
    ax.scatter(
        [r["latency_us"]["p99"] for r in rows],
        positions,
        marker="|",
        s=120,
        color="black",
        label="p99",
        zorder=3,
    )
    ax.set_yticks(
        positions, [f"{r['situation']}: {r['name']}" for r in rows], fontsize=7
    )
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(left=0.05)
    ax.set_xlabel("µs per get_token (bar: p50, tick: p99; pale bars: floors)")
    ax.legend(fontsize=7, loc="lower right")

    return figure


if __name__ == "__main__":
    sys.exit(main())
