"""One worker process of a fleet started by `tokenfleet._fleet.run_fleet`.

Run as ``python -m tokenfleet._fleet_worker`` with the assignment in the
``TOKENFLEET_FLEET_ASSIGNMENT`` environment variable.  The worker builds its
`TokenCache`, writes its first progress file to say it is ready, waits for a
line on stdin, then runs its tasks and prints one JSON report on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import orjson

from ._cache import TokenCache
from ._fleet import LatencyHistogram, WorkerAssignment, tenant_credentials
from ._models import ClientCredentials, Token
from ._parse import jwt_expiry

# Exit status when the parent went away before sending the start signal.
_ORPHANED = 3


class _Tally:
    """What this worker's callers saw so far."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures: Counter[str] = Counter()
        self.expired = 0
        self.latency = LatencyHistogram()
        self.warm_latency = LatencyHistogram()

    def progress(self, phase: str, elapsed: float) -> bytes:
        return orjson.dumps(
            {
                "phase": phase,
                "elapsed": elapsed,
                "calls": self.calls,
                "failures": sum(self.failures.values()),
                "expired": self.expired,
            }
        )


def _write_progress(path: Path, tally: _Tally, phase: str, elapsed: float) -> None:
    # Replaced, never rewritten in place, so the parent never reads half a file.
    partial = path.with_suffix(".partial")
    partial.write_bytes(tally.progress(phase, elapsed))
    os.replace(partial, path)


async def _call_repeatedly(
    cache: TokenCache,
    credentials: ClientCredentials,
    assignment: WorkerAssignment,
    deadline: float | None,
    tally: _Tally,
) -> None:
    calls_left = assignment.calls
    warm = False
    # Tokens are reused for many calls; their expiry is decoded once each.
    last_token: Token | None = None
    expiry: float | None = None

    while (calls_left is None or calls_left > 0) and (
        deadline is None or time.monotonic() < deadline
    ):
        began = time.perf_counter()
        try:
            token = await cache.get_token(
                credentials, token_url=assignment.token_url, scopes=assignment.scopes
            )
        except Exception as exc:
            tally.failures[type(exc).__name__] += 1
            token = None
        took = time.perf_counter() - began

        tally.calls += 1
        tally.latency.record(took)
        if warm:
            tally.warm_latency.record(took)
        if token is not None:
            warm = True
            if token is not last_token:
                last_token, expiry = token, jwt_expiry(token.access_token)
            if expiry is None:
                tally.failures["UnreadableTokenError"] += 1
            elif time.time() >= expiry:
                tally.expired += 1

        if calls_left is not None:
            calls_left -= 1
        await asyncio.sleep(assignment.interval)


async def _report_progress(
    assignment: WorkerAssignment, tally: _Tally, started: float
) -> None:
    path = Path(assignment.progress_path)
    while True:
        await asyncio.sleep(assignment.progress_interval)
        _write_progress(path, tally, "running", time.monotonic() - started)


async def _work(assignment: WorkerAssignment) -> int:
    tenants = tenant_credentials(assignment.tenants, assignment.secret_prefix)
    tally = _Tally()
    progress_path = Path(assignment.progress_path)

    async with TokenCache(assignment.redis_url, **assignment.cache_options) as cache:
        _write_progress(progress_path, tally, "ready", 0.0)
        if not await asyncio.to_thread(sys.stdin.readline):
            return _ORPHANED

        started = time.monotonic()
        deadline = (
            None if assignment.duration is None else started + assignment.duration
        )
        reporter = asyncio.create_task(_report_progress(assignment, tally, started))
        await asyncio.gather(
            *(
                _call_repeatedly(
                    cache,
                    tenants[(assignment.index + task) % assignment.tenants],
                    assignment,
                    deadline,
                    tally,
                )
                for task in range(assignment.tasks)
            )
        )
        elapsed = time.monotonic() - started
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        stats = asdict(cache.stats())

    _write_progress(progress_path, tally, "done", elapsed)
    report = {
        "index": assignment.index,
        "pid": os.getpid(),
        "calls": tally.calls,
        "failures": dict(tally.failures),
        "expired": tally.expired,
        "elapsed": elapsed,
        "latency": tally.latency.to_json(),
        "warm_latency": tally.warm_latency.to_json(),
        "stats": stats,
    }
    sys.stdout.buffer.write(orjson.dumps(report) + b"\n")
    sys.stdout.flush()

    return 0


def main() -> int:
    """Run the assignment found in the environment; return the exit status."""
    assignment = WorkerAssignment.from_environment(os.environ)
    return asyncio.run(_work(assignment))


if __name__ == "__main__":
    sys.exit(main())
