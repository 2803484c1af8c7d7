"""``tokenfleet demo``: a fleet of processes sharing tokens, watched live.

The demo runs the fake IdP (50 to 150 ms per answer, short-lived tokens so
that several lifetimes fit in the run), a Redis (the one named by
``--redis-url``, else a private ``redis-server`` when one is installed), and
a fleet of worker processes from `tokenfleet._fleet`, every task of which
asks for a token over and over.  A progress line shows calls served and
tokens issued as it runs; the summary shows how many tokens each tenant cost
per token lifetime, which is the point: about one with Redis, whatever the
number of processes, and about one per process without it.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from ._fleet import (
    FleetProgress,
    FleetResult,
    FleetSpec,
    register_tenants,
    rounded_up_time,
    run_fleet,
)
from .testing import FakeIdP, RedisServer

EXIT_OK = 0
EXIT_FAILURE = 1

IDP_LATENCY = (0.05, 0.15)
DEMO_SCOPES = ("submissions.read",)


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        msg = f"{text!r} is not a positive whole number"
        raise argparse.ArgumentTypeError(msg)
    return count


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        msg = f"{text!r} is not a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``tokenfleet demo`` to *parser*."""
    parser.add_argument(
        "--processes",
        type=_count,
        default=4,
        help="worker processes (default: %(default)s)",
    )
    parser.add_argument(
        "--tasks",
        type=_count,
        default=50,
        help="concurrent tasks per process (default: %(default)s)",
    )
    parser.add_argument(
        "--tenants",
        type=_count,
        default=5,
        help="tenants, each with its own client credentials (default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=_seconds,
        default=20.0,
        help="seconds to run (default: %(default)s)",
    )
    parser.add_argument(
        "--expires-in",
        type=_seconds,
        default=6.0,
        help="token lifetime in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=_seconds,
        default=0.05,
        help="seconds each task waits between calls (default: %(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        help="share tokens through this Redis (default: a private redis-server "
        "if one is installed, else no Redis at all)",
    )


@dataclass(frozen=True, slots=True)
class _Store:
    """Where the demo's workers share tokens, and how to say so."""

    redis_url: str | None
    description: str


def _shown_redis_url(url: str) -> str:
    # A password in the URL must not reach the terminal.
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


@contextlib.contextmanager
def _store(redis_url: str | None) -> Iterator[_Store]:
    if redis_url is not None:
        yield _Store(
            redis_url,
            f"Redis at {_shown_redis_url(redis_url)}, shared by every process",
        )
    elif RedisServer.available():
        with RedisServer() as server:
            yield _Store(
                server.url,
                f"a private redis-server on port {server.port}, shared by every process",
            )
    else:
        yield _Store(
            None,
            "none; redis-server is not installed, so each process keeps its "
            "own in-memory cache and fetches its own tokens",
        )


def _progress_printer(idp: FakeIdP, out: TextIO) -> Callable[[FleetProgress], None]:
    # On a terminal the line is rewritten in place; elsewhere each refresh
    # is a line of its own, which keeps logs readable.
    live = out.isatty()

    def show(progress: FleetProgress) -> None:
        line = (
            f"{progress.elapsed:6.1f} s  calls served {progress.calls:>10,}  "
            f"tokens issued {idp.issued():>5}  errors {progress.failures:>5}"
        )
        if live:
            out.write(f"\r{line}\x1b[K")
        else:
            out.write(f"{line}\n")
        out.flush()

    return show


def _call_lines(result: FleetResult) -> list[str]:
    every, warm = result.latency, result.warm_latency
    failures = f"  {result.failures}" if result.failures else ""

    return [
        f"  calls served           {result.calls:>12,}",
        f"  failures               {result.failed:>12,}{failures}",
        f"  expired tokens served  {result.expired:>12,}",
        "",
        "  latency (ms)              all calls   after a task's first token",
        f"  p50                    {every.p50_ms:>12.3f}   {warm.p50_ms:>12.3f}",
        f"  p99                    {every.p99_ms:>12.3f}   {warm.p99_ms:>12.3f}",
        f"  p99.9                  {every.p999_ms:>12.3f}   {warm.p999_ms:>12.3f}",
        f"  max                    {every.max_ms:>12.3f}   {warm.max_ms:>12.3f}",
    ]


def _issue_lines(spec: FleetSpec, idp: FakeIdP, lifetimes: float) -> list[str]:
    issued = {c.client_id: idp.issued(c.client_id) for c in spec.credentials()}
    total = sum(issued.values())

    lines = [
        f"  tokens issued over {spec.duration:g} s = {lifetimes:.1f} lifetimes "
        f"of {spec.expires_in:g} s",
        "  tenant                       issued   per lifetime",
    ]
    lines.extend(
        f"  {client_id:<26} {count:>8}   {count / lifetimes:>12.2f}"
        for client_id, count in issued.items()
    )
    lines.append(
        f"  {'every tenant':<26} {total:>8}   "
        f"{total / len(issued) / lifetimes:>12.2f} per tenant"
    )

    return lines


def _verdict(spec: FleetSpec, store: _Store) -> str:
    # Refresh ahead renews each token at about 3/4 of its lifetime, so even a
    # perfect fleet issues somewhat more than one token per lifetime.
    if store.redis_url is not None:
        return (
            f"The {spec.processes} processes shared every token through Redis: one "
            "fetch per tenant per refresh (tokens are renewed at about 3/4 of "
            "their lifetime), as for a single process."
        )
    return (
        f"Without Redis each of the {spec.processes} processes fetched its own "
        f"tokens: {spec.processes} times what a shared cache needs."
    )


def _summary(result: FleetResult, idp: FakeIdP, store: _Store) -> list[str]:
    lifetimes = result.spec.lifetimes
    assert lifetimes is not None, "the demo always sets duration and expires_in"

    return [
        "",
        "Summary",
        *_call_lines(result),
        "",
        *_issue_lines(result.spec, idp, lifetimes),
        "",
        _verdict(result.spec, store),
    ]


def run_demo(args: argparse.Namespace) -> int:
    """Run ``tokenfleet demo`` with parsed *args*; return the exit status."""
    out: TextIO = sys.stdout
    idp = FakeIdP(
        expires_in=args.expires_in,
        latency=IDP_LATENCY,
        # Whole-second exp claims would otherwise cut up to a second off
        # lifetimes of a few seconds; see rounded_up_time.
        clock=rounded_up_time,
    )

    try:
        with _store(args.redis_url) as store, idp.running_in_thread():
            spec = FleetSpec(
                token_url=idp.token_url,
                redis_url=store.redis_url,
                processes=args.processes,
                tasks=args.tasks,
                tenants=args.tenants,
                duration=args.duration,
                interval=args.interval,
                scopes=DEMO_SCOPES,
                expires_in=args.expires_in,
                # A Redis given by the user may hold other runs' tokens.
                cache_options={"namespace": f"tokenfleet-demo-{secrets.token_hex(4)}"},
            )
            register_tenants(idp, spec)
            print(
                f"tokenfleet demo: {spec.processes} processes x {spec.tasks} tasks x "
                f"{spec.tenants} tenants for {spec.duration:g} s; tokens live "
                f"{spec.expires_in:g} s; fake IdP answers in 50-150 ms.\n"
                f"Token store: {store.description}.",
                file=out,
                flush=True,
            )

            result = run_fleet(spec, on_progress=_progress_printer(idp, out))
            if out.isatty():
                out.write("\n")
            print("\n".join(_summary(result, idp, store)), file=out)
    except (RuntimeError, OSError) as exc:
        # FleetWorkerError, and RedisServer's failures to start, are RuntimeErrors.
        print(f"tokenfleet: the demo failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE

    return EXIT_OK if result.failed == 0 and result.expired == 0 else EXIT_FAILURE
