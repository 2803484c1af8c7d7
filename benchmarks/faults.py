"""Faults under load: redis-server killed and restarted in the middle of a run.

A fleet of worker processes calls `get_token` for every tenant against the
fake IdP (50 to 200 ms per token request).  Part-way through, the
``redis-server`` is SIGKILLed, and some seconds later started again on the
same port, empty.  Reported: failed calls (target 0), IdP calls during the
outage, and how long after the restart the fleet converged again: Redis
holds a token for every tenant and no tenant is fetched twice for one token
generation any more.
Run it with ``python benchmarks/faults.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis

import _common
from _common import IdPProcess, Options, Progress, ms
from _fleet_run import Fleet, run_fleet, token_generations

NAME = "faults"


@dataclass(frozen=True)
class Plan:
    """The fleet and the moments of the outage (seconds after the start)."""

    processes: int
    tasks: int
    tenants: int
    interval: float
    duration: float
    expires_in: float
    latency: tuple[float, float]
    kill_at: float
    restart_at: float


FULL = Plan(
    processes=4,
    tasks=50,
    tenants=100,
    interval=0.05,
    duration=22.0,
    expires_in=5.0,
    latency=(0.05, 0.2),
    kill_at=7.0,
    restart_at=12.0,
)
QUICK = Plan(
    processes=2,
    tasks=3,
    tenants=4,
    interval=0.01,
    duration=3.5,
    expires_in=1.5,
    latency=(0.01, 0.03),
    kill_at=1.0,
    restart_at=2.0,
)


class Outage:
    """Kills and restarts Redis on cue, then watches it fill up again."""

    def __init__(self, server: Any, plan: Plan) -> None:
        self._server = server
        self._plan = plan
        self.killed_at: float | None = None
        self.restarted_at: float | None = None
        self.repopulated_at: float | None = None
        self._client: redis.Redis | None = None

    def __call__(self, elapsed: float) -> None:
        """Called by the fleet runner every few tens of milliseconds."""
        if self.killed_at is None and elapsed >= self._plan.kill_at:
            self._server.kill()
            self.killed_at = elapsed
        elif (
            self.restarted_at is None
            and self.killed_at is not None
            and elapsed >= self._plan.restart_at
        ):
            self._server.restart()
            self.restarted_at = elapsed
            self._client = redis.Redis.from_url(self._server.url, socket_timeout=1.0)
        elif self.repopulated_at is None and self._client is not None:
            tokens = len(self._client.keys("tokenfleet:*:token"))
            if tokens >= self._plan.tenants:
                self.repopulated_at = elapsed

    def close(self) -> None:
        """Close the watching connection."""
        if self._client is not None:
            self._client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the outage, then write faults.json, faults.md and faults.png."""
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
    """Run the fleet through the outage and summarise it."""
    plan = QUICK if options.quick else FULL
    progress = Progress(NAME, 1)

    with (
        IdPProcess(
            tenants=plan.tenants, expires_in=plan.expires_in, latency=plan.latency
        ) as idp,
        _common.redis_server() as server,
    ):
        fleet = Fleet(
            mode="tokenfleet",
            processes=plan.processes,
            tasks=plan.tasks,
            tenants=plan.tenants,
            duration=plan.duration,
            interval=plan.interval,
            expires_in=plan.expires_in,
            token_url=idp.token_url,
            redis_url=server.url,
        )
        outage = Outage(server, plan)
        try:
            outcome = run_fleet(
                fleet,
                progress,
                f"{fleet.size} with Redis killed at {plan.kill_at:g} s",
                outage,
            )
        finally:
            outage.close()
        requests = idp.request_times()

    if outage.killed_at is None or outage.restarted_at is None:
        msg = "The run ended before the outage was over; lengthen the run."
        raise RuntimeError(msg)
    killed, restarted = outage.killed_at, outage.restarted_at
    idp_times = sorted(at - outcome.t0 for _client, at, _status in requests)

    # Bursts that began after the restart and fetched one key more than once
    # show the fleet still fetching separately; the last such request ends it.
    after = [
        (c, at - outcome.t0, s) for c, at, s in requests if at - outcome.t0 >= restarted
    ]
    last_duplicate = _last_duplicate(after, plan.expires_in / 4)
    converged = max(
        (outage.repopulated_at or plan.duration) - restarted,
        (last_duplicate - restarted) if last_duplicate is not None else 0.0,
    )
    # After the cold start, before the kill: the fleet's ordinary rhythm.
    before = [r for r in requests if 1.0 <= r[1] - outcome.t0 < killed]
    steady_generations = token_generations(before, plan.expires_in / 4)

    during = outcome.latency(["steady", "expiry"], killed, restarted).summary_ms()
    steady = outcome.latency(["steady", "expiry"], 1.0, killed).summary_ms()
    progress.step(
        f"{sum(outcome.failures.values())} failed calls, "
        f"{sum(1 for t in idp_times if killed <= t < restarted)} IdP calls during the outage, "
        f"converged {converged:.2f} s after the restart"
    )

    return _common.clean_floats(
        {
            "settings": {
                "fleet": outcome.describe(),
                "idp_latency_s": list(plan.latency),
                "kill_at_s": killed,
                "restart_at_s": restarted,
            },
            "calls": outcome.calls,
            "failures": outcome.failures,
            "expired_tokens": outcome.expired,
            "idp": {
                "calls": len(idp_times),
                "during_outage": sum(1 for t in idp_times if killed <= t < restarted),
                "before_outage_per_key_per_token": (
                    len(before) / sum(steady_generations.values())
                    if steady_generations
                    else None
                ),
                "processes_x_tenants": plan.processes * plan.tenants,
            },
            "recovery": {
                "redis_repopulated_after_s": (
                    outage.repopulated_at - restarted
                    if outage.repopulated_at is not None
                    else None
                ),
                "last_duplicate_fetch_after_s": (last_duplicate - restarted)
                if last_duplicate is not None
                else None,
                "converged_after_s": converged,
            },
            "latency_ms": {"before_outage": steady, "during_outage": during},
            "counters": outcome.counters(),
            "timeline": {
                **outcome.per_bucket(),
                "idp_calls": [
                    sum(
                        1
                        for t in idp_times
                        if i * fleet.bucket <= t < (i + 1) * fleet.bucket
                    )
                    for i in range(int(plan.duration / fleet.bucket) + 1)
                ],
            },
        }
    )


def _last_duplicate(requests: list[tuple[str, float, int]], gap: float) -> float | None:
    by_client: dict[str, list[float]] = {}
    for client_id, at, _status in requests:
        by_client.setdefault(client_id, []).append(at)

    last: float | None = None
    for moments in by_client.values():
        moments.sort()
        burst = [moments[0]]
        for at in [*moments[1:], float("inf")]:
            if at - burst[-1] <= gap:
                burst.append(at)
                continue
            if len(burst) > 1:
                last = max(last or 0.0, burst[-1])
            burst = [at]
    return last


def _markdown(results: dict[str, Any]) -> str:
    settings, idp, recovery = results["settings"], results["idp"], results["recovery"]
    fleet = settings["fleet"]
    before, during = (
        results["latency_ms"]["before_outage"],
        results["latency_ms"]["during_outage"],
    )
    outage = settings["restart_at_s"] - settings["kill_at_s"]
    table = _common.markdown_table(
        ["measure", "value"],
        [
            [
                "fleet (P x T x K)",
                f"{fleet['processes']} x {fleet['tasks']} x {fleet['tenants']:,}",
            ],
            [
                "Redis down",
                f"{settings['kill_at_s']:.1f} s to {settings['restart_at_s']:.1f} s ({outage:.1f} s)",
            ],
            ["calls", f"{results['calls']:,}"],
            ["failed calls (target 0)", f"{sum(results['failures'].values()):,}"],
            ["expired tokens served", f"{results['expired_tokens']:,}"],
            ["IdP calls, whole run", f"{idp['calls']:,}"],
            ["IdP calls during the outage", f"{idp['during_outage']:,}"],
            [
                "IdP calls per key per token before the outage",
                _num(idp["before_outage_per_key_per_token"]),
            ],
            [
                "Redis holds every tenant's token again after",
                _secs(recovery["redis_repopulated_after_s"]),
            ],
            [
                "last duplicate fetch after the restart",
                _secs(recovery["last_duplicate_fetch_after_s"]),
            ],
            ["converged after", _secs(recovery["converged_after_s"])],
            [
                "latency before the outage p50 / p99 / p99.9 ms",
                f"{ms(before['p50'])} / {ms(before['p99'])} / {ms(before['p99.9'])}",
            ],
            [
                "latency during the outage p50 / p99 / p99.9 ms",
                f"{ms(during['p50'])} / {ms(during['p99'])} / {ms(during['p99.9'])}",
            ],
        ],
    )
    counters = results["counters"]

    return (
        f"### Faults: redis-server SIGKILLed under load, restarted empty {outage:.0f} s later\n\n"
        + table
        + f"\nCache counters summed over the fleet: {counters.get('fallback_fetches', 0):,} fetches made "
        f"while Redis was away, {counters.get('write_backs', 0):,} tokens written back after it returned, "
        f"{counters.get('idp_fetches', 0):,} IdP fetches in all.\n"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _chart(results: dict[str, Any]) -> Any:
    figure = _common.new_figure(8, 5.5)
    calls_ax, idp_ax, latency_ax = figure.subplots(3, 1, sharex=True)
    timeline = results["timeline"]
    t = timeline["t"]
    bucket = t[1] - t[0] if len(t) > 1 else 0.1
    killed, restarted = (
        results["settings"]["kill_at_s"],
        results["settings"]["restart_at_s"],
    )

    calls_ax.plot(
        t, [c / bucket for c in timeline["calls"]], color="#4477aa", label="calls/s"
    )
    calls_ax.plot(
        t,
        [f / bucket for f in timeline["failures"]],
        color="#ee6677",
        label="failed calls/s",
    )
    calls_ax.set_ylabel("calls/s")
    calls_ax.legend(fontsize=7, loc="lower left")
    idp_ax.bar(t, timeline["idp_calls"], width=bucket, color="#228833", align="edge")
    idp_ax.set_ylabel("IdP calls\nper 0.1 s")
    latency_ax.plot(
        t, [v if v > 0 else None for v in timeline["p99_ms"]], color="#aa3377"
    )
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("p99 ms\nper 0.1 s")
    latency_ax.set_xlabel("seconds since start")
    for ax in (calls_ax, idp_ax, latency_ax):
        ax.axvspan(killed, restarted, color="#bbbbbb", alpha=0.4, linewidth=0)
    calls_ax.set_title("grey: redis-server down", fontsize=9)

    return figure


if __name__ == "__main__":
    sys.exit(main())
