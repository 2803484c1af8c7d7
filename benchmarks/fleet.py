"""Fleet: IdP calls and caller latency of P processes x T tasks x K tenants.

Real worker processes call `get_token` over several token lifetimes against
the fake IdP (50 to 200 ms per token request) and a private
``redis-server``.  Each size runs with tokenfleet on Redis and with the
baselines that give one token per process: the same cache without Redis,
and (where the machine can hold that many HTTP clients) one Authlib client
per tenant per process.

Reported: IdP calls per key per token generation (target 1.00), per key per
lifetime of wall-clock time, and latency percentiles in steady state and
within the second around each token's expiry (target: no worse).
Run it with ``python benchmarks/fleet.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from _common import IdPProcess, Options, Progress, ms
from _fleet_run import Fleet, FleetOutcome, idp_summary, run_fleet

NAME = "fleet"


@dataclass(frozen=True)
class Client:
    """A way of getting tokens in each worker: a worker mode and its options."""

    mode: str
    label: str
    colour: str
    cache_options: dict[str, Any] = field(default_factory=dict)


CLIENTS = {
    "tokenfleet": Client("tokenfleet", "tokenfleet (Redis)", "#4477aa"),
    # The same cache with a patient Redis timeout: shows what the default
    # 0.25 s does when a saturated machine delays every reply.
    "tokenfleet-2s": Client(
        "tokenfleet",
        "tokenfleet (Redis), redis_timeout=2 s",
        "#66ccee",
        {"redis_timeout": 2.0},
    ),
    "per-process": Client("per-process", "per-process cache", "#ccbb44"),
    "authlib": Client("authlib", "Authlib, client per tenant", "#ee6677"),
}


@dataclass(frozen=True)
class Size:
    """One fleet size and how hard its tasks call."""

    processes: int
    tasks: int
    tenants: int
    interval: float
    duration: float
    modes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Everything a run of this benchmark does."""

    expires_in: float
    latency: tuple[float, float]
    sizes: tuple[Size, ...]


# Token lifetime 5 s: long enough for a refresh to finish well before a
# token stops being served, short enough for several lifetimes per run.
FULL = Plan(
    expires_in=5.0,
    latency=(0.05, 0.2),
    sizes=(
        Size(
            2,
            10,
            10,
            interval=0.01,
            duration=16.0,
            modes=("tokenfleet", "per-process", "authlib"),
        ),
        Size(
            4,
            50,
            100,
            interval=0.05,
            duration=16.0,
            modes=("tokenfleet", "per-process", "authlib"),
        ),
        Size(
            16,
            100,
            1000,
            interval=0.2,
            duration=16.0,
            modes=("tokenfleet", "tokenfleet-2s", "per-process"),
        ),
    ),
)
QUICK = Plan(
    expires_in=1.5,
    latency=(0.01, 0.03),
    sizes=(
        Size(
            2,
            3,
            4,
            interval=0.01,
            duration=2.0,
            modes=("tokenfleet", "per-process", "authlib"),
        ),
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every size and mode, then write fleet.json, fleet.md and fleet.png."""
    options = _common.parse_options(NAME, __doc__.splitlines()[0], argv)
    results = measure(options)

    markdown = _markdown(results)
    paths = _common.write_results(
        options, NAME, results, markdown, {"": _chart(results)}
    )
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)

    return 0


def measure(options: Options) -> dict[str, Any]:
    """Run the plan and summarise every run."""
    plan = QUICK if options.quick else FULL
    runs = [(size, mode) for size in plan.sizes for mode in size.modes]
    progress = Progress(NAME, len(runs))
    rows = []

    largest = max(size.tenants for size in plan.sizes)
    with IdPProcess(
        tenants=largest, expires_in=plan.expires_in, latency=plan.latency
    ) as idp:
        for size, mode in runs:
            # A fresh Redis per run: no run starts with another's tokens.
            with _common.redis_server() as server:
                fleet = Fleet(
                    mode=CLIENTS[mode].mode,
                    processes=size.processes,
                    tasks=size.tasks,
                    tenants=size.tenants,
                    duration=size.duration,
                    interval=size.interval,
                    expires_in=plan.expires_in,
                    token_url=idp.token_url,
                    redis_url=server.url,
                    cache_options=CLIENTS[mode].cache_options,
                )
                idp.reset()
                outcome = run_fleet(
                    fleet, progress, f"{fleet.size} {CLIENTS[mode].label}"
                )
                idp_calls = idp_summary(idp.request_times(), fleet, outcome.t0)
                rows.append(_summarise(mode, outcome, idp_calls))
            progress.step(f"{fleet.size} {CLIENTS[mode].label}: {_one_line(rows[-1])}")

    return _common.clean_floats(
        {
            "settings": {
                "expires_in_s": plan.expires_in,
                "idp_latency_s": list(plan.latency),
                "expiry_window_s": 1.0,
                "safety_margin": "0.1 x lifetime (the cache's default margin_ratio)",
            },
            "rows": rows,
        }
    )


def _summarise(
    client: str, outcome: FleetOutcome, idp: dict[str, Any]
) -> dict[str, Any]:
    fleet = outcome.fleet
    # Steady state starts half a lifetime in, when the cold start is over
    # and before the first tokens come to their end.
    settled = fleet.expires_in / 2
    steady = outcome.latency(["steady"], settled).summary_ms()
    expiry = outcome.latency(["expiry"], settled).summary_ms()
    start = outcome.latency(["cold", "steady", "expiry"], 0.0, settled).summary_ms()

    return {
        "size": fleet.size,
        "mode": client,
        "client": CLIENTS[client].label,
        "fleet": outcome.describe(),
        "calls": outcome.calls,
        "failures": outcome.failures,
        "expired_tokens": outcome.expired,
        "idp": idp,
        "latency_ms": {"steady": steady, "expiry": expiry, "cold_start": start},
        "expiry_p99_vs_steady": expiry["p99"] / steady["p99"]
        if steady["p99"]
        else None,
        "counters": outcome.counters(),
    }


def _one_line(row: dict[str, Any]) -> str:
    return (
        f"{row['idp']['calls']} IdP calls, {row['idp']['calls_per_key_per_generation']:.2f} per key per token, "
        f"p99 steady {row['latency_ms']['steady']['p99']:.2f} ms / expiry {row['latency_ms']['expiry']['p99']:.2f} ms, "
        f"{sum(row['failures'].values())} failed"
    )


def _markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    rows = []
    for row in results["rows"]:
        latency = row["latency_ms"]
        steady, expiry, start = (
            latency["steady"],
            latency["expiry"],
            latency["cold_start"],
        )
        rows.append(
            [
                row["size"],
                row["client"],
                f"{row['calls']:,}",
                f"{row['idp']['calls']:,}",
                f"{row['idp']['calls_per_key_per_generation']:.2f}",
                _two(row["idp"]["after_first_lifetime_per_key_per_generation"]),
                f"{row['idp']['calls_per_key_per_lifetime']:.2f}",
                f"{ms(steady['p50'])} / {ms(steady['p99'])} / {ms(steady['p99.9'])}",
                f"{ms(expiry['p50'])} / {ms(expiry['p99'])} / {ms(expiry['p99.9'])}",
                f"{ms(start['p50'])} / {ms(start['p99'])}",
                f"{sum(row['failures'].values()):,}",
                f"{row['expired_tokens']:,}",
            ]
        )
    table = _common.markdown_table(
        [
            "P x T x K",
            "client",
            "calls",
            "IdP calls",
            "per key per token",
            "per key per token after 1st lifetime",
            "per key per lifetime",
            "steady p50 / p99 / p99.9 ms",
            "around expiry p50 / p99 / p99.9 ms",
            "first half lifetime p50 / p99 ms",
            "failed",
            "expired served",
        ],
        rows,
    )

    return (
        f"### Fleet: token lifetime {settings['expires_in_s']:g} s, IdP latency "
        f"{settings['idp_latency_s'][0] * 1000:.0f} to {settings['idp_latency_s'][1] * 1000:.0f} ms\n\n"
        + table
        + "\n- *per key per token*: IdP calls divided by token generations (bursts of requests for one "
        "key less than a quarter lifetime apart); 1.00 means no duplicate fetch. *After 1st lifetime*: "
        "the same for requests made once the cold start is one lifetime past.\n"
        "- *per key per lifetime*: IdP calls / (K x run time / lifetime). The cold start plus refreshing "
        "ahead at about 3/4 of the lifetime make this about 1.5 to 1.8 for a single fetcher.\n"
        "- *steady* and *around expiry* count calls from half a lifetime in; *around expiry*: calls made "
        "within 0.5 s of the moment a token of that tenant stops being served (expiry minus the 10 % "
        "safety margin). *First half lifetime*: every call before that, the cold start included.\n"
    )


def _two(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _chart(results: dict[str, Any]) -> Any:
    figure = _common.new_figure(10, 4.2)
    left, right = figure.subplots(1, 2)
    sizes = list(dict.fromkeys(row["size"] for row in results["rows"]))
    present = [c for c in CLIENTS if any(r["mode"] == c for r in results["rows"])]
    width = 0.8 / len(present)

    for offset, name in enumerate(present):
        client = CLIENTS[name]
        rows = {row["size"]: row for row in results["rows"] if row["mode"] == name}
        shown = [size for size in sizes if size in rows]
        xs = [sizes.index(size) + offset * width for size in shown]
        left.bar(
            xs,
            [rows[s]["idp"]["calls_per_key_per_generation"] for s in shown],
            width=width,
            label=client.label,
            color=client.colour,
        )
        # A short run may have no call near an expiry: no bar then.
        right.bar(
            [x - width * 0.2 for x in xs],
            [rows[s]["latency_ms"]["steady"]["p99"] or 0.0 for s in shown],
            width=width * 0.4,
            color=client.colour,
            alpha=0.45,
        )
        right.bar(
            [x + width * 0.2 for x in xs],
            [rows[s]["latency_ms"]["expiry"]["p99"] or 0.0 for s in shown],
            width=width * 0.4,
            color=client.colour,
            label=client.label,
        )

    ticks = [i + width * (len(present) - 1) / 2 for i in range(len(sizes))]
    for ax in (left, right):
        ax.set_xticks(ticks, sizes, fontsize=8)
        ax.set_xlabel("processes x tasks x tenants")
        ax.set_yscale("log")
    left.set_ylabel("IdP calls per key per token")
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.set_ylim(bottom=0.5)
    left.legend(fontsize=7)
    right.set_ylabel("p99 ms (pale: steady, dark: around expiry)")
    right.legend(fontsize=7)

    return figure


if __name__ == "__main__":
    sys.exit(main())
