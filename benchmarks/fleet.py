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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from _common import IdPProcess, Options, Progress, ms
from _fleet_run import Fleet, FleetOutcome, idp_summary, run_fleet

NAME = "fleet"
MODES = {
    "tokenfleet": "tokenfleet (Redis)",
    "per-process": "per-process cache",
    "authlib": "Authlib, client per tenant",
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
            duration=11.0,
            modes=("tokenfleet", "per-process"),
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
                    mode=mode,
                    processes=size.processes,
                    tasks=size.tasks,
                    tenants=size.tenants,
                    duration=size.duration,
                    interval=size.interval,
                    expires_in=plan.expires_in,
                    token_url=idp.token_url,
                    redis_url=server.url,
                )
                idp.reset()
                outcome = run_fleet(fleet, progress, f"{fleet.size} {MODES[mode]}")
                rows.append(
                    _summarise(
                        outcome, idp_summary(idp.request_times(), fleet, outcome.t0)
                    )
                )
            progress.step(f"{fleet.size} {MODES[mode]}: {_one_line(rows[-1])}")

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


def _summarise(outcome: FleetOutcome, idp: dict[str, Any]) -> dict[str, Any]:
    fleet = outcome.fleet
    steady = outcome.latency(["steady"]).summary_ms()
    expiry = outcome.latency(["expiry"]).summary_ms()
    cold = outcome.latency(["cold"]).summary_ms()

    return {
        "size": fleet.size,
        "mode": fleet.mode,
        "client": MODES[fleet.mode],
        "fleet": outcome.describe(),
        "calls": outcome.calls,
        "failures": outcome.failures,
        "expired_tokens": outcome.expired,
        "idp": idp,
        "latency_ms": {"steady": steady, "expiry": expiry, "cold": cold},
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
        steady, expiry = row["latency_ms"]["steady"], row["latency_ms"]["expiry"]
        rows.append(
            [
                row["size"],
                row["client"],
                f"{row['calls']:,}",
                f"{row['idp']['calls']:,}",
                f"{row['idp']['calls_per_key_per_generation']:.2f}",
                f"{row['idp']['calls_per_key_per_lifetime']:.2f}",
                f"{ms(steady['p50'])} / {ms(steady['p99'])} / {ms(steady['p99.9'])}",
                f"{ms(expiry['p50'])} / {ms(expiry['p99'])} / {ms(expiry['p99.9'])}",
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
            "per key per lifetime",
            "steady p50 / p99 / p99.9 ms",
            "around expiry p50 / p99 / p99.9 ms",
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
        "key less than a quarter lifetime apart); 1.00 means no duplicate fetch.\n"
        "- *per key per lifetime*: IdP calls / (K x run time / lifetime). Refreshing ahead at about 3/4 of "
        "the lifetime makes this about 1.3 to 1.4 for a single fetcher.\n"
        "- *around expiry*: calls made within 0.5 s of the moment a token of that tenant stops being "
        "served (expiry minus the 10 % safety margin); cold first calls are in neither column.\n"
    )


def _chart(results: dict[str, Any]) -> Any:
    # A short run may have no call near an expiry: its missing p99 is
    # drawn as no bar.
    figure = _common.new_figure(10, 4)
    left, right = figure.subplots(1, 2)
    sizes = list(dict.fromkeys(row["size"] for row in results["rows"]))
    colours = {"tokenfleet": "#4477aa", "per-process": "#ccbb44", "authlib": "#ee6677"}
    width = 0.8 / len(MODES)

    for offset, mode in enumerate(MODES):
        rows = {row["size"]: row for row in results["rows"] if row["mode"] == mode}
        xs = [i + offset * width for i, size in enumerate(sizes) if size in rows]
        present = [size for size in sizes if size in rows]
        left.bar(
            xs,
            [rows[s]["idp"]["calls_per_key_per_generation"] for s in present],
            width=width,
            label=MODES[mode],
            color=colours[mode],
        )
        right.bar(
            [x - width * 0.2 for x in xs],
            [rows[s]["latency_ms"]["steady"]["p99"] or 0.0 for s in present],
            width=width * 0.4,
            color=colours[mode],
            alpha=0.5,
        )
        right.bar(
            [x + width * 0.2 for x in xs],
            [rows[s]["latency_ms"]["expiry"]["p99"] or 0.0 for s in present],
            width=width * 0.4,
            color=colours[mode],
            label=MODES[mode],
        )

    ticks = [i + width * (len(MODES) - 1) / 2 for i in range(len(sizes))]
    for ax in (left, right):
        ax.set_xticks(ticks, sizes, fontsize=8)
        ax.set_xlabel("processes x tasks x tenants")
        ax.set_yscale("log")
    left.set_ylabel("IdP calls per key per token")
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.legend(fontsize=7)
    right.set_ylabel("p99 latency, ms (pale: steady, dark: around expiry)")
    right.legend(fontsize=7)

    return figure


if __name__ == "__main__":
    sys.exit(main())
