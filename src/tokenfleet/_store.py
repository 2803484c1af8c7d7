"""Where entries are shared: the store interface and its in-memory version.

A store keeps three things per entry id: the current token (with a TTL), a
lease naming the one owner allowed to fetch, and a failure record that makes
everyone back off for a while.  Every change that others may wait for is
announced as a notice.  `RedisStore` shares all of it across processes;
`MemoryStore` implements the same contract inside one process.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ._clock import Clock


class StoreUnavailableError(Exception):
    """The store cannot be used right now; the cache falls back to itself."""


class Outcome(enum.Enum):
    """What an attempt to take the lease found."""

    PRESENT = "present"  # a token that is not due is there: use it
    WON = "won"  # the lease is ours: fetch and commit
    HELD = "held"  # someone else holds the lease: wait for their notice
    FAILED = "failed"  # a failure record is there: back off


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the store holds for one entry at one moment.

    TTLs are in milliseconds as the store reports them; -2 means absent.
    """

    payload: bytes | None = None
    ttl_ms: int = -2
    failure: bytes | None = None
    failure_ttl_ms: int = -2
    lease_ttl_ms: int = -2


EMPTY = Snapshot()

# A notice is (kind, entry id, token digest); kinds: "c" commit, "i"
# invalidate, "f" failure recorded, "r" lease released without a token.
NoticeHandler = Callable[[str, str, str], None]


class Store(Protocol):
    """The operations the cache needs from a shared store."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def set_notice_handler(self, handler: NoticeHandler) -> None: ...

    async def acquire(
        self, eid: str, owner: str, lease_ms: int, due_below_ms: int
    ) -> tuple[Outcome, Snapshot]: ...

    async def renew(self, eid: str, owner: str, lease_ms: int) -> bool: ...

    async def commit(
        self, eid: str, owner: str, payload: bytes, ttl_ms: int, digest: str
    ) -> bool: ...

    async def fail(self, eid: str, owner: str, failure: bytes, ttl_ms: int) -> bool: ...

    async def release(self, eid: str, owner: str) -> None: ...

    async def invalidate(self, eid: str, digest: str) -> bool: ...

    async def write_back(
        self, eid: str, payload: bytes, ttl_ms: int, digest: str
    ) -> str | None: ...

    async def endpoint_cooldown(self, uid: str) -> Snapshot: ...

    async def set_endpoint_cooldown(
        self, uid: str, record: bytes, ttl_ms: int
    ) -> None: ...


def payload_digest(payload: bytes) -> str:
    """Return the token digest an entry payload starts with."""
    return payload[:32].decode("ascii")


class _Slot:
    __slots__ = (
        "failure",
        "failure_until",
        "lease",
        "lease_until",
        "payload",
        "payload_until",
    )

    def __init__(self) -> None:
        self.payload: bytes | None = None
        self.payload_until = 0.0
        self.lease: str | None = None
        self.lease_until = 0.0
        self.failure: bytes | None = None
        self.failure_until = 0.0


class MemoryStore:
    """The store contract inside one process, for use without Redis.

    Operations complete without awaiting anything, so each is atomic on the
    event loop just as a Lua script is atomic in Redis.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._sweep_at = 1024
        self._cooldowns: dict[str, tuple[bytes, float]] = {}
        self._handler: NoticeHandler | None = None

    async def start(self) -> None:
        """Nothing to connect to."""

    async def aclose(self) -> None:
        """Forget every entry."""
        self._slots.clear()

    def set_notice_handler(self, handler: NoticeHandler) -> None:
        """Deliver notices to *handler*."""
        self._handler = handler

    def _notify(self, kind: str, eid: str, digest: str = "") -> None:
        if self._handler is not None:
            self._handler(kind, eid, digest)

    def _slot(self, eid: str) -> _Slot:
        slot = self._slots.get(eid)
        if slot is None:
            if len(self._slots) >= self._sweep_at:
                self._sweep()
            slot = self._slots[eid] = _Slot()
        return slot

    def _sweep(self) -> None:
        """Forget entries whose token, lease and failure have all expired."""
        for eid, slot in list(self._slots.items()):
            snapshot = self._snapshot(slot)
            if (
                snapshot.payload is None
                and snapshot.failure is None
                and slot.lease is None
            ):
                del self._slots[eid]
        # Sweep again when the live entries have doubled, so that sweeping
        # costs a constant amount per entry created.
        self._sweep_at = max(1024, 2 * len(self._slots))

    def _snapshot(self, slot: _Slot) -> Snapshot:
        now = self._clock.monotonic()
        payload, ttl = slot.payload, round((slot.payload_until - now) * 1000)
        if payload is not None and ttl <= 0:
            slot.payload, payload, ttl = None, None, -2
        failure, failure_ttl = slot.failure, round((slot.failure_until - now) * 1000)
        if failure is not None and failure_ttl <= 0:
            slot.failure, failure, failure_ttl = None, None, -2
        lease_ttl = round((slot.lease_until - now) * 1000)
        if slot.lease is not None and lease_ttl <= 0:
            slot.lease, lease_ttl = None, -2

        return Snapshot(
            payload=payload,
            ttl_ms=ttl if payload is not None else -2,
            failure=failure,
            failure_ttl_ms=failure_ttl if failure is not None else -2,
            lease_ttl_ms=lease_ttl if slot.lease is not None else -2,
        )

    async def acquire(
        self, eid: str, owner: str, lease_ms: int, due_below_ms: int
    ) -> tuple[Outcome, Snapshot]:
        """Take the lease unless a token that is not due, a failure or a lease is there."""
        slot = self._slot(eid)
        snapshot = self._snapshot(slot)
        if snapshot.payload is not None and snapshot.ttl_ms > due_below_ms:
            return Outcome.PRESENT, snapshot
        if snapshot.failure is not None:
            return Outcome.FAILED, snapshot
        if slot.lease is not None:
            return Outcome.HELD, snapshot

        slot.lease = owner
        slot.lease_until = self._clock.monotonic() + lease_ms / 1000
        return Outcome.WON, snapshot

    async def renew(self, eid: str, owner: str, lease_ms: int) -> bool:
        """Extend the lease if *owner* still holds it."""
        slot = self._slot(eid)
        self._snapshot(slot)
        if slot.lease != owner:
            return False
        slot.lease_until = self._clock.monotonic() + lease_ms / 1000
        return True

    async def commit(
        self, eid: str, owner: str, payload: bytes, ttl_ms: int, digest: str
    ) -> bool:
        """Store the token if *owner* still holds the lease, release it, notify."""
        slot = self._slot(eid)
        self._snapshot(slot)
        if slot.lease != owner:
            return False

        slot.payload, slot.payload_until = (
            payload,
            self._clock.monotonic() + ttl_ms / 1000,
        )
        slot.lease = slot.failure = None
        self._notify("c", eid, digest)
        return True

    async def fail(self, eid: str, owner: str, failure: bytes, ttl_ms: int) -> bool:
        """Record a failure if *owner* still holds the lease, release it, notify."""
        slot = self._slot(eid)
        self._snapshot(slot)
        if slot.lease != owner:
            return False

        slot.failure, slot.failure_until = (
            failure,
            self._clock.monotonic() + ttl_ms / 1000,
        )
        slot.lease = None
        self._notify("f", eid)
        return True

    async def release(self, eid: str, owner: str) -> None:
        """Give the lease up without a token, if *owner* holds it."""
        slot = self._slots.get(eid)
        if slot is not None and slot.lease == owner:
            slot.lease = None
            self._notify("r", eid)

    async def invalidate(self, eid: str, digest: str) -> bool:
        """Delete the token if it is the one named by *digest*; always notify."""
        slot = self._slots.get(eid)
        deleted = False
        if slot is not None:
            snapshot = self._snapshot(slot)
            if (
                snapshot.payload is not None
                and payload_digest(snapshot.payload) == digest
            ):
                slot.payload = None
                deleted = True
        self._notify("i", eid, digest)
        return deleted

    async def write_back(
        self, eid: str, payload: bytes, ttl_ms: int, digest: str
    ) -> str | None:
        """Store a token only when none is there; else return the digest of the one there."""
        slot = self._slot(eid)
        current = self._snapshot(slot).payload
        if current is not None:
            return payload_digest(current)
        slot.payload, slot.payload_until = (
            payload,
            self._clock.monotonic() + ttl_ms / 1000,
        )
        self._notify("c", eid, digest)
        return None

    async def endpoint_cooldown(self, uid: str) -> Snapshot:
        """Return the cooldown of a token URL as a failure record, if any."""
        record, until = self._cooldowns.get(uid, (b"", 0.0))
        ttl_ms = round((until - self._clock.monotonic()) * 1000)
        if ttl_ms <= 0:
            self._cooldowns.pop(uid, None)
            return EMPTY
        return Snapshot(failure=record, failure_ttl_ms=ttl_ms)

    async def set_endpoint_cooldown(self, uid: str, record: bytes, ttl_ms: int) -> None:
        """Pause every fetch from a token URL for *ttl_ms*."""
        self._cooldowns[uid] = (record, self._clock.monotonic() + ttl_ms / 1000)
