"""The in-memory store, used when no Redis is configured."""

from __future__ import annotations

import pytest

from _support import FakeClock
from tokenfleet._store import MemoryStore, Outcome


async def _has_token(store: MemoryStore, eid: str) -> bool:
    outcome, snapshot = await store.acquire(eid, "reader", 10_000, 0)
    return outcome is Outcome.PRESENT and snapshot.payload is not None


async def _commit(store: MemoryStore, eid: str, ttl_ms: int) -> None:
    outcome, _ = await store.acquire(eid, "owner", 10_000, 0)
    assert outcome is Outcome.WON
    assert await store.commit(eid, "owner", b"0" * 32 + b"{}", ttl_ms, "0" * 32)


@pytest.mark.anyio
async def test_expired_entries_are_forgotten() -> None:
    """Entries of keys no longer used do not pile up: expired ones are swept."""
    clock = FakeClock()
    store = MemoryStore(clock)
    for n in range(3000):
        await _commit(store, f"old-{n}", ttl_ms=1000)
    clock.advance(2.0)

    for n in range(3000):
        await _commit(store, f"new-{n}", ttl_ms=60_000)

    assert len(store._slots) <= 3000 + 1024
    assert await _has_token(store, "new-0")
    assert await _has_token(store, "new-2999")


@pytest.mark.anyio
async def test_live_entries_survive_a_sweep() -> None:
    """A sweep keeps every entry whose token, lease or failure is still alive."""
    clock = FakeClock()
    store = MemoryStore(clock)
    for n in range(1500):
        await _commit(store, f"live-{n}", ttl_ms=60_000)
    leased, _ = await store.acquire("leased", "holder", 60_000, 0)

    for n in range(1500):
        await _commit(store, f"more-{n}", ttl_ms=60_000)

    assert leased is Outcome.WON
    assert all([await _has_token(store, f"live-{n}") for n in range(1500)])
    outcome, _ = await store.acquire("leased", "other", 60_000, 0)
    assert outcome is Outcome.HELD
