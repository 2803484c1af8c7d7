"""Scale: hit cost and memory per entry at 10, 1,000 and 100,000 tenants.

For each number of tenants, a first cache fetches every tenant's token from
the fake IdP into a private ``redis-server``; a second cache, traced by
`tracemalloc`, then reads them all into its in-process layer.  Measured:

- the cost of an in-process hit when calls go round every tenant in random
  order, beside an async dict lookup over as many keys (the floor);
- the bytes the in-process layer keeps per entry (allocations still alive,
  the growth from half the tenants to all of them, divided by the tenants
  added, so the cache's fixed overhead drops out);
- Redis ``MEMORY USAGE`` per token key and ``used_memory`` growth per
  tenant, next to the size of the token and of the value stored.

Run it with ``python benchmarks/scale.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio as aioredis

import _common
import tokenfleet
from _common import IdPProcess, Options, Progress, fmt

NAME = "scale"
SCOPES = ["submissions.read"]
FILL_CONCURRENCY = 50
# Setting up 100,000 entries keeps the event loop busy enough that a Redis
# reply can take longer than the default 0.25 s to be read, which would open
# the cache's breaker; the fill and the traced reads are set-up, not what is
# measured, so they get a patient timeout.
SETUP_REDIS_TIMEOUT = 5.0
MEMORY_SAMPLE = 1000
TOKENFLEET_SOURCES = str(Path(tokenfleet.__file__).resolve().parent)


@dataclass(frozen=True)
class Plan:
    """Tenant counts and how long each hit measurement runs."""

    tenants: tuple[int, ...]
    rounds: int
    calls_per_round: int


FULL = Plan(tenants=(10, 1_000, 100_000), rounds=7, calls_per_round=200_000)
QUICK = Plan(tenants=(10, 100), rounds=2, calls_per_round=2_000)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every size, then write scale.json, scale.md and scale.png."""
    options = _common.parse_options(NAME, __doc__.splitlines()[0], argv)
    results = asyncio.run(measure(options))

    markdown = _markdown(results)
    paths = _common.write_results(
        options, NAME, results, markdown, {"": _chart(results)}
    )
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)

    return 0


async def measure(options: Options) -> dict[str, Any]:
    """Fill, trace and time each size in turn."""
    plan = QUICK if options.quick else FULL
    progress = Progress(NAME, 4 * len(plan.tenants))
    rows = []

    with IdPProcess(tenants=max(plan.tenants)) as idp:
        for tenants in plan.tenants:
            with _common.redis_server() as server:
                rows.append(
                    await _measure_size(
                        tenants, plan, server.url, idp.token_url, progress
                    )
                )

    return _common.clean_floats(
        {
            "settings": {
                "rounds": plan.rounds,
                "calls_per_round": plan.calls_per_round,
                "local_max_entries": "2 x tenants (the default, 10,000, would evict at 100,000)",
                "scopes": SCOPES,
            },
            "rows": rows,
        }
    )


async def _measure_size(
    tenants: int, plan: Plan, redis_url: str, token_url: str, progress: Progress
) -> dict[str, Any]:
    credentials = [
        tokenfleet.ClientCredentials(_common.tenant_id(i), _common.tenant_secret(i))
        for i in range(tenants)
    ]
    raw = aioredis.Redis.from_url(redis_url)
    try:
        redis_before = (await raw.info("memory"))["used_memory"]
        token_chars = await _fill(credentials, redis_url, token_url)
        redis_after = (await raw.info("memory"))["used_memory"]
        progress.step(f"{tenants:,} tenants: fetched every token into Redis")
        redis_memory = await _redis_memory(raw, tenants, redis_before, redis_after)
        progress.step(
            f"{tenants:,} tenants: Redis keeps {redis_memory['memory_usage_per_key']:.0f} bytes per token key"
        )
    finally:
        await raw.aclose()

    cache = tokenfleet.TokenCache(
        redis_url,
        local_max_entries=max(10_000, 2 * tenants),
        redis_timeout=SETUP_REDIS_TIMEOUT,
    )
    await cache.start()
    try:
        local_memory = await _trace_local_layer(cache, credentials, token_url)
        progress.step(
            f"{tenants:,} tenants: the in-process layer keeps {local_memory['bytes_per_entry']:.0f} bytes per entry"
        )
        hits = await _time_hits(cache, credentials, token_url, plan)
        progress.step(
            f"{tenants:,} tenants: hit {hits['tokenfleet_ns']:.0f} ns, dict floor {hits['floor_ns']:.0f} ns"
        )
    finally:
        await cache.aclose()

    return {
        "tenants": tenants,
        "token_chars": token_chars,
        "hit": hits,
        "in_process": local_memory,
        "redis": redis_memory,
    }


async def _fill(
    credentials: list[tokenfleet.ClientCredentials], redis_url: str, token_url: str
) -> int:
    """Fetch every tenant's token through a first cache; return a token's length."""
    lengths: list[int] = []
    async with tokenfleet.TokenCache(
        redis_url,
        local_max_entries=max(10_000, 2 * len(credentials)),
        redis_timeout=SETUP_REDIS_TIMEOUT,
    ) as filler:

        async def fetch_every(share: Sequence[tokenfleet.ClientCredentials]) -> None:
            for creds in share:
                token = await filler.get_token(
                    creds, token_url=token_url, scopes=SCOPES
                )
                lengths.append(len(token.access_token))

        await asyncio.gather(
            *(
                fetch_every(credentials[i::FILL_CONCURRENCY])
                for i in range(FILL_CONCURRENCY)
            )
        )

    return max(lengths)


async def _redis_memory(
    raw: aioredis.Redis, tenants: int, before: int, after: int
) -> dict[str, Any]:
    keys: list[bytes] = []
    async for key in raw.scan_iter(match="tokenfleet:*:token", count=1000):
        keys.append(key)
        if len(keys) >= MEMORY_SAMPLE:
            break
    usage = [await raw.memory_usage(key, samples=0) or 0 for key in keys]
    values = [len(await raw.get(key) or b"") for key in keys[:100]]

    return {
        "memory_usage_per_key": sum(usage) / len(usage),
        "used_memory_growth_per_tenant": (after - before) / tenants,
        "value_bytes": sum(values) / len(values),
        "key_bytes": sum(len(k) for k in keys) / len(keys),
        "keys_sampled": len(keys),
    }


async def _trace_local_layer(
    cache: tokenfleet.TokenCache,
    credentials: list[tokenfleet.ClientCredentials],
    token_url: str,
) -> dict[str, Any]:
    """Bytes kept per entry: growth from half the tenants to all of them."""
    half = len(credentials) // 2

    async def read(share: Sequence[tokenfleet.ClientCredentials]) -> None:
        for creds in share:
            await cache.get_token(creds, token_url=token_url, scopes=SCOPES)

    async def read_all(group: Sequence[tokenfleet.ClientCredentials]) -> None:
        await asyncio.gather(
            *(read(group[i::FILL_CONCURRENCY]) for i in range(FILL_CONCURRENCY))
        )

    # The first half warms every connection and lazily built structure, so
    # that the traced growth is entries only; the second half is read one at
    # a time, so that no new connection is opened while tracing.
    await read_all(credentials[:half])
    gc.collect()
    tracemalloc.start()
    try:
        first = tracemalloc.take_snapshot()
        await read(credentials[half:])
        gc.collect()
        second = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    added = len(credentials) - half
    everything = sum(stat.size_diff for stat in second.compare_to(first, "filename"))
    ours = [tracemalloc.Filter(True, f"{TOKENFLEET_SOURCES}/*")]
    in_tokenfleet = sum(
        stat.size_diff
        for stat in second.filter_traces(ours).compare_to(
            first.filter_traces(ours), "filename"
        )
    )
    by_line = second.compare_to(first, "lineno")[:8]

    return {
        "bytes_per_entry": everything / added,
        "bytes_per_entry_allocated_in_tokenfleet": in_tokenfleet / added,
        "entries_added": added,
        "top_lines": [
            {
                "where": _where(s.traceback[0].filename, s.traceback[0].lineno),
                "bytes_per_entry": s.size_diff / added,
            }
            for s in by_line
        ],
    }


def _where(filename: str, lineno: int) -> str:
    path = Path(filename)
    package = path.parent.name if path.parent.name not in ("", "site-packages") else ""
    return f"{package}/{path.name}:{lineno}" if package else f"{path.name}:{lineno}"


async def _time_hits(
    cache: tokenfleet.TokenCache,
    credentials: list[tokenfleet.ClientCredentials],
    token_url: str,
    plan: Plan,
) -> dict[str, Any]:
    """Hits over every tenant in random order, interleaved with the dict floor."""
    order = list(range(len(credentials)))
    random.Random(7).shuffle(order)
    repeats = -(-plan.calls_per_round // len(order))
    sequence = (order * repeats)[: plan.calls_per_round]

    tokens = {f"{i:032x}": f"token-{i}" for i in range(len(credentials))}
    keys = list(tokens)

    async def lookup(key: str) -> object:
        return tokens[key]

    floor_calls = [functools.partial(lookup, keys[i]) for i in sequence]
    cache_calls = [
        functools.partial(
            cache.get_token, credentials[i], token_url=token_url, scopes=SCOPES
        )
        for i in sequence
    ]
    before = cache.stats().local_hits

    floor_rates, cache_rates = [], []
    for _ in range(plan.rounds):
        floor_rates.append(await _sweep(floor_calls))
        cache_rates.append(await _sweep(cache_calls))
    hits = cache.stats().local_hits - before

    floor_ns = 1e9 / sorted(floor_rates)[len(floor_rates) // 2]
    cache_ns = 1e9 / sorted(cache_rates)[len(cache_rates) // 2]
    return {
        "tokenfleet_ns": cache_ns,
        "floor_ns": floor_ns,
        "ratio": cache_ns / floor_ns,
        "all_in_process": hits == plan.rounds * len(cache_calls),
    }


async def _sweep(calls: Sequence[Callable[[], Awaitable[object]]]) -> float:
    clock = time.perf_counter_ns
    gc.collect()
    started = clock()
    for call in calls:
        await call()
    return len(calls) * 1e9 / max(clock() - started, 1)


def _markdown(results: dict[str, Any]) -> str:
    rows = [
        [
            f"{row['tenants']:,}",
            fmt(row["hit"]["tokenfleet_ns"], 0),
            fmt(row["hit"]["floor_ns"], 0),
            f"{row['hit']['ratio']:.2f}x",
            fmt(row["in_process"]["bytes_per_entry"], 0),
            fmt(row["in_process"]["bytes_per_entry_allocated_in_tokenfleet"], 0),
            fmt(row["redis"]["memory_usage_per_key"], 0),
            fmt(row["redis"]["used_memory_growth_per_tenant"], 0),
            f"{row['token_chars']:,}",
            fmt(row["redis"]["value_bytes"], 0),
        ]
        for row in results["rows"]
    ]
    table = _common.markdown_table(
        [
            "tenants",
            "hit ns",
            "dict floor ns",
            "hit / floor",
            "in-process bytes/entry",
            "of which allocated by tokenfleet",
            "Redis MEMORY USAGE bytes/key",
            "Redis used_memory bytes/tenant",
            "token chars",
            "Redis value bytes",
        ],
        rows,
    )
    largest = results["rows"][-1]
    top = ", ".join(
        f"{line['where']} {line['bytes_per_entry']:.0f} B"
        for line in largest["in_process"]["top_lines"][:5]
    )

    return (
        "### Scale: hit cost and memory per entry\n\n"
        + table
        + "\n- Hits go round every tenant in random order; cost = 1 / calls per second, median of "
        f"{results['settings']['rounds']} rounds interleaved with the floor.\n"
        "- In-process bytes per entry: allocations still alive after reading the second half of the "
        "tenants, divided by their number (tracemalloc).\n"
        f"- Largest allocation sites per entry at {largest['tenants']:,} tenants: {top}.\n"
    )


def _chart(results: dict[str, Any]) -> Any:
    figure = _common.new_figure(9, 3.6)
    cost_ax, memory_ax = figure.subplots(1, 2)
    tenants = [row["tenants"] for row in results["rows"]]

    cost_ax.plot(
        tenants,
        [r["hit"]["tokenfleet_ns"] for r in results["rows"]],
        "o-",
        label="tokenfleet hit",
    )
    cost_ax.plot(
        tenants,
        [r["hit"]["floor_ns"] for r in results["rows"]],
        "s--",
        label="async dict lookup",
    )
    cost_ax.set_xscale("log")
    cost_ax.set_ylim(bottom=0)
    cost_ax.set_xlabel("tenants")
    cost_ax.set_ylabel("ns per call")
    cost_ax.legend(fontsize=7)

    memory_ax.plot(
        tenants,
        [r["in_process"]["bytes_per_entry"] for r in results["rows"]],
        "o-",
        label="in-process layer",
    )
    memory_ax.plot(
        tenants,
        [r["redis"]["memory_usage_per_key"] for r in results["rows"]],
        "s-",
        label="Redis MEMORY USAGE",
    )
    memory_ax.plot(
        tenants,
        [r["token_chars"] for r in results["rows"]],
        "k--",
        label="token itself",
    )
    memory_ax.set_xscale("log")
    memory_ax.set_ylim(bottom=0)
    memory_ax.set_xlabel("tenants")
    memory_ax.set_ylabel("bytes per entry")
    memory_ax.legend(fontsize=7)

    return figure


if __name__ == "__main__":
    sys.exit(main())
