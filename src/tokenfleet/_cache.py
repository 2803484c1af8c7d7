"""The fleet token cache.

A lookup goes through up to three layers:

1. the in-process layer, a bounded dict of tokens with deadlines on the
   monotonic clock; a warm hit does no I/O;
2. the store (Redis, or memory when no Redis is configured), read and
   written with atomic scripts;
3. the IdP, asked by exactly one worker of the fleet: the one that takes the
   entry's lease.

Tokens are refreshed ahead of expiry in the background, so callers keep
receiving the current token while one worker fetches the next.  Only a
caller with no valid token ever waits, and then it waits for a notice, not
on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import secrets
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio as aioredis

from ._clock import SYSTEM_CLOCK, Clock, monotonic
from ._endpoint import BasicAuthEncoding, RetryPolicy, TokenEndpointClient
from ._errors import (
    CacheClosedError,
    ConfigurationError,
    IdPUnavailableError,
    InvalidClientError,
    InvalidScopeError,
    MalformedResponseError,
    RateLimitedError,
    TokenEndpointError,
    TokenFleetError,
)
from ._keys import (
    DEFAULT_FINGERPRINT_KEY,
    KeySchema,
    check_namespace,
    entry_id,
    fingerprint,
    token_digest,
    url_id,
)
from ._models import ClientCredentials, Token, TokenResponse, normalize_scopes
from ._redis_store import RedisStore
from ._regions import resolve_region
from ._store import MemoryStore, Outcome, Snapshot, Store, StoreUnavailableError

logger = logging.getLogger("tokenfleet.cache")

# Errors that may be remembered in a failure record, by the name stored there.
_FAILURE_TYPES: dict[str, type[TokenFleetError]] = {
    cls.__name__: cls
    for cls in (
        InvalidClientError,
        InvalidScopeError,
        TokenEndpointError,
        RateLimitedError,
        IdPUnavailableError,
        MalformedResponseError,
    )
}


def _entry_payload(
    access_token: str, token_type: str, refresh_below: float, margin: float
) -> tuple[bytes, str]:
    """Return the stored form of a token entry, and the token's digest."""
    digest = token_digest(access_token)
    body = orjson.dumps(
        {
            "t": access_token,
            "y": token_type,
            "r": round(refresh_below * 1000),
            "m": round(margin * 1000),
        }
    )
    return digest.encode("ascii") + body, digest


def _failure_record(exc: TokenFleetError) -> bytes:
    """Serialize an error so that other workers can raise the same one."""
    return orjson.dumps(
        {
            "k": type(exc).__name__,
            "m": str(exc),
            "e": getattr(exc, "error", None),
            "d": getattr(exc, "error_description", None),
            "s": getattr(exc, "status", None),
            "a": getattr(exc, "retry_after", None),
            "w": getattr(exc, "endpoint_wide", False),
        }
    )


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one `TokenCache` since it was created.

    `local_hits` were served from the in-process layer without I/O,
    `store_hits` from Redis (or the memory store), `idp_fetches` are token
    requests this process made, `waits` are lookups that waited for another
    worker's fetch, `refresh_ahead` are background refreshes this process
    performed, `fallback_fetches` were made while Redis was unavailable,
    `write_backs` are tokens this process put back into Redis after an
    outage (fetched during it, or lost by a restarted Redis), and
    `errors` counts failed lookups by error class.
    """

    local_hits: int
    store_hits: int
    idp_fetches: int
    waits: int
    refresh_ahead: int
    fallback_fetches: int
    write_backs: int
    invalidations: int
    local_entries: int
    errors: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Request:
    """Everything known about one (credentials, URL, scopes) combination."""

    eid: str
    credentials: ClientCredentials
    token_url: str
    scopes: tuple[str, ...]
    url_id: str


class _LocalEntry:
    """A token in the in-process layer, with deadlines on the monotonic clock."""

    __slots__ = (
        "digest",
        "expire_at",
        "margin",
        "refresh_at",
        "refresh_below",
        "request",
        "token",
    )

    def __init__(
        self,
        token: Token,
        digest: str,
        *,
        expire_at: float,
        refresh_at: float,
        refresh_below: float,
        margin: float,
        request: _Request,
    ) -> None:
        self.token = token
        self.digest = digest
        self.expire_at = expire_at
        self.refresh_at = refresh_at
        self.refresh_below = refresh_below
        self.margin = margin
        self.request = request


class _Cooldowns:
    """Failure records kept in this process, each until its cooldown ends.

    Serves what Redis cannot hold for the fleet: cooldowns of whole token
    URLs, which every entry of the URL checks before fetching, and failures
    of fetches made while Redis was unavailable.  Times are on the
    monotonic clock.
    """

    def __init__(self, now: Callable[[], float], limit: int) -> None:
        self._now = now
        self._limit = limit
        self._records: dict[str, tuple[float, bytes]] = {}

    def remember(self, key: str, seconds: float, record: bytes) -> None:
        """Keep *record* for *key* during *seconds*."""
        now = self._now()
        if len(self._records) >= self._limit:
            self._records = {
                known_key: known
                for known_key, known in self._records.items()
                if known[0] > now
            }
        self._records[key] = (now + seconds, record)

    def active(self, key: str) -> Snapshot | None:
        """Return the record of *key* as a failure snapshot, if still cooling down."""
        known = self._records.get(key)
        if known is None:
            return None
        left = known[0] - self._now()
        if left <= 0:
            del self._records[key]
            return None
        return Snapshot(failure=known[1], failure_ttl_ms=round(left * 1000))


class _CorruptEntryError(Exception):
    """The store holds an entry this version cannot read."""


def _check_fraction(name: str, value: float, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not low < value < high
    ):
        msg = f"{name} must be a number between {low} and {high} (exclusive), not {value!r}."
        raise ConfigurationError(msg)
    return float(value)


def _check_seconds(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or not math.isfinite(value)
    ):
        msg = f"{name} must be a positive number of seconds, not {value!r}."
        raise ConfigurationError(msg)
    return float(value)


class TokenCache:
    """Client-credentials tokens shared by every process of a fleet.

    With *redis_url* (or an existing ``redis.asyncio`` client as *redis*),
    tokens live in Redis and exactly one worker of the fleet fetches each
    token.  Without either, the cache lives in this process only.

    Use it as an async context manager, or call `start` and `aclose`.

    Timing settings, all relative to a token's lifetime *L* (``expires_in``):

    - a token stops being served ``min(max_margin, margin_ratio * L)``
      seconds before it expires (its *safety margin*);
    - one worker refreshes it in the background after ``refresh_ratio * L``,
      drawn a little earlier at random (``refresh_jitter``) so that entries
      fetched together do not come due together;
    - the worker fetching holds a lease of ``request_timeout + 1`` seconds,
      renewed while it works, so a crashed worker is replaced within that.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: aioredis.Redis | None = None,
        namespace: str = "tokenfleet",
        endpoint: TokenEndpointClient | None = None,
        basic_auth: BasicAuthEncoding = "rfc6749",
        request_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        refresh_ratio: float = 0.75,
        refresh_jitter: float = 0.05,
        margin_ratio: float = 0.1,
        max_margin: float = 60.0,
        failure_ttl: float = 30.0,
        unavailable_cooldown: float = 2.0,
        max_cooldown: float = 300.0,
        local_max_entries: int = 10_000,
        redis_timeout: float = 0.25,
        fingerprint_key: bytes | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if redis_url is not None and redis is not None:
            msg = "Pass either redis_url or redis, not both."
            raise ConfigurationError(msg)
        self._refresh_ratio = _check_fraction("refresh_ratio", refresh_ratio, 0.0, 1.0)
        self._refresh_jitter = _check_fraction(
            "refresh_jitter", refresh_jitter, -1e-12, 0.25
        )
        self._margin_ratio = _check_fraction("margin_ratio", margin_ratio, 0.0, 0.5)
        if self._refresh_ratio + self._margin_ratio >= 1.0:
            msg = (
                f"refresh_ratio ({refresh_ratio}) plus margin_ratio ({margin_ratio}) must stay "
                "below 1, or tokens would stop being served before their refresh starts."
            )
            raise ConfigurationError(msg)
        self._max_margin = _check_seconds("max_margin", max_margin)
        self._failure_ttl = _check_seconds("failure_ttl", failure_ttl)
        self._unavailable_cooldown = _check_seconds(
            "unavailable_cooldown", unavailable_cooldown
        )
        self._max_cooldown = _check_seconds("max_cooldown", max_cooldown)
        self._redis_timeout = _check_seconds("redis_timeout", redis_timeout)
        if (
            isinstance(local_max_entries, bool)
            or not isinstance(local_max_entries, int)
            or local_max_entries < 1
        ):
            msg = f"local_max_entries must be a positive integer, not {local_max_entries!r}."
            raise ConfigurationError(msg)
        self._local_max = local_max_entries
        if fingerprint_key is not None and (
            not isinstance(fingerprint_key, bytes) or len(fingerprint_key) < 16
        ):
            msg = "fingerprint_key must be at least 16 bytes."
            raise ConfigurationError(msg)
        self._fingerprint_key = fingerprint_key or DEFAULT_FINGERPRINT_KEY

        self._clock = clock or SYSTEM_CLOCK
        # The system clock's function directly: one Python frame less per hit.
        self._now = monotonic if clock is None else clock.monotonic
        self._rng = rng or random.Random()
        self._schema = KeySchema(check_namespace(namespace))
        self._redis_url = redis_url
        self._redis_client = redis

        self._owns_endpoint = endpoint is None
        self._endpoint = endpoint or TokenEndpointClient(
            basic_auth=basic_auth,
            request_timeout=request_timeout,
            retry=retry,
            clock=self._clock,
            rng=self._rng,
        )
        lease_seconds = self._endpoint.request_timeout + 1.0
        self._lease_ms = round(lease_seconds * 1000)
        self._wait_timeout = self._endpoint.retry.deadline + lease_seconds

        self._store: Store = MemoryStore(self._clock)
        self._redis_store: RedisStore | None = None
        self._owner_prefix = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._owner_counter = itertools.count()

        self._local: dict[str, _LocalEntry] = {}
        self._requests: dict[tuple[object, ...], _Request] = {}
        self._inflight: dict[str, asyncio.Future[Token]] = {}
        self._refreshing: set[str] = set()
        self._waiters: dict[str, asyncio.Event] = {}
        self._endpoint_cooldowns = _Cooldowns(self._now, self._local_max)
        # Failures of fetches made while Redis could not record them, kept
        # here instead so a failing IdP is not asked again by every caller
        # during an outage.
        self._local_failures = _Cooldowns(self._now, self._local_max)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False

        self._local_hits = 0
        self._store_hits = 0
        self._idp_fetches = 0
        self._waits = 0
        self._refresh_ahead = 0
        self._fallback_fetches = 0
        self._write_backs = 0
        self._invalidations = 0
        self._errors: dict[str, int] = {}

    def __repr__(self) -> str:
        backend = (
            "redis"
            if self._redis_store is not None or self._redis_url or self._redis_client
            else "memory"
        )
        return f"<TokenCache namespace={self._schema.namespace!r} store={backend} entries={len(self._local)}>"

    # Lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> TokenCache:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect the store and start listening for notices.

        A Redis that cannot be reached is not an error: the cache starts in
        fallback mode and joins the fleet when Redis answers.
        """
        if self._closed:
            msg = "This TokenCache is closed; create a new one."
            raise CacheClosedError(msg)
        if self._started:
            return
        self._started = True

        if self._redis_url is not None:
            self._redis_store = RedisStore.from_url(
                self._redis_url, self._schema, self._clock, timeout=self._redis_timeout
            )
        elif self._redis_client is not None:
            self._redis_store = RedisStore(
                self._redis_client,
                self._schema,
                self._clock,
                owns_client=False,
                timeout=self._redis_timeout,
            )
        if self._redis_store is not None:
            self._redis_store.on_recovery(self._write_back_local)
            self._redis_store.on_outage(self._wake_waiters)
            self._store = self._redis_store

        self._store.set_notice_handler(self._on_notice)
        await self._store.start()
        logger.debug(
            "cache.started",
            extra={
                "namespace": self._schema.namespace,
                "shared": self._redis_store is not None,
            },
        )

    async def aclose(self) -> None:
        """Stop background work, release held leases and close connections."""
        if self._closed:
            return
        self._closed = True

        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._inflight.values():
            if not future.done():
                future.set_exception(
                    CacheClosedError("The TokenCache was closed during the lookup.")
                )

        await self._store.aclose()
        if self._owns_endpoint:
            await self._endpoint.aclose()
        self._local.clear()
        logger.debug("cache.closed", extra={"namespace": self._schema.namespace})

    # Public API -----------------------------------------------------------------

    async def get_token(
        self,
        credentials: ClientCredentials,
        *,
        stage: str | None = None,
        cell: str | None = None,
        token_url: str | None = None,
        scopes: Iterable[str] | str | None = None,
    ) -> Token:
        """Return a valid token for *credentials* and *scopes*.

        Name the endpoint either with *stage* and *cell* (Resistant Documents)
        or with *token_url* (any OAuth2 IdP).  Scope order and duplicates do
        not matter.
        """
        # The memo maps the arguments as given to the resolved request, so a
        # warm lookup skips validation and hashing.  Lists are the usual
        # scopes; any other iterable is read once, here, since an iterator
        # cannot be read twice.
        # Arguments that cannot be a memo key (not credentials, unhashable,
        # not iterable) go to _resolve, which says what is wrong with them.
        memo: tuple[object, ...]
        try:
            if type(scopes) is list:
                scope_key: object = tuple(scopes)
            elif scopes is None or type(scopes) is str or type(scopes) is tuple:
                scope_key = scopes
            else:
                scopes = scope_key = tuple(scopes)
            memo = (
                credentials.client_id,
                credentials.client_secret,
                stage,
                cell,
                token_url,
                scope_key,
            )
            request = self._requests.get(memo)
        except (AttributeError, TypeError):
            memo, request = (), None
        if request is None:
            request = self._resolve(memo, credentials, stage, cell, token_url, scopes)

        local = self._local.get(request.eid)
        if local is not None:
            now = self._now()
            if now < local.refresh_at:
                self._local_hits += 1
                return local.token
            if now < local.expire_at:
                self._local_hits += 1
                self._refresh_soon(local)
                return local.token

        return await self._slow_path(request)

    async def invalidate(self, token: Token) -> bool:
        """Remove *token* from every process of the fleet.

        Only that exact token is removed: when a newer one has already
        replaced it, the newer one stays.  Returns whether the shared store
        held it.  Call this when an API answers 401 ``invalid_token``.
        """
        if not isinstance(token, Token) or not token._entry_key:
            msg = f"invalidate() needs a Token returned by get_token, not {type(token).__name__}."
            raise ConfigurationError(msg)
        self._check_open()

        digest = token_digest(token.access_token)
        local = self._local.get(token._entry_key)
        if local is not None and local.digest == digest:
            del self._local[token._entry_key]
        self._invalidations += 1

        try:
            deleted = await self._store.invalidate(token._entry_key, digest)
        except StoreUnavailableError:
            deleted = False
        logger.debug(
            "entry.invalidated", extra={"entry": token._entry_key, "deleted": deleted}
        )

        return deleted

    def stats(self) -> CacheStats:
        """Return the counters of this cache."""
        return CacheStats(
            local_hits=self._local_hits,
            store_hits=self._store_hits,
            idp_fetches=self._idp_fetches,
            waits=self._waits,
            refresh_ahead=self._refresh_ahead,
            fallback_fetches=self._fallback_fetches,
            write_backs=self._write_backs,
            invalidations=self._invalidations,
            local_entries=len(self._local),
            errors=dict(self._errors),
        )

    # Requests -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            msg = "This TokenCache is closed; create a new one."
            raise CacheClosedError(msg)
        if not self._started:
            msg = "This TokenCache is not started; use 'async with TokenCache(...)' or await start()."
            raise CacheClosedError(msg)

    def _resolve(
        self,
        memo: tuple[object, ...],
        credentials: ClientCredentials,
        stage: str | None,
        cell: str | None,
        token_url: str | None,
        scopes: Iterable[str] | str | None,
    ) -> _Request:
        self._check_open()
        if not isinstance(credentials, ClientCredentials):
            msg = f"credentials must be ClientCredentials, not {type(credentials).__name__}."
            raise ConfigurationError(msg)

        if token_url is not None:
            if stage is not None or cell is not None:
                msg = "Pass either token_url, or stage and cell, not both."
                raise ConfigurationError(msg)
            url = self._endpoint.check_token_url(token_url)
        elif stage is not None and cell is not None:
            url = resolve_region(stage, cell).token_url
        else:
            msg = "Name the token endpoint: pass stage and cell, or token_url."
            raise ConfigurationError(msg)

        normalized = normalize_scopes(scopes)
        secret_fingerprint = fingerprint(
            credentials.client_id, credentials.client_secret, self._fingerprint_key
        )
        request = _Request(
            eid=entry_id(url, credentials.client_id, normalized, secret_fingerprint),
            credentials=credentials,
            token_url=url,
            scopes=normalized,
            url_id=url_id(url),
        )

        # The memo only saves the hashing above; dropping it is harmless.
        if memo:
            if len(self._requests) >= 4 * self._local_max:
                self._requests.clear()
            self._requests[memo] = request

        return request

    # The slow path ----------------------------------------------------------------

    def _spawn(
        self, coroutine: Coroutine[Any, Any, Any], name: str
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _slow_path(self, request: _Request) -> Token:
        self._check_open()
        future = self._inflight.get(request.eid)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            # A caller that gave up must not leave an unretrieved exception.
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._inflight[request.eid] = future
            self._spawn(self._load(request, future), name="tokenfleet-load")

        # Shielded: one caller's cancellation must not cancel the shared load.
        try:
            return await asyncio.shield(future)
        except TokenFleetError as exc:
            name = type(exc).__name__
            self._errors[name] = self._errors.get(name, 0) + 1
            raise

    async def _load(self, request: _Request, future: asyncio.Future[Token]) -> None:
        try:
            token = await self._obtain(request)
        except asyncio.CancelledError:
            # Only aclose() cancels a load; its callers learn why.
            if not future.done():
                future.set_exception(
                    CacheClosedError("The TokenCache was closed during the lookup.")
                )
            raise
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(token)
        finally:
            if self._inflight.get(request.eid) is future:
                del self._inflight[request.eid]

    def _new_owner(self) -> str:
        return f"{self._owner_prefix}-{next(self._owner_counter)}"

    async def _obtain(self, request: _Request) -> Token:
        """Get a token from the store, from another worker's fetch, or from the IdP."""
        try:
            return await self._obtain_waiting(request)
        finally:
            # Lookups are single-flighted per entry, so the waiter left is
            # this lookup's; an idle entry must not keep an Event alive.
            self._waiters.pop(request.eid, None)

    async def _obtain_waiting(self, request: _Request) -> Token:
        deadline = self._now() + self._wait_timeout
        force = False
        while True:
            # Register before asking, so a notice sent in between is not lost.
            waiter = self._waiters.get(request.eid)
            if waiter is None:
                waiter = self._waiters[request.eid] = asyncio.Event()

            owner = self._new_owner()
            try:
                outcome, snapshot = await self._store.acquire(
                    request.eid, owner, self._lease_ms, 1 << 62 if force else 0
                )
            except StoreUnavailableError:
                return await self._fetch_unshared(request)

            if outcome is Outcome.PRESENT:
                try:
                    token = self._adopt(request, snapshot)
                except _CorruptEntryError:
                    force = True
                    continue
                self._store_hits += 1
                return token
            if outcome is Outcome.WON:
                return await self._fetch_and_commit(request, owner, refresh=False)
            if outcome is Outcome.FAILED:
                raise self._remembered_error(snapshot)

            await self._wait_for_notice(request, waiter, snapshot, deadline)

    async def _wait_for_notice(
        self,
        request: _Request,
        waiter: asyncio.Event,
        snapshot: Snapshot,
        deadline: float,
    ) -> None:
        remaining = deadline - self._now()
        if remaining <= 0:
            msg = (
                f"No token for client {request.credentials.client_id!r} arrived within "
                f"{self._wait_timeout:.1f} s while another worker held the fetch lease."
            )
            raise IdPUnavailableError(msg)

        self._waits += 1
        # The notice normally ends the wait; the timeout is only a backstop
        # for a lost notice or a holder that died, whose lease then expires.
        lease_left = snapshot.lease_ttl_ms / 1000 if snapshot.lease_ttl_ms > 0 else 0.05
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a
        # cancellation that arrives together with the notice, and aclose()
        # would then wait for this lookup to run to its end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, lease_left + 0.05, 2.0)):
                await waiter.wait()

    def _wake_waiters(self) -> None:
        # No notice will come through a broken Redis: waiters look again now,
        # find the store unavailable and fetch for this process.
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.set()

    def _on_notice(self, kind: str, eid: str, digest: str) -> None:
        waiter = self._waiters.pop(eid, None)
        if waiter is not None:
            waiter.set()

        local = self._local.get(eid)
        if local is None:
            return
        if kind == "c" and local.digest != digest:
            # Another worker committed a newer token: keep serving ours, and
            # pick the new one up in the background on the next lookup.
            local.refresh_at = 0.0
        elif kind == "i" and local.digest == digest:
            del self._local[eid]

    # Fetching -------------------------------------------------------------------

    def _plan(
        self, expires_in: float, fetch_seconds: float
    ) -> tuple[float, float, float]:
        """Return (store TTL, refresh-below, margin) in seconds for a lifetime."""
        margin = min(self._max_margin, expires_in * self._margin_ratio)
        ttl = expires_in - margin

        # XFetch-style: refresh early by an exponentially distributed amount,
        # scaled by the larger of the fetch time and a share of the lifetime,
        # and capped, so that entries fetched together spread out.
        # The cap keeps at least three quarters of the refresh age even when
        # a fetch is slow next to the lifetime; without it a slow IdP would
        # make a token due the moment it arrives.
        scale = max(fetch_seconds, self._refresh_jitter * expires_in)
        planned_age = self._refresh_ratio * expires_in
        early = min(
            3 * scale, planned_age / 4, -scale * math.log(1.0 - self._rng.random())
        )
        refresh_age = planned_age - early

        return ttl, max(0.0, ttl - refresh_age), margin

    def _remember(
        self,
        request: _Request,
        payload: bytes,
        ttl_seconds: float,
        read_at: float,
    ) -> Token:
        """Decode *payload* into the in-process layer and return its token."""
        try:
            digest = payload[:32].decode("ascii")
            fields = orjson.loads(payload[32:])
            access_token, token_type = fields["t"], fields["y"]
            refresh_below, margin = fields["r"] / 1000, fields["m"] / 1000
        except (UnicodeDecodeError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise _CorruptEntryError from exc

        token = Token(
            access_token=access_token,
            token_type=token_type,
            expires_at=self._clock.time() + ttl_seconds + margin,
            scopes=request.scopes,
            client_id=request.credentials.client_id,
            token_url=request.token_url,
            _entry_key=request.eid,
        )
        expire_at = read_at + ttl_seconds
        entry = _LocalEntry(
            token,
            digest,
            expire_at=expire_at,
            refresh_at=expire_at - refresh_below,
            refresh_below=refresh_below,
            margin=margin,
            request=request,
        )

        local = self._local
        local.pop(request.eid, None)
        if len(local) >= self._local_max:
            self._evict()
        local[request.eid] = entry

        return token

    def _evict(self) -> None:
        # dicts keep insertion order, and entries are re-inserted when
        # refreshed, so the first one is the least recently refreshed.  No
        # scan for expired entries: that would make every insertion into a
        # full layer cost as much as the layer is large.
        while len(self._local) >= self._local_max:
            del self._local[next(iter(self._local))]

    def _adopt(self, request: _Request, snapshot: Snapshot) -> Token:
        """Take a token read from the store into the in-process layer."""
        assert snapshot.payload is not None
        # The read started before now; counting from now would overstate the
        # remaining lifetime by the round trip, so count from a little before.
        read_at = self._now() - 0.001
        return self._remember(
            request, snapshot.payload, snapshot.ttl_ms / 1000, read_at
        )

    async def _fetch(self, request: _Request) -> tuple[TokenResponse, float]:
        await self._check_endpoint_cooldown(request)
        if self._closed:
            # redis-py sends with asyncio.wait_for, which on Python 3.11 can
            # drop the cancellation aclose() sent during the read above
            # (https://github.com/python/cpython/issues/86296); never start
            # an IdP request, which aclose() would wait out, after closing.
            raise asyncio.CancelledError

        started = self._now()
        self._idp_fetches += 1

        async def on_retry(exc: TokenFleetError, wait: float) -> None:
            # Tell the fleet at once, not after this request's retries: until
            # then, every other client of the URL would make its own request.
            if isinstance(exc, RateLimitedError) and exc.endpoint_wide:
                await self._start_endpoint_cooldown(request, exc)

        try:
            response = await self._endpoint.fetch(
                request.credentials,
                request.token_url,
                request.scopes,
                on_retry=on_retry,
            )
        except RateLimitedError as exc:
            if exc.endpoint_wide:
                await self._start_endpoint_cooldown(request, exc)
            raise

        return response, self._now() - started

    async def _check_endpoint_cooldown(self, request: _Request) -> None:
        """Refuse to call an IdP that asked every client of it to back off."""
        known = self._endpoint_cooldowns.active(request.url_id)
        if known is not None:
            raise self._remembered_error(known)

        try:
            snapshot = await self._store.endpoint_cooldown(request.url_id)
        except StoreUnavailableError:
            return
        if snapshot.failure is not None and snapshot.failure_ttl_ms > 0:
            self._endpoint_cooldowns.remember(
                request.url_id, snapshot.failure_ttl_ms / 1000, snapshot.failure
            )
            raise self._remembered_error(snapshot)

    async def _start_endpoint_cooldown(
        self, request: _Request, exc: RateLimitedError
    ) -> None:
        cooldown = self._cooldown(exc)
        record = _failure_record(exc)
        self._endpoint_cooldowns.remember(request.url_id, cooldown, record)
        logger.warning(
            "endpoint.cooldown",
            extra={"token_url": request.token_url, "cooldown": cooldown},
        )
        with contextlib.suppress(StoreUnavailableError):
            await self._store.set_endpoint_cooldown(
                request.url_id, record, round(cooldown * 1000)
            )

    async def _keep_lease(self, eid: str, owner: str) -> None:
        interval = self._lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._store.renew(eid, owner, self._lease_ms):
                    return
            except StoreUnavailableError:
                return

    async def _fetch_and_commit(
        self, request: _Request, owner: str, *, refresh: bool
    ) -> Token:
        """Fetch as the lease holder, then commit (or record the failure)."""
        renewal = self._spawn(
            self._keep_lease(request.eid, owner), name="tokenfleet-lease"
        )
        started = self._now()
        try:
            response, fetch_seconds = await self._fetch(request)
        except TokenFleetError as exc:
            renewal.cancel()
            await self._shielded(self._record_failure(request, owner, exc))
            raise
        except BaseException:
            renewal.cancel()
            await self._shielded(self._release(request.eid, owner))
            raise
        renewal.cancel()

        ttl, refresh_below, margin = self._plan(response.expires_in, fetch_seconds)
        payload, digest = _entry_payload(
            response.access_token, response.token_type, refresh_below, margin
        )
        try:
            shared = await self._shielded(
                self._store.commit(
                    request.eid, owner, payload, round(ttl * 1000), digest
                )
            )
        except StoreUnavailableError:
            shared = False
        if refresh:
            self._refresh_ahead += 1
        logger.debug(
            "entry.fetched",
            extra={
                "entry": request.eid,
                "client_id": request.credentials.client_id,
                "expires_in": response.expires_in,
                "shared": shared,
                "refresh": refresh,
            },
        )

        # A commit refused because our lease ran out still leaves us with a
        # valid token; it is served here but never overwrites a newer one.
        return self._remember(request, payload, ttl, started)

    async def _shielded(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run cleanup to the end even when the caller is being cancelled."""
        task = asyncio.get_running_loop().create_task(coroutine)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task
            raise

    async def _release(self, eid: str, owner: str) -> None:
        with contextlib.suppress(StoreUnavailableError):
            await self._store.release(eid, owner)

    def _cooldown(self, exc: TokenFleetError) -> float:
        if isinstance(exc, InvalidClientError | InvalidScopeError):
            return self._failure_ttl
        if (
            isinstance(exc, RateLimitedError | IdPUnavailableError)
            and exc.retry_after is not None
        ):
            # The IdP named the wait: honour it as given (a zero would let the
            # fleet hammer it, so not less than a tenth of a second).
            return min(self._max_cooldown, max(0.1, exc.retry_after))
        return self._unavailable_cooldown

    async def _record_failure(
        self, request: _Request, owner: str, exc: TokenFleetError
    ) -> None:
        record = _failure_record(exc)
        cooldown = self._cooldown(exc)
        logger.warning(
            "entry.fetch_failed",
            extra={
                "entry": request.eid,
                "client_id": request.credentials.client_id,
                "error": type(exc).__name__,
                "cooldown": cooldown,
            },
        )
        try:
            await self._store.fail(request.eid, owner, record, round(cooldown * 1000))
        except StoreUnavailableError:
            self._local_failures.remember(request.eid, cooldown, record)

    def _remembered_error(self, snapshot: Snapshot) -> TokenFleetError:
        """Rebuild the error another worker recorded, as the same type."""
        try:
            record = orjson.loads(snapshot.failure or b"")
            cls = _FAILURE_TYPES[record["k"]]
            message = str(record["m"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return IdPUnavailableError(
                "Another worker's token request failed recently; backing off."
            )

        if issubclass(cls, TokenEndpointError):
            return cls(
                message,
                error=record.get("e") or "unknown",
                error_description=record.get("d"),
                status=record.get("s"),
            )
        if cls is RateLimitedError:
            return RateLimitedError(
                message,
                retry_after=snapshot.failure_ttl_ms / 1000,
                endpoint_wide=bool(record.get("w")),
            )
        if cls is IdPUnavailableError:
            return IdPUnavailableError(
                message,
                status=record.get("s"),
                retry_after=snapshot.failure_ttl_ms / 1000,
            )
        return cls(message)

    # Refresh ahead ---------------------------------------------------------------

    def _refresh_soon(self, local: _LocalEntry) -> None:
        eid = local.request.eid
        if eid in self._refreshing or eid in self._inflight or self._closed:
            return
        self._refreshing.add(eid)
        self._spawn(self._refresh(local), name="tokenfleet-refresh")

    async def _refresh(self, local: _LocalEntry) -> None:
        request = local.request
        try:
            await self._refresh_once(local, request)
        except TokenFleetError as exc:
            # The current token stays valid and keeps being served; try again
            # after the cooldown, or halfway to expiry if that comes first.
            self._postpone(local, self._cooldown(exc))
            logger.warning(
                "entry.refresh_failed",
                extra={
                    "entry": request.eid,
                    "client_id": request.credentials.client_id,
                    "error": type(exc).__name__,
                },
            )
        finally:
            self._refreshing.discard(request.eid)

    def _postpone(self, local: _LocalEntry, seconds: float) -> None:
        now = self._now()
        local.refresh_at = min(now + seconds, now + max(0.0, local.expire_at - now) / 2)

    async def _refresh_once(self, local: _LocalEntry, request: _Request) -> None:
        owner = self._new_owner()
        # A refresh point of zero means a notice announced a newer token:
        # read it, do not fetch.
        due_below = round(local.refresh_below * 1000) if local.refresh_at > 0 else 0
        try:
            outcome, snapshot = await self._store.acquire(
                request.eid, owner, self._lease_ms, due_below
            )
        except StoreUnavailableError:
            await self._fetch_unshared(request)
            self._refresh_ahead += 1
            return

        if outcome is Outcome.PRESENT:
            try:
                self._adopt(request, snapshot)
            except _CorruptEntryError:
                self._postpone(local, 0.0)
            return
        if outcome is Outcome.WON:
            await self._fetch_and_commit(request, owner, refresh=True)
            return
        if outcome is Outcome.FAILED:
            self._postpone(local, snapshot.failure_ttl_ms / 1000)
            return

        # Another worker is refreshing; its notice brings the new token.
        self._postpone(local, max(0.05, snapshot.lease_ttl_ms / 1000))

    # Redis outages ------------------------------------------------------------------

    async def _fetch_unshared(self, request: _Request) -> Token:
        """Fetch for this process alone while Redis is unavailable."""
        self._check_local_failure(request)

        started = self._now()
        self._fallback_fetches += 1
        try:
            response, fetch_seconds = await self._fetch(request)
        except TokenFleetError as exc:
            # An endpoint-wide cooldown is already remembered for the URL.
            if not (isinstance(exc, RateLimitedError) and exc.endpoint_wide):
                self._local_failures.remember(
                    request.eid, self._cooldown(exc), _failure_record(exc)
                )
            raise

        ttl, refresh_below, margin = self._plan(response.expires_in, fetch_seconds)
        payload, _ = _entry_payload(
            response.access_token, response.token_type, refresh_below, margin
        )
        return self._remember(request, payload, ttl, started)

    def _check_local_failure(self, request: _Request) -> None:
        """Raise the failure this process remembers for *request*, if any."""
        known = self._local_failures.active(request.eid)
        if known is not None:
            raise self._remembered_error(known)

    async def _write_back_local(self) -> None:
        """After an outage, give Redis this process's tokens where it has none.

        Tokens fetched during the outage, and tokens a restarted Redis lost,
        become shared again; where Redis holds another token, Redis's wins
        and this process picks it up on its next lookup.
        """
        now = self._now()
        for eid, local in list(self._local.items()):
            remaining = local.expire_at - now
            if remaining <= 0:
                continue
            token = local.token
            payload, digest = _entry_payload(
                token.access_token, token.token_type, local.refresh_below, local.margin
            )
            try:
                current = await self._store.write_back(
                    eid, payload, round(remaining * 1000), digest
                )
            except StoreUnavailableError:
                return
            if current is None:
                self._write_backs += 1
            elif current != local.digest:
                local.refresh_at = 0.0
