"""A fleet of real worker processes sharing one token cache setup.

Tests, the ``tokenfleet demo`` command and the benchmarks all need the same
experiment: several processes, each with its own `TokenCache` on the same
Redis (or on none), calling `get_token` for the same tenants from many tasks
at once, and a summary of what those callers saw.  `run_fleet` starts the
processes (``python -m tokenfleet._fleet_worker``), waits until every one has
imported, connected and said it is ready, releases them all at the same
moment so that a cold start really is simultaneous, and merges their reports.

How the parent and its workers talk:

- the assignment, client secrets included, travels in one environment
  variable, which keeps secrets and a Redis password out of ``ps``;
- a worker says it is ready, and later how far it got, by replacing a small
  progress file in a private run directory;
- it starts when the parent writes a line to its stdin (end of file means the
  parent is gone, and the worker leaves without calling anything);
- it prints its final report as one JSON line on stdout.

Tokens issued per tenant are counted by the IdP, which the caller holds:
`register_tenants` adds the fleet's tenants to a `FakeIdP`.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ._cache import CacheStats
from ._errors import ConfigurationError
from ._models import ClientCredentials

if TYPE_CHECKING:
    from .testing import FakeIdP

__all__ = [
    "FleetProgress",
    "FleetResult",
    "FleetSpec",
    "FleetWorkerError",
    "LatencyHistogram",
    "LatencySummary",
    "WorkerAssignment",
    "WorkerReport",
    "register_tenants",
    "rounded_up_time",
    "run_fleet",
    "tenant_credentials",
]

ASSIGNMENT_VARIABLE = "TOKENFLEET_FLEET_ASSIGNMENT"
WORKER_MODULE = "tokenfleet._fleet_worker"

# How often the parent looks at its workers while they run.
_POLL_SECONDS = 0.02
_STDERR_TAIL_CHARS = 2000

# Latency buckets grow by 2 % each, so a percentile read from a merged
# histogram is within 2 % of the exact one, whatever the number of calls.
_GROWTH = 1.02
_LOG_GROWTH = math.log(_GROWTH)


class FleetWorkerError(RuntimeError):
    """Raised when a worker process fails, hangs or reports nonsense."""


def rounded_up_time() -> float:
    """Return the Unix time rounded up to the next whole second.

    Pass it as ``FakeIdP(clock=rounded_up_time)`` when tokens live only a
    few seconds.  The IdP writes whole seconds into a token's ``exp`` claim;
    with the true time, ``exp`` can fall up to a second before the
    ``expires_in`` the token was issued with, a third of a 3-second lifetime.
    Rounding up keeps ``exp`` at or after ``issued + expires_in``, which is
    the lifetime the cache is told about and must respect.
    """
    return float(math.ceil(time.time()))


def tenant_credentials(tenants: int, secret_prefix: str) -> list[ClientCredentials]:
    """Return the credentials of tenants ``tenant-0`` .. ``tenant-<n-1>``.

    Secrets are derived from *secret_prefix*, so the parent and every worker
    agree on them without sending them anywhere but the environment.
    """
    return [
        ClientCredentials(f"tenant-{index}", f"{secret_prefix}{index}")
        for index in range(tenants)
    ]


# Latency ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of a set of call latencies, in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class LatencyHistogram:
    """Call latencies in log-spaced buckets, mergeable across processes.

    Buckets are 2 % wide from one microsecond up; a percentile is reported
    as the upper edge of its bucket (never above the exact maximum, which is
    kept separately).
    """

    __slots__ = ("_buckets", "count", "max_seconds")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.max_seconds = 0.0

    def record(self, seconds: float) -> None:
        """Count one call that took *seconds*."""
        micros = seconds * 1e6
        index = 0 if micros <= 1.0 else math.ceil(math.log(micros) / _LOG_GROWTH)
        self._buckets[index] = self._buckets.get(index, 0) + 1
        self.count += 1
        if seconds > self.max_seconds:
            self.max_seconds = seconds

    def merge(self, other: LatencyHistogram) -> None:
        """Add the calls counted by *other* to this histogram."""
        for index, count in other._buckets.items():
            self._buckets[index] = self._buckets.get(index, 0) + count
        self.count += other.count
        self.max_seconds = max(self.max_seconds, other.max_seconds)

    def quantile(self, fraction: float) -> float:
        """Return the latency, in seconds, below which *fraction* of calls fell."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))

        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(self.max_seconds, _GROWTH**index / 1e6)

        return self.max_seconds

    def summary(self) -> LatencySummary:
        """Return p50, p99, p99.9 and the maximum in milliseconds."""
        return LatencySummary(
            count=self.count,
            p50_ms=self.quantile(0.5) * 1000,
            p99_ms=self.quantile(0.99) * 1000,
            p999_ms=self.quantile(0.999) * 1000,
            max_ms=self.max_seconds * 1000,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the histogram as JSON-ready values."""
        return {
            "buckets": {str(index): count for index, count in self._buckets.items()},
            "max": self.max_seconds,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> LatencyHistogram:
        """Rebuild a histogram written by `to_json`."""
        histogram = cls()
        for index, count in value["buckets"].items():
            histogram._buckets[int(index)] = int(count)
            histogram.count += int(count)
        histogram.max_seconds = float(value["max"])

        return histogram


# What to run ------------------------------------------------------------------


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be a positive integer, not {value!r}."
        raise ConfigurationError(msg)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What a fleet run does.

    *processes* workers each run *tasks* asyncio tasks; task ``t`` of worker
    ``w`` asks for tenant ``(w + t) % tenants`` every *interval* seconds,
    for *duration* seconds or *calls* calls, whichever ends first.  Every
    worker builds ``TokenCache(redis_url, **cache_options)``; without
    *redis_url* each process caches for itself.

    *expires_in* is the token lifetime the IdP was set up with; it is only
    used to express results per lifetime.  *progress_interval* is how often
    `run_fleet` reports progress; workers write theirs four times as often,
    so that each report sees fresh counts.  *finish_timeout* is how long the
    workers get, after *duration* (or after the start when only *calls* is
    set), to report before the run is declared hung.
    """

    token_url: str
    processes: int = 4
    tasks: int = 10
    tenants: int = 1
    duration: float | None = 5.0
    calls: int | None = None
    interval: float = 0.01
    redis_url: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ("submissions.read",)
    expires_in: float | None = None
    cache_options: Mapping[str, Any] = field(default_factory=dict)
    secret_prefix: str = field(default="fleet-secret-", repr=False)
    progress_interval: float = 1.0
    ready_timeout: float = 60.0
    finish_timeout: float = 60.0

    def __post_init__(self) -> None:
        _positive_int("processes", self.processes)
        _positive_int("tasks", self.tasks)
        _positive_int("tenants", self.tenants)
        if self.calls is not None:
            _positive_int("calls", self.calls)
        if self.duration is None and self.calls is None:
            msg = "A fleet needs a duration, a number of calls per task, or both."
            raise ConfigurationError(msg)
        if self.duration is not None and not self.duration > 0:
            msg = (
                f"duration must be a positive number of seconds, not {self.duration!r}."
            )
            raise ConfigurationError(msg)
        if not self.progress_interval > 0:
            msg = f"progress_interval must be a positive number of seconds, not {self.progress_interval!r}."
            raise ConfigurationError(msg)
        if not self.interval >= 0:
            msg = f"interval must be zero or more seconds, not {self.interval!r}."
            raise ConfigurationError(msg)
        if not self.secret_prefix:
            msg = "secret_prefix must be a non-empty string."
            raise ConfigurationError(msg)

    def credentials(self) -> list[ClientCredentials]:
        """Return the credentials of every tenant of the fleet."""
        return tenant_credentials(self.tenants, self.secret_prefix)

    @property
    def lifetimes(self) -> float | None:
        """How many token lifetimes *duration* spans, when both are known."""
        if self.duration is None or not self.expires_in:
            return None
        return self.duration / self.expires_in


def register_tenants(idp: FakeIdP, spec: FleetSpec) -> None:
    """Register every tenant of *spec* with *idp*, allowed the spec's scopes."""
    for credentials in spec.credentials():
        idp.add_client(
            credentials.client_id, credentials.client_secret, scopes=spec.scopes
        )


@dataclass(frozen=True, slots=True)
class WorkerAssignment:
    """What one worker process is told to do, through its environment."""

    index: int
    tasks: int
    tenants: int
    duration: float | None
    calls: int | None
    interval: float
    redis_url: str | None
    token_url: str
    scopes: tuple[str, ...]
    cache_options: Mapping[str, Any]
    secret_prefix: str
    progress_path: str
    progress_interval: float

    def to_environment(self) -> str:
        """Encode the assignment for the `ASSIGNMENT_VARIABLE` variable."""
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> WorkerAssignment:
        """Decode the assignment a parent put in *environ*."""
        try:
            raw = orjson.loads(environ[ASSIGNMENT_VARIABLE])
            values = {spec.name: raw[spec.name] for spec in fields(cls)}
        except (KeyError, orjson.JSONDecodeError, TypeError) as exc:
            msg = (
                f"A fleet worker needs its assignment in {ASSIGNMENT_VARIABLE}; "
                "start it with tokenfleet._fleet.run_fleet."
            )
            raise ConfigurationError(msg) from exc
        values["scopes"] = tuple(values["scopes"])

        return cls(**values)


# What came back ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """How far a running fleet got, summed over its workers."""

    elapsed: float
    calls: int
    failures: int
    expired: int


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What one worker process saw.

    `latency` covers every call; `warm_latency` only the calls a task made
    after it had received its first token, which is what a caller sees once
    the cache is warm.  `failures` counts failed calls by error class and
    `expired` the tokens returned after their ``exp`` claim.
    """

    index: int
    pid: int
    calls: int
    failures: Mapping[str, int]
    expired: int
    elapsed: float
    latency: LatencyHistogram
    warm_latency: LatencyHistogram
    stats: CacheStats

    @classmethod
    def from_json(cls, line: bytes) -> WorkerReport:
        """Read the JSON line a worker printed."""
        raw = orjson.loads(line)
        return cls(
            index=int(raw["index"]),
            pid=int(raw["pid"]),
            calls=int(raw["calls"]),
            failures={str(name): int(n) for name, n in raw["failures"].items()},
            expired=int(raw["expired"]),
            elapsed=float(raw["elapsed"]),
            latency=LatencyHistogram.from_json(raw["latency"]),
            warm_latency=LatencyHistogram.from_json(raw["warm_latency"]),
            stats=CacheStats(**raw["stats"]),
        )


def _sum_stats(stats: Iterable[CacheStats]) -> CacheStats:
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for one in stats:
        totals.update(
            {name: value for name, value in asdict(one).items() if name != "errors"}
        )
        errors.update(one.errors)

    return CacheStats(**totals, errors=dict(errors))


@dataclass(frozen=True, slots=True)
class FleetResult:
    """What a whole fleet saw: the workers' reports, merged.

    `elapsed` runs from the start signal until the last worker exited.
    """

    spec: FleetSpec
    workers: tuple[WorkerReport, ...]
    elapsed: float

    @property
    def calls(self) -> int:
        """Calls made by every task of every worker."""
        return sum(worker.calls for worker in self.workers)

    @property
    def failures(self) -> dict[str, int]:
        """Failed calls by error class."""
        merged: Counter[str] = Counter()
        for worker in self.workers:
            merged.update(worker.failures)
        return dict(merged)

    @property
    def failed(self) -> int:
        """The number of failed calls."""
        return sum(self.failures.values())

    @property
    def expired(self) -> int:
        """Tokens handed to a caller after their ``exp`` claim."""
        return sum(worker.expired for worker in self.workers)

    @property
    def latency(self) -> LatencySummary:
        """Latency of every call, merged over the fleet."""
        return self._merged(worker.latency for worker in self.workers)

    @property
    def warm_latency(self) -> LatencySummary:
        """Latency of the calls made once each task had its first token."""
        return self._merged(worker.warm_latency for worker in self.workers)

    @property
    def stats(self) -> CacheStats:
        """The workers' cache counters, summed."""
        return _sum_stats(worker.stats for worker in self.workers)

    @staticmethod
    def _merged(histograms: Iterable[LatencyHistogram]) -> LatencySummary:
        merged = LatencyHistogram()
        for histogram in histograms:
            merged.merge(histogram)
        return merged.summary()


# Running ------------------------------------------------------------------------


class _WorkerProcess:
    """The parent's view of one worker: its process and its files."""

    def __init__(self, spec: FleetSpec, index: int, rundir: Path) -> None:
        self.index = index
        self.progress_path = rundir / f"worker-{index}.progress"
        self.report_path = rundir / f"worker-{index}.out"
        self.stderr_path = rundir / f"worker-{index}.err"

        assignment = WorkerAssignment(
            index=index,
            tasks=spec.tasks,
            tenants=spec.tenants,
            duration=spec.duration,
            calls=spec.calls,
            interval=spec.interval,
            redis_url=spec.redis_url,
            token_url=spec.token_url,
            scopes=tuple(spec.scopes),
            cache_options=dict(spec.cache_options),
            secret_prefix=spec.secret_prefix,
            progress_path=str(self.progress_path),
            progress_interval=spec.progress_interval / 4,
        )
        environment = {
            **os.environ,
            ASSIGNMENT_VARIABLE: assignment.to_environment(),
            "PYTHONPATH": _package_root(),
        }

        with (
            self.report_path.open("wb") as report,
            self.stderr_path.open("wb") as stderr,
        ):
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=report,
                stderr=stderr,
                env=environment,
            )

    def ready(self) -> bool:
        """Tell whether the worker has written its first progress file."""
        return self.progress_path.exists()

    def check_running(self) -> None:
        """Raise if the worker exited before it was told to start."""
        status = self.process.poll()
        if status is not None:
            msg = (
                f"Fleet worker {self.index} exited with status {status} before "
                f"it was started: {self.stderr_tail()}"
            )
            raise FleetWorkerError(msg)

    def release(self) -> None:
        """Tell the worker to start calling."""
        stdin = self.process.stdin
        assert stdin is not None
        # A worker that died in the meantime is reported by its exit status.
        with contextlib.suppress(BrokenPipeError):
            stdin.write(b"start\n")
            stdin.flush()

    def progress(self) -> dict[str, Any] | None:
        """Return the worker's latest progress, if it wrote any."""
        try:
            progress: dict[str, Any] = orjson.loads(self.progress_path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return progress

    def report(self) -> WorkerReport:
        """Read the report of a worker that exited cleanly."""
        lines = self.report_path.read_bytes().splitlines()
        try:
            return WorkerReport.from_json(lines[-1])
        except (IndexError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            msg = (
                f"Fleet worker {self.index} exited without a readable report: "
                f"{self.stderr_tail()}"
            )
            raise FleetWorkerError(msg) from exc

    def stderr_tail(self) -> str:
        """The end of what the worker wrote on stderr."""
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            text = ""
        return text[-_STDERR_TAIL_CHARS:] or "(nothing on stderr)"

    def stop(self) -> None:
        """Kill the worker if it is still running, and reap it."""
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _package_root() -> str:
    """The directory holding this tokenfleet package, first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parent.parent)
    inherited = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{inherited}" if inherited else root


@contextlib.contextmanager
def _started_workers(spec: FleetSpec, rundir: Path) -> Iterator[list[_WorkerProcess]]:
    workers: list[_WorkerProcess] = []
    try:
        for index in range(spec.processes):
            workers.append(_WorkerProcess(spec, index, rundir))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def _await_ready(workers: list[_WorkerProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(workers)
    while waiting:
        for worker in waiting:
            worker.check_running()
        waiting = [worker for worker in waiting if not worker.ready()]
        if waiting and time.monotonic() > deadline:
            msg = (
                f"{len(waiting)} of {len(workers)} fleet workers were not ready "
                f"within {timeout:.0f} s."
            )
            raise FleetWorkerError(msg)
        time.sleep(_POLL_SECONDS)


def _progress(workers: list[_WorkerProcess], elapsed: float) -> FleetProgress:
    reports = [report for worker in workers if (report := worker.progress())]
    return FleetProgress(
        elapsed=elapsed,
        calls=sum(int(report["calls"]) for report in reports),
        failures=sum(int(report["failures"]) for report in reports),
        expired=sum(int(report["expired"]) for report in reports),
    )


def _await_exit(
    workers: list[_WorkerProcess],
    spec: FleetSpec,
    started: float,
    on_progress: Callable[[FleetProgress], None] | None,
) -> None:
    deadline = started + (spec.duration or 0.0) + spec.finish_timeout
    next_progress = started + spec.progress_interval
    running = list(workers)

    while running:
        time.sleep(_POLL_SECONDS)
        now = time.monotonic()

        for worker in running:
            status = worker.process.poll()
            if status not in (None, 0):
                msg = (
                    f"Fleet worker {worker.index} exited with status {status}: "
                    f"{worker.stderr_tail()}"
                )
                raise FleetWorkerError(msg)
        running = [worker for worker in running if worker.process.poll() is None]

        if running and now > deadline:
            msg = (
                f"{len(running)} of {len(workers)} fleet workers had not finished "
                f"{deadline - started:.0f} s after the start."
            )
            raise FleetWorkerError(msg)
        if on_progress is not None and now >= next_progress:
            on_progress(_progress(workers, now - started))
            next_progress += spec.progress_interval


def run_fleet(
    spec: FleetSpec,
    *,
    on_progress: Callable[[FleetProgress], None] | None = None,
) -> FleetResult:
    """Run the fleet *spec* describes and return what its callers saw.

    Blocks until every worker has reported; call it from a thread (for
    example with ``anyio.to_thread.run_sync``) when the IdP runs on the
    calling event loop.  *on_progress* is called about every
    ``spec.progress_interval`` seconds while the workers run.  Raises
    `FleetWorkerError` when a worker fails or hangs; no worker outlives the
    call either way.
    """
    with (
        tempfile.TemporaryDirectory(prefix="tokenfleet-fleet-") as rundir,
        _started_workers(spec, Path(rundir)) as workers,
    ):
        _await_ready(workers, spec.ready_timeout)

        started = time.monotonic()
        for worker in workers:
            worker.release()
        _await_exit(workers, spec, started, on_progress)
        elapsed = time.monotonic() - started

        reports = tuple(worker.report() for worker in workers)

    return FleetResult(spec=spec, workers=reports, elapsed=elapsed)
