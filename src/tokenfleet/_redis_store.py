"""The Redis store: entries, leases and failure records shared by a fleet.

Every operation that reads and writes is one Lua script, so it is atomic in
Redis; every script touches only keys of one entry, which share a hash tag
and therefore a Redis Cluster slot.  Notices go out on one pub/sub channel
per namespace, read by one connection per process.

Outages are handled by a circuit breaker: the first failed operation opens
it, and until a background probe gets an answer, every operation fails at
once with `StoreUnavailableError` instead of waiting on Redis again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from ._clock import Clock
from ._keys import KeySchema
from ._store import EMPTY, NoticeHandler, Outcome, Snapshot, StoreUnavailableError

logger = logging.getLogger("tokenfleet.redis")

# KEYS: token, lease, failure.  ARGV: owner, lease ms, due-below ms.
# Returns {outcome, payload, ttl, failure, failure ttl, lease ttl} with outcome
# 0 present (token not due), 1 won, 2 held, 3 failed.  Checking the token
# and taking the lease in one script is what makes "check again after
# winning" free.  A lease already named after the caller counts as won: a
# call whose reply was lost to a timeout may run the script a second time.
_ACQUIRE = """
local payload = redis.call('GET', KEYS[1])
local ttl = -2
if payload then
  ttl = redis.call('PTTL', KEYS[1])
  if ttl > tonumber(ARGV[3]) then
    return {0, payload, ttl}
  end
end
local failure = redis.call('GET', KEYS[3])
if failure then
  return {3, payload, ttl, failure, redis.call('PTTL', KEYS[3])}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, payload, ttl}
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  return {1, payload, ttl}
end
return {2, payload, ttl, false, -2, redis.call('PTTL', KEYS[2])}
"""

# KEYS: lease.  ARGV: owner, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: token, lease, failure.  ARGV: owner, payload, ttl ms, channel, notice.
# Writes only while the caller still owns the lease, so a holder whose lease
# ran out can never overwrite a newer token.
_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: lease, failure.  ARGV: owner, failure, ttl ms, channel, notice.
_FAIL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: lease.  ARGV: owner, channel, notice.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: token.  ARGV: digest, channel, notice.  Compare and delete: a newer
# token is left alone.  The notice goes out either way, so every process
# drops its own copy of the named token.
_INVALIDATE = """
local deleted = 0
local payload = redis.call('GET', KEYS[1])
if payload and string.sub(payload, 1, 32) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  deleted = 1
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return deleted
"""

# KEYS: token.  ARGV: payload, ttl ms, channel, notice.  Returns nothing when
# it stored the token, else the digest of the token already there.
_WRITE_BACK = """
local current = redis.call('GET', KEYS[1])
if current then
  return string.sub(current, 1, 32)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return false
"""

# KEYS: cooldown.  Returns {record, ttl} or an empty list.
_COOLDOWN = """
local record = redis.call('GET', KEYS[1])
if record then
  return {record, redis.call('PTTL', KEYS[1])}
end
return {}
"""

# A timeout that fires this late (as a share of redis_timeout) shows an
# event loop too busy to read replies, not a Redis that does not answer; the
# call then waits up to this many times redis_timeout before the breaker opens.
_BUSY_LATENESS = 0.2
_BUSY_TIMEOUT_FACTOR = 8


class _TimedOutError(Exception):
    """A Redis call ran out of time; `lateness` is how late the timeout fired."""

    def __init__(self, lateness: float) -> None:
        super().__init__(f"Redis did not answer in time (timer {lateness:.3f} s late).")
        self.lateness = lateness


_OUTCOMES = (Outcome.PRESENT, Outcome.WON, Outcome.HELD, Outcome.FAILED)


def _int(value: Any, default: int = -2) -> int:
    return int(value) if value is not None else default


def _snapshot(reply: list[Any], offset: int) -> Snapshot:
    padded = list(reply[offset:]) + [None] * 5
    return Snapshot(
        payload=padded[0],
        ttl_ms=_int(padded[1]) if padded[0] is not None else -2,
        failure=padded[2],
        failure_ttl_ms=_int(padded[3]) if padded[2] is not None else -2,
        lease_ttl_ms=_int(padded[4]),
    )


class RedisStore:
    """The store contract on a Redis server, shared by every process using it."""

    def __init__(
        self,
        client: aioredis.Redis,
        schema: KeySchema,
        clock: Clock,
        *,
        owns_client: bool,
        timeout: float | None = None,
        probe_interval: float = 0.5,
        max_probe_interval: float = 1.0,
    ) -> None:
        self._client = client
        # Bounds each operation, connecting included (None: the client's own
        # timeouts alone).
        self._timeout = timeout
        self._schema = schema
        self._clock = clock
        self._owns_client = owns_client
        self._probe_interval = probe_interval
        self._max_probe_interval = max_probe_interval
        self._handler: NoticeHandler | None = None
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("commit", _COMMIT),
                ("fail", _FAIL),
                ("release", _RELEASE),
                ("invalidate", _INVALIDATE),
                ("write_back", _WRITE_BACK),
                ("cooldown", _COOLDOWN),
            )
        }
        # redis-py's pool refuses a connection beyond its size at once ("Too
        # many connections"), which would trip the breaker when many entries
        # go cold together; scripts queue here instead, leaving room in the
        # pool for the notice connection and the probe.
        pool_size = getattr(client.connection_pool, "max_connections", 100)
        self._script_slots = asyncio.Semaphore(max(1, min(64, pool_size - 4)))
        self._broken = False
        self._probe_key = f"{schema.namespace}:probe"
        self._probe_task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._recovery_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._outage_callbacks: list[Callable[[], None]] = []
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, schema: KeySchema, clock: Clock, *, timeout: float
    ) -> RedisStore:
        """Connect to *url* with short timeouts and no client-side retries.

        Retrying inside redis-py would multiply the wait of every call during
        an outage; the breaker and the fallback handle failures instead.
        Operations are bounded by *timeout* here rather than by redis-py's
        ``socket_timeout``, which wraps each write in ``asyncio.wait_for``:
        on Python 3.11 that drops a cancellation arriving as the write
        completes, and a lookup cancelled by ``aclose()`` would carry on.
        """
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        return cls(client, schema, clock, owns_client=True, timeout=timeout)

    @property
    def available(self) -> bool:
        """False while the breaker is open."""
        return not self._broken

    def on_recovery(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run *callback* each time Redis answers again after an outage."""
        self._recovery_callbacks.append(callback)

    def on_outage(self, callback: Callable[[], None]) -> None:
        """Call *callback* each time an outage starts (the breaker opens)."""
        self._outage_callbacks.append(callback)

    def set_notice_handler(self, handler: NoticeHandler) -> None:
        """Deliver notices from the channel to *handler*."""
        self._handler = handler

    async def start(self) -> None:
        """Start listening for notices; a Redis that is down is not an error here."""
        self._listener_task = asyncio.create_task(
            self._listen(), name="tokenfleet-notices"
        )
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except (RedisError, OSError) as exc:
            self._trip(exc)

    async def aclose(self) -> None:
        """Stop the listener and the probe, and close a client this store created."""
        self._closed = True
        tasks = [t for t in (self._listener_task, self._probe_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    # Breaker -----------------------------------------------------------------

    def _trip(self, exc: BaseException) -> None:
        if self._broken or self._closed:
            return
        self._broken = True
        logger.warning(
            "redis.unavailable",
            extra={"error": type(exc).__name__, "detail": str(exc)[:200]},
        )
        self._probe_task = asyncio.create_task(
            self._probe(), name="tokenfleet-redis-probe"
        )
        # The notice connection may be stuck on a dead socket without noticing
        # (a blackholed network raises nothing); start it afresh on recovery.
        if self._listener_task is not None:
            self._listener_task.cancel()
        for callback in self._outage_callbacks:
            callback()

    async def _probe(self) -> None:
        interval = self._probe_interval
        started = self._clock.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                # A write, not a PING: a read-only replica, a full (OOM) or a
                # loading server answers PING but refuses every script, and
                # recovering on PING would flap between the two states.
                async with asyncio.timeout(self._timeout):
                    await self._client.set(self._probe_key, b"1", px=1000)
            except (RedisError, OSError):
                interval = min(self._max_probe_interval, interval * 2)
                continue
            break

        # Idle connections opened before the outage may lead to a server that
        # is gone; redis-py can hand them out unchecked, and the first script
        # sent on one would open the breaker again right away.
        await self._client.connection_pool.disconnect(inuse_connections=False)
        self._broken = False
        self._listener_task = asyncio.create_task(
            self._listen(), name="tokenfleet-notices"
        )
        logger.warning(
            "redis.recovered",
            extra={"outage_seconds": round(self._clock.monotonic() - started, 3)},
        )
        for callback in self._recovery_callbacks:
            try:
                await callback()
            except (
                Exception
            ):  # a failed write-back must not stop the probe's bookkeeping
                logger.debug("redis.recovery_callback_failed", exc_info=True)

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self._check_breaker()
        async with self._script_slots:
            # Checked after queueing too: once the breaker opens, the queue
            # empties at once instead of waiting on Redis call by call.
            self._check_breaker()
            return await self._run_script(script, keys, args)

    def _check_breaker(self) -> None:
        if self._broken:
            msg = "Redis is unavailable (the circuit breaker is open)."
            raise StoreUnavailableError(msg)

    async def _run_script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        timeout = self._timeout
        try:
            return await self._answer(script, keys, args, timeout)
        except _TimedOutError as exc:
            if timeout is None or exc.lateness < timeout * _BUSY_LATENESS:
                self._trip(exc)
                msg = f"Redis did not answer the {script} script in time."
                raise StoreUnavailableError(msg) from exc

        # The timeout itself fired late: this process's event loop (or the
        # host) is too busy to read replies in time, which says nothing about
        # Redis.  Opening the breaker would send every process to the IdP and
        # load the host further, so the call gets a longer second chance.
        # Every script is safe to run twice; see _ACQUIRE for the one case
        # that needs care.
        try:
            return await self._answer(
                script, keys, args, timeout * _BUSY_TIMEOUT_FACTOR
            )
        except _TimedOutError as exc:
            self._trip(exc)
            msg = f"Redis did not answer the {script} script in time."
            raise StoreUnavailableError(msg) from exc

    async def _answer(
        self, script: str, keys: list[str], args: list[Any], timeout: float | None
    ) -> Any:
        """Run one script within *timeout*; map every Redis failure."""
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await self._scripts[script](keys=keys, args=args)
        except TimeoutError as exc:
            deadline = scope.when()
            now = asyncio.get_running_loop().time()
            late = now - deadline if deadline is not None else 0.0
            raise _TimedOutError(late) from exc
        except ResponseError as exc:
            # READONLY, OOM, LOADING, MASTERDOWN and the like: Redis answered
            # but cannot serve us, which for the cache is an outage.
            self._trip(exc)
            msg = f"Redis refused the {script} script ({str(exc).split(' ', 1)[0]})."
            raise StoreUnavailableError(msg) from exc
        except (RedisError, OSError) as exc:
            self._trip(exc)
            msg = f"Redis did not answer the {script} script ({type(exc).__name__})."
            raise StoreUnavailableError(msg) from exc

    # Notices -----------------------------------------------------------------

    async def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self._timeout):
                await pubsub.subscribe(self._schema.channel)
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message is not None:
                    self._deliver(message.get("data"))
        except (RedisError, OSError) as exc:
            # A lost notice connection is an outage like any other: the
            # breaker opens, waiters stop waiting for notices that cannot
            # come, and the probe starts a new listener once Redis is back.
            self._trip(exc)
        finally:
            await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    def _deliver(self, data: object) -> None:
        if self._handler is None or not isinstance(data, bytes):
            return
        parts = data.decode("ascii", "replace").split(" ")
        if len(parts) >= 2:
            self._handler(parts[0], parts[1], parts[2] if len(parts) > 2 else "")

    # Operations --------------------------------------------------------------

    def _entry_keys(self, eid: str) -> list[str]:
        schema = self._schema
        return [schema.token(eid), schema.lease(eid), schema.failure(eid)]

    async def acquire(
        self, eid: str, owner: str, lease_ms: int, due_below_ms: int
    ) -> tuple[Outcome, Snapshot]:
        """Take the lease unless a token that is not due, a failure or a lease is there."""
        reply = await self._run(
            "acquire", self._entry_keys(eid), [owner, lease_ms, due_below_ms]
        )
        return _OUTCOMES[int(reply[0])], _snapshot(reply, 1)

    async def renew(self, eid: str, owner: str, lease_ms: int) -> bool:
        """Extend the lease if *owner* still holds it."""
        reply = await self._run("renew", [self._schema.lease(eid)], [owner, lease_ms])
        return bool(reply)

    async def commit(
        self, eid: str, owner: str, payload: bytes, ttl_ms: int, digest: str
    ) -> bool:
        """Store the token if *owner* still holds the lease, release it, notify."""
        notice = f"c {eid} {digest}"
        reply = await self._run(
            "commit",
            self._entry_keys(eid),
            [owner, payload, ttl_ms, self._schema.channel, notice],
        )
        return bool(reply)

    async def fail(self, eid: str, owner: str, failure: bytes, ttl_ms: int) -> bool:
        """Record a failure if *owner* still holds the lease, release it, notify."""
        schema = self._schema
        reply = await self._run(
            "fail",
            [schema.lease(eid), schema.failure(eid)],
            [owner, failure, ttl_ms, schema.channel, f"f {eid}"],
        )
        return bool(reply)

    async def release(self, eid: str, owner: str) -> None:
        """Give the lease up without a token, if *owner* holds it."""
        schema = self._schema
        await self._run(
            "release", [schema.lease(eid)], [owner, schema.channel, f"r {eid}"]
        )

    async def invalidate(self, eid: str, digest: str) -> bool:
        """Delete the token if it is the one named by *digest*; always notify."""
        schema = self._schema
        reply = await self._run(
            "invalidate",
            [schema.token(eid)],
            [digest, schema.channel, f"i {eid} {digest}"],
        )
        return bool(reply)

    async def write_back(
        self, eid: str, payload: bytes, ttl_ms: int, digest: str
    ) -> str | None:
        """Store a token only when Redis has none; else return the digest of Redis's."""
        schema = self._schema
        reply = await self._run(
            "write_back",
            [schema.token(eid)],
            [payload, ttl_ms, schema.channel, f"c {eid} {digest}"],
        )
        return reply.decode("ascii") if isinstance(reply, bytes) else None

    async def endpoint_cooldown(self, uid: str) -> Snapshot:
        """Return the cooldown of a token URL as a failure record, if any."""
        reply = await self._run("cooldown", [self._schema.endpoint_cooldown(uid)], [])
        if not reply:
            return EMPTY
        return Snapshot(failure=reply[0], failure_ttl_ms=int(reply[1]))

    async def set_endpoint_cooldown(self, uid: str, record: bytes, ttl_ms: int) -> None:
        """Pause every fetch from a token URL, fleet-wide, for *ttl_ms*."""
        if self._broken:
            msg = "Redis is unavailable (the circuit breaker is open)."
            raise StoreUnavailableError(msg)
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(
                    self._schema.endpoint_cooldown(uid), record, px=ttl_ms
                )
        except (RedisError, OSError) as exc:
            self._trip(exc)
            msg = f"Redis did not store the endpoint cooldown ({type(exc).__name__})."
            raise StoreUnavailableError(msg) from exc
