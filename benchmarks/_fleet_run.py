"""Runs a fleet of `_fleet_worker.py` processes and merges what they saw.

The parent starts every worker, waits until each has set up its token
source and said ``ready``, then gives them all the same start time on
CLOCK_MONOTONIC, so that a cold start is simultaneous and the workers' time
buckets line up.  While they run it calls the caller's ``on_tick`` (which is
how the fault benchmark kills and restarts Redis on cue) and prints progress.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from _common import LogHistogram, Progress

WORKER = Path(__file__).resolve().parent / "_fleet_worker.py"
_POLL = 0.02
_READY_TIMEOUT = 120.0
_FINISH_GRACE = 60.0


@dataclass(frozen=True)
class Fleet:
    """What one fleet run does (see `_fleet_worker` for the modes)."""

    mode: str
    processes: int
    tasks: int
    tenants: int
    duration: float
    interval: float
    expires_in: float
    token_url: str
    redis_url: str | None = None
    cache_options: dict[str, Any] = field(default_factory=dict)
    bucket: float = 0.1

    @property
    def size(self) -> str:
        """``P x T x K``."""
        return f"{self.processes} x {self.tasks} x {self.tenants:,}"

    @property
    def margin(self) -> float:
        """The safety margin the cache uses by default: a tenth of the lifetime."""
        return 0.1 * self.expires_in


@dataclass
class FleetOutcome:
    """The merged reports of a fleet run."""

    fleet: Fleet
    t0: float
    reports: list[dict[str, Any]]

    @property
    def calls(self) -> int:
        """Calls made by all tasks."""
        return sum(r["calls"] for r in self.reports)

    @property
    def failures(self) -> dict[str, int]:
        """Failed calls by error class."""
        merged: Counter[str] = Counter()
        for report in self.reports:
            merged.update(report["failures"])
        return dict(merged)

    @property
    def expired(self) -> int:
        """Tokens handed out after their expiry."""
        return sum(r["expired"] for r in self.reports)

    def counters(self) -> dict[str, int]:
        """The workers' cache counters, summed (empty for Authlib)."""
        merged: Counter[str] = Counter()
        for report in self.reports:
            merged.update(
                {k: v for k, v in report["counters"].items() if isinstance(v, int)}
            )
        return dict(merged)

    def latency(
        self, kinds: Iterable[str], start: float = 0.0, end: float = float("inf")
    ) -> LogHistogram:
        """Latency of the calls of *kinds* made between *start* and *end* (seconds after t0)."""
        merged = LogHistogram()
        bucket = self.fleet.bucket
        for report in self.reports:
            for kind in kinds:
                for slot, value in report["latency"][kind].items():
                    if start <= int(slot) * bucket < end:
                        merged.merge(LogHistogram.from_json(value))
        return merged

    def per_bucket(self) -> dict[str, list[float]]:
        """Calls, failures and p99 latency (ms) per time bucket, fleet-wide."""
        slots = int(self.fleet.duration / self.fleet.bucket) + 1
        histograms = [LogHistogram() for _ in range(slots)]
        failures = [0] * slots
        for report in self.reports:
            for by_slot in report["latency"].values():
                for slot, value in by_slot.items():
                    if int(slot) < slots:
                        histograms[int(slot)].merge(LogHistogram.from_json(value))
            for slot, count in report["failed_at"].items():
                if int(slot) < slots:
                    failures[int(slot)] += count

        return {
            "t": [round(i * self.fleet.bucket, 3) for i in range(slots)],
            "calls": [h.count for h in histograms],
            "failures": failures,
            "p99_ms": [
                h.quantile_us(0.99) / 1000 if h.count else 0.0 for h in histograms
            ],
        }

    def describe(self) -> dict[str, Any]:
        """The spec as JSON, without the URLs."""
        spec = asdict(self.fleet)
        for key in ("token_url", "redis_url"):
            spec.pop(key)
        return spec


def run_fleet(
    fleet: Fleet,
    progress: Progress,
    label: str,
    on_tick: Callable[[float], None] | None = None,
) -> FleetOutcome:
    """Run *fleet* and return its merged reports; no worker outlives the call."""
    with tempfile.TemporaryDirectory(prefix="tokenfleet-bench-") as rundir:
        workers = []
        try:
            for index in range(fleet.processes):
                workers.append(_start_worker(fleet, index, Path(rundir)))
            _await_ready(workers)

            t0 = time.monotonic() + 0.3
            for process, _out, _err in workers:
                assert process.stdin is not None
                process.stdin.write(f"go {t0!r}\n".encode())
                process.stdin.flush()
            _await_exit(workers, fleet, t0, progress, label, on_tick)

            reports = [_report(out, err) for _process, out, err in workers]
        finally:
            for process, _out, _err in workers:
                with contextlib.suppress(OSError):
                    assert process.stdin is not None
                    process.stdin.close()
                if process.poll() is None:
                    process.kill()
                process.wait()

    return FleetOutcome(fleet=fleet, t0=t0, reports=reports)


def _start_worker(
    fleet: Fleet, index: int, rundir: Path
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    assignment = {
        "index": index,
        "mode": fleet.mode,
        "tasks": fleet.tasks,
        "tenants": fleet.tenants,
        "duration": fleet.duration,
        "interval": fleet.interval,
        "margin": fleet.margin,
        "bucket": fleet.bucket,
        "token_url": fleet.token_url,
        "redis_url": fleet.redis_url,
        "cache_options": fleet.cache_options,
    }
    out, err = rundir / f"worker-{index}.out", rundir / f"worker-{index}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(WORKER), orjson.dumps(assignment).decode()],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
        )
    return process, out, err


def _await_ready(workers: list[tuple[subprocess.Popen[bytes], Path, Path]]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    waiting = list(workers)
    while waiting:
        for process, _out, err in waiting:
            if process.poll() is not None:
                msg = f"A fleet worker exited before it was ready: {_tail(err)}"
                raise RuntimeError(msg)
        waiting = [w for w in waiting if not w[1].read_bytes().startswith(b"ready")]
        if waiting and time.monotonic() > deadline:
            msg = f"{len(waiting)} fleet workers were not ready within {_READY_TIMEOUT:.0f} s."
            raise RuntimeError(msg)
        time.sleep(_POLL)


def _await_exit(
    workers: list[tuple[subprocess.Popen[bytes], Path, Path]],
    fleet: Fleet,
    t0: float,
    progress: Progress,
    label: str,
    on_tick: Callable[[float], None] | None,
) -> None:
    deadline = t0 + fleet.duration + _FINISH_GRACE
    next_note = t0 + 2.0
    while any(process.poll() is None for process, _out, _err in workers):
        now = time.monotonic()
        if on_tick is not None and now >= t0:
            on_tick(now - t0)
        if now >= next_note:
            progress.note(
                f"{label}: {min(now - t0, fleet.duration):.0f} of {fleet.duration:.0f} s"
            )
            next_note += 2.0
        if now > deadline:
            msg = f"Fleet workers had not finished {fleet.duration + _FINISH_GRACE:.0f} s after the start."
            raise RuntimeError(msg)
        time.sleep(_POLL)

    for process, _out, err in workers:
        if process.returncode != 0:
            msg = (
                f"A fleet worker exited with status {process.returncode}: {_tail(err)}"
            )
            raise RuntimeError(msg)


def _report(out: Path, err: Path) -> dict[str, Any]:
    lines = out.read_bytes().splitlines()
    try:
        report: dict[str, Any] = orjson.loads(lines[-1])
    except (IndexError, orjson.JSONDecodeError) as exc:
        msg = f"A fleet worker left no readable report: {_tail(err)}"
        raise RuntimeError(msg) from exc
    return report


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except FileNotFoundError:
        text = ""
    return text[-2000:] or "(nothing on stderr)"


# What the IdP saw -------------------------------------------------------------


def token_generations(
    requests: list[tuple[str, float, int]], gap: float
) -> dict[str, int]:
    """Per client id, how many separate bursts of token requests it saw.

    Requests for one client closer together than *gap* seconds belong to the
    same burst: the same token generation, fetched once or several times.
    """
    times: dict[str, list[float]] = defaultdict(list)
    for client_id, at, _status in requests:
        times[client_id].append(at)

    bursts: dict[str, int] = {}
    for client_id, moments in times.items():
        moments.sort()
        bursts[client_id] = 1 + sum(
            1 for a, b in itertools.pairwise(moments) if b - a > gap
        )
    return bursts


def idp_summary(
    requests: list[tuple[str, float, int]], fleet: Fleet, t0: float
) -> dict[str, Any]:
    """IdP calls of a run, per key, per token generation and per lifetime."""
    in_run = [r for r in requests if r[1] >= t0 - 1.0]
    generations = token_generations(in_run, gap=fleet.expires_in / 4)
    total_generations = sum(generations.values())
    lifetimes = fleet.duration / fleet.expires_in
    # From one lifetime on, the cold start and whatever it upset are over.
    later = [r for r in in_run if r[1] >= t0 + fleet.expires_in]
    later_generations = sum(token_generations(later, fleet.expires_in / 4).values())

    return {
        "calls": len(in_run),
        "failed": sum(1 for r in in_run if r[2] != 200),
        "keys": len(generations),
        "generations": total_generations,
        "calls_per_key_per_generation": len(in_run) / total_generations
        if total_generations
        else 0.0,
        "calls_per_key_per_lifetime": len(in_run) / (fleet.tenants * lifetimes),
        "after_first_lifetime_per_key_per_generation": len(later) / later_generations
        if later_generations
        else None,
    }
