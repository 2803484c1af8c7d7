"""What every benchmark shares: options, timing, percentiles, progress and output.

Each benchmark script imports this module from its own folder, measures its
alternatives side by side in one run, and hands `write_results` a JSON-able
dict, a Markdown table and matplotlib figures.  Results go to
``benchmarks/results/<name>.json|.md|.png`` unless ``--out`` says otherwise.

Timing rules, the same everywhere:

- alternatives are measured in interleaved rounds (A, B, C, A, B, C, ...), so
  drift of the machine during the run hits all of them alike;
- throughput comes from a tight loop with no clock read per call, latency
  percentiles from a loop that reads `time.perf_counter_ns` around each call;
  the cost of that clock read is measured too and reported, not subtracted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Charts stay small enough to commit: a modest size and resolution.
FIGURE_DPI = 80


@dataclass(frozen=True)
class Options:
    """Command-line options common to all benchmarks."""

    quick: bool
    out: Path


def parse_options(name: str, description: str, argv: Sequence[str] | None) -> Options:
    """Parse ``--quick`` and ``--out`` for the benchmark *name*."""
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py", description=description
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast version that only checks the benchmark still works",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help=f"folder for {name}.json, {name}.md and the charts (default: %(default)s)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    return Options(quick=args.quick, out=Path(args.out))


class Progress:
    """One line on stderr per step, with the step count and the time elapsed."""

    def __init__(self, name: str, total: int) -> None:
        self._name = name
        self._total = max(total, 1)
        self._done = 0
        self._started = time.monotonic()

    def step(self, message: str) -> None:
        """Count one step done and say what it was."""
        self._done += 1
        self.note(message, counted=True)

    def note(self, message: str, *, counted: bool = False) -> None:
        """Say something without counting a step."""
        elapsed = time.monotonic() - self._started
        position = (
            f"{self._done}/{self._total}"
            if counted
            else " " * len(f"{self._total}/{self._total}")
        )
        print(
            f"[{self._name} {position} {elapsed:6.1f}s] {message}",
            file=sys.stderr,
            flush=True,
        )


# Timing ------------------------------------------------------------------------


async def timed_calls(
    call: Callable[[], Awaitable[object]],
    count: int,
    before: Callable[[], Awaitable[object] | None] | None = None,
) -> list[int]:
    """Run *call* *count* times and return each call's duration in nanoseconds.

    *before*, when given, runs ahead of every call outside the timed span
    (to empty a cache layer, for example).
    """
    clock = time.perf_counter_ns
    samples = [0] * count

    for i in range(count):
        if before is not None:
            pending = before()
            if pending is not None:
                await pending
        started = clock()
        await call()
        samples[i] = clock() - started

    return samples


async def calls_per_second(call: Callable[[], Awaitable[object]], count: int) -> float:
    """Run *call* *count* times back to back and return the rate achieved."""
    clock = time.perf_counter_ns

    started = clock()
    for _ in range(count):
        await call()
    elapsed = clock() - started

    return count * 1e9 / max(elapsed, 1)


async def clock_overhead_ns(count: int = 20_000) -> float:
    """The median cost of the clock reads `timed_calls` adds to each sample."""

    async def nothing() -> None:
        return None

    samples = await timed_calls(nothing, count)
    return float(sorted(samples)[len(samples) // 2])


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank *q*-th percentile of already sorted values."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))

    return float(ordered[min(rank, len(ordered)) - 1])


def latency_summary(samples_ns: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9, mean and max of nanosecond samples, in microseconds."""
    ordered = sorted(samples_ns)
    if not ordered:
        return {
            "p50": math.nan,
            "p99": math.nan,
            "p99.9": math.nan,
            "mean": math.nan,
            "max": math.nan,
            "samples": 0,
        }

    return {
        "p50": percentile(ordered, 50) / 1000,
        "p99": percentile(ordered, 99) / 1000,
        "p99.9": percentile(ordered, 99.9) / 1000,
        "mean": sum(ordered) / len(ordered) / 1000,
        "max": ordered[-1] / 1000,
        "samples": len(ordered),
    }


class LogHistogram:
    """Latencies in buckets 2 % wide, mergeable across processes and time.

    A percentile read from it is the upper edge of its bucket, so within 2 %
    of the exact value (and never above the exact maximum, kept aside).
    """

    GROWTH = 1.02
    _LOG_GROWTH = math.log(GROWTH)

    __slots__ = ("buckets", "count", "max_us")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max_us = 0.0

    def record(self, seconds: float) -> None:
        """Count one call that took *seconds*."""
        micros = seconds * 1e6
        index = 0 if micros <= 1.0 else math.ceil(math.log(micros) / self._LOG_GROWTH)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: LogHistogram) -> None:
        """Add *other*'s calls to this histogram."""
        for index, count in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + count
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def quantile_us(self, fraction: float) -> float:
        """The latency in microseconds below which *fraction* of the calls fell."""
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(self.max_us, self.GROWTH**index)
        return self.max_us

    def summary_ms(self) -> dict[str, float]:
        """Call count, p50, p99, p99.9 and max, in milliseconds."""
        return {
            "calls": self.count,
            "p50": self.quantile_us(0.5) / 1000,
            "p99": self.quantile_us(0.99) / 1000,
            "p99.9": self.quantile_us(0.999) / 1000,
            "max": self.max_us / 1000 if self.count else math.nan,
        }

    def to_json(self) -> list[Any]:
        """A compact JSON form: [max µs, [[index, count], ...]]."""
        return [self.max_us, [[i, c] for i, c in self.buckets.items()]]

    @classmethod
    def from_json(cls, value: list[Any]) -> LogHistogram:
        """Rebuild a histogram written by `to_json`."""
        histogram = cls()
        histogram.max_us = float(value[0])
        for index, count in value[1]:
            histogram.buckets[int(index)] = int(count)
            histogram.count += int(count)
        return histogram


# The machine -------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _redis_server_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for part in out.split():
        if part.startswith("v="):
            return part.removeprefix("v=")
    return out.strip()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _library_version() -> dict[str, Any]:
    """The commit of the tokenfleet checkout measured, and whether src/ differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=BENCH_DIR,
            timeout=10,
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "src_modified": bool(git("status", "--porcelain", "--", "../src")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "src_modified": None}


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    affinity = getattr(os, "sched_getaffinity", None)

    return {
        "cpus": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "redis_server": _redis_server_version(),
        "tokenfleet_checkout": _library_version(),
        "packages": {
            name: _version(name)
            for name in (
                "tokenfleet",
                "redis",
                "hiredis",
                "orjson",
                "aiohttp",
                "authlib",
                "httpx",
                "cashews",
            )
        },
    }


# Output ------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    numeric = [
        all(
            isinstance(row[i], int | float) or _looks_numeric(str(row[i]))
            for row in rows
        )
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines.extend("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)

    return "\n".join(lines) + "\n"


def _looks_numeric(text: str) -> bool:
    stripped = text.rstrip("x%").replace(",", "").replace("−", "-")
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def fmt(value: float, digits: int = 1) -> str:
    """A number with thousands separators and a fixed number of decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    """Milliseconds with about three significant digits."""
    if value is None or math.isnan(value):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def new_figure(width: float = 7.0, height: float = 4.0) -> Any:
    """A matplotlib figure on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.figure(figsize=(width, height), dpi=FIGURE_DPI)


def write_results(
    options: Options,
    name: str,
    results: dict[str, Any],
    markdown: str,
    figures: dict[str, Any],
) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and one PNG per figure; return the paths."""
    from matplotlib import pyplot as plt

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "quick": options.quick,
        "command": " ".join(
            ["python", f"benchmarks/{name}.py", *(["--quick"] if options.quick else [])]
        ),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        **results,
    }

    written = [out / f"{name}.json", out / f"{name}.md"]
    written[0].write_text(
        json.dumps(
            document, indent=2, sort_keys=False, allow_nan=False, default=_jsonable
        )
        + "\n"
    )
    written[1].write_text(markdown)
    for suffix, figure in figures.items():
        path = out / (f"{name}.png" if not suffix else f"{name}_{suffix}.png")
        figure.tight_layout()
        figure.savefig(path, dpi=FIGURE_DPI)
        plt.close(figure)
        written.append(path)

    return written


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    msg = f"Cannot write {type(value).__name__} to JSON."
    raise TypeError(msg)


def clean_floats(value: Any) -> Any:
    """Replace NaN and infinities (not JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_floats(v) for v in value]
    return value


# The fake IdP in a process of its own ------------------------------------------


def tenant_id(index: int) -> str:
    """The client id of tenant *index*, as registered by `IdPProcess`."""
    return f"tenant-{index:06d}"


def tenant_secret(index: int) -> str:
    """The client secret of tenant *index* (a fixed benchmark-only value)."""
    return f"bench-secret-{index:06d}"


class IdPProcess:
    """The fake IdP in a child process, so its work does not share our event loop.

    It registers *tenants* clients (`tenant_id` / `tenant_secret`), issues
    tokens of *expires_in* seconds after a latency drawn from *latency*, and
    answers commands on its stdin (see ``_idp_process.py``).
    """

    def __init__(
        self,
        *,
        tenants: int,
        expires_in: float = 3600.0,
        latency: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self._args = [
            sys.executable,
            str(BENCH_DIR / "_idp_process.py"),
            "--tenants",
            str(tenants),
            "--expires-in",
            str(expires_in),
            "--latency",
            str(latency[0]),
            str(latency[1]),
        ]
        self._process: subprocess.Popen[str] | None = None
        self.token_url = ""

    def __enter__(self) -> IdPProcess:
        self._process = subprocess.Popen(
            self._args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.token_url = str(self._read_reply(timeout=30.0)["token_url"])
        return self

    def __exit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.write("quit\n")
            process.stdin.flush()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def command(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command line and return the IdP's JSON answer."""
        process = self._process
        assert process is not None
        assert process.stdin is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()
        return self._read_reply(timeout)

    def issued(self) -> dict[str, int]:
        """Tokens issued so far, by client id."""
        return {k: int(v) for k, v in self.command("issued")["issued"].items()}

    def request_times(self) -> list[tuple[str, float, int]]:
        """Every token request so far: (client id, arrival on CLOCK_MONOTONIC, status)."""
        return [
            (str(c), float(t), int(s))
            for c, t, s in self.command("requests")["requests"]
        ]

    def reset(self) -> None:
        """Forget tokens issued and requests received so far."""
        self.command("reset")

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        process = self._process
        assert process is not None
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        if not line:
            msg = f"The fake IdP process gave no answer within {timeout:.0f} s (exit status {process.poll()})."
            raise RuntimeError(msg)
        reply: dict[str, Any] = json.loads(line)
        return reply


@contextlib.contextmanager
def redis_server() -> Iterator[Any]:
    """A private ``redis-server`` on a free loopback port, stopped afterwards."""
    from tokenfleet.testing import RedisServer

    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
