"""The fake IdP as a child process of a benchmark (see `_common.IdPProcess`).

Registers ``--tenants`` clients, prints ``{"token_url": ...}`` once it
listens on a loopback port, then answers one JSON line per command read on
stdin: ``issued`` (tokens issued by client id), ``requests`` (every token
request as [client id, CLOCK_MONOTONIC arrival, status]), ``reset`` and
``quit``.  It also stops when stdin closes, so it never outlives its parent.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import tenant_id, tenant_secret
from tokenfleet.testing import FakeIdP


def main() -> int:
    """Serve until told to quit or until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, required=True)
    parser.add_argument("--expires-in", type=float, default=3600.0)
    parser.add_argument("--latency", type=float, nargs=2, default=(0.0, 0.0))
    args = parser.parse_args()

    low, high = args.latency
    idp = FakeIdP(
        expires_in=args.expires_in,
        latency=(low, high) if high > low else low,
        clock=_rounded_up_time,
    )
    for index in range(args.tenants):
        idp.add_client(tenant_id(index), tenant_secret(index))

    with idp.running_in_thread():
        _reply({"token_url": idp.token_url})
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command == "issued":
                _reply({"issued": _issued_by_client(idp)})
            elif command == "requests":
                _reply(
                    {"requests": [[r.client_id, r.at, r.status] for r in idp.requests]}
                )
            elif command == "reset":
                idp.reset_counts()
                _reply({"ok": True})
            else:
                _reply({"error": f"unknown command {command!r}"})

    return 0


def _rounded_up_time() -> float:
    # The IdP writes whole seconds into a token's exp claim, and the cache
    # trusts an exp earlier than expires_in: with the true time, a 5 s token
    # could live anywhere from 4 to 5 s.  Rounding the IdP's clock up keeps
    # exp at or after the moment expires_in ends.
    return float(math.ceil(time.time()))


def _issued_by_client(idp: FakeIdP) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in idp.requests:
        if request.status == 200 and request.client_id is not None:
            counts[request.client_id] = counts.get(request.client_id, 0) + 1
    return counts


def _reply(answer: object) -> None:
    sys.stdout.write(orjson.dumps(answer).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
