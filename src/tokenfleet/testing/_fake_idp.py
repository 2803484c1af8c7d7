"""An Okta-like fake token endpoint for tests, benchmarks and demos.

`FakeIdP` is a real `aiohttp.web` server on a loopback port that answers
``POST /oauth2/{authServerId}/v1/token`` for the client-credentials grant the
way an Okta custom authorization server does: HTTP Basic in both the RFC 6749
§2.3.1 form and the raw form, ``client_secret_post``, RFC 6749 §5.2 error
bodies, Okta's rate-limit headers and 429 body, and JWT-shaped access tokens
carrying Okta's claims.  Tests script failures, latency and rate limits on it
and read back what it received; it runs on the caller's event loop or on its
own loop in a daemon thread for synchronous callers.

Every request is decided, counted and recorded the moment its body has
arrived, then answered after the configured latency.  Deciding at arrival
keeps scripted failures and rate-limit slots in arrival order even when
latency is random, and lets the answers themselves wait concurrently.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import math
import random
import secrets
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import web

from tokenfleet._errors import ConfigurationError
from tokenfleet.testing._threaded import LoopThread

__all__ = ["FakeClient", "FakeIdP", "IdPRequest", "ScriptedFailure"]

_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_TOKEN_PATH = "/oauth2/{auth_server_id}/v1/token"
_STATS_PATH = "/_fake/stats"
_REALM = "tokenfleet-fake-idp"

# Benchmarks open hundreds of connections at once; the default backlog of 128
# would make the kernel refuse some of them before the server sees them.
_LISTEN_BACKLOG = 1024

# Answers still waiting out their latency when the server stops are cut off
# after this many seconds rather than aiohttp's default minute.
_SHUTDOWN_GRACE = 0.5

_ERROR_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_client",
    403: "unauthorized_client",
    503: "temporarily_unavailable",
}


@dataclass(frozen=True, slots=True)
class IdPRequest:
    """One request the fake IdP received on its token path, as it answered it.

    `client_id` is the id the request presented, verified or not (``None``
    when it presented none), `scopes` the scopes it asked for, `status` the
    HTTP status of the answer (0 when the connection was dropped), and `at`
    the `time.monotonic` time at which its body had arrived.
    """

    client_id: str | None
    scopes: tuple[str, ...]
    status: int
    at: float


@dataclass(frozen=True, slots=True)
class ScriptedFailure:
    """How the fake IdP should fail one request instead of processing it.

    `body` is sent as is; ``None`` sends an RFC 6749 §5.2 JSON error fitting
    `status` (Okta's own rate-limit body for 429).  `delay` is waited before
    answering, on top of the IdP's latency.  With `drop`, the connection is
    closed after the delay without any HTTP answer.
    """

    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    content_type: str = "application/json"
    delay: float = 0.0
    drop: bool = False


@dataclass(frozen=True, slots=True)
class FakeClient:
    """A client registered with the fake IdP.

    `expires_in` overrides the IdP's token lifetime for this client when set.
    The secret never appears in the repr.
    """

    client_id: str
    client_secret: str = field(repr=False)
    scopes: tuple[str, ...]
    expires_in: float | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the IdP decided to answer to one request."""

    status: int
    body: bytes
    headers: dict[str, str]
    delay: float = 0.0
    drop: bool = False


class _RejectedError(Exception):
    """Stops processing a request and carries the error answer to send."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


@dataclass(slots=True)
class _RateLimit:
    """A fixed window of `limit` requests, aligned to multiples of `window`."""

    limit: int
    window: float
    window_end: float = -math.inf
    used: int = 0

    def admit(self, now: float) -> tuple[bool, dict[str, str]]:
        """Take a slot in the window holding `now`, if one is left."""
        window_end = (math.floor(now / self.window) + 1) * self.window
        if window_end != self.window_end:
            self.window_end = window_end
            self.used = 0

        admitted = self.used < self.limit
        if admitted:
            self.used += 1

        return admitted, {
            "X-Rate-Limit-Limit": str(self.limit),
            "X-Rate-Limit-Remaining": str(self.limit - self.used),
            "X-Rate-Limit-Reset": str(math.ceil(self.window_end)),
        }


class FakeIdP:
    """An Okta-like client-credentials token endpoint on a loopback port.

    Start it with ``async with FakeIdP() as idp`` (or `start` and `stop`), or
    from synchronous code with ``with idp.running_in_thread()`` (or
    `start_in_thread` and `stop_thread`).  Register clients with `add_client`,
    point the code under test at `token_url`, then script the IdP with
    `fail_next`, `fail_always`, `rate_limit` and the settable attributes
    `latency` (seconds, or a ``(low, high)`` range drawn uniformly per
    request), `expires_in` and `include_expires_in`.  `issued` and `requests`
    tell what happened; ``GET /_fake/stats`` tells it to other processes.

    `clock` gives the Unix time used for token claims and rate-limit windows.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        auth_server_id: str = "ausfake0000000000417",
        expires_in: float = 3600,
        latency: float | tuple[float, float] = 0.0,
        include_expires_in: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.auth_server_id = auth_server_id
        self.expires_in = expires_in
        self.latency = latency
        self.include_expires_in = include_expires_in
        self._clock = clock
        self._requested_port = port
        self._key_id = secrets.token_urlsafe(32)

        # Handlers run on the server's loop, which may live in another thread
        # than the test scripting the IdP; this lock guards all mutable state
        # and is never held across an await.
        self._lock = threading.Lock()
        self._clients: dict[str, FakeClient] = {}
        self._scripted: deque[ScriptedFailure] = deque()
        self._standing_failure: ScriptedFailure | None = None
        self._rate_limit: _RateLimit | None = None
        self._issued: Counter[str] = Counter()
        self._requests: list[IdPRequest] = []

        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._thread: LoopThread | None = None

    # Addresses

    @property
    def port(self) -> int:
        """The port the running server is bound to."""
        if self._port is None:
            msg = "The fake IdP is not running, so it has no port; start it first."
            raise RuntimeError(msg)
        return self._port

    @property
    def url(self) -> str:
        """The server's base URL, for example ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self.port}"

    @property
    def issuer(self) -> str:
        """The authorization server's URL, the ``iss`` claim of its tokens."""
        return f"{self.url}/oauth2/{self.auth_server_id}"

    @property
    def token_url(self) -> str:
        """The token endpoint's URL."""
        return f"{self.issuer}/v1/token"

    # Clients

    def add_client(
        self,
        client_id: str,
        client_secret: str,
        *,
        scopes: Iterable[str] = ("submissions.read", "submissions.write"),
        expires_in: float | None = None,
    ) -> None:
        """Register a client, or replace the one with the same id."""
        allowed = tuple(scopes.split()) if isinstance(scopes, str) else tuple(scopes)
        client = FakeClient(client_id, client_secret, allowed, expires_in)

        with self._lock:
            self._clients[client_id] = client

    def remove_client(self, client_id: str) -> None:
        """Forget a client: its later requests are answered ``invalid_client``."""
        with self._lock:
            self._clients.pop(client_id, None)

    @property
    def clients(self) -> dict[str, FakeClient]:
        """The registered clients by id."""
        with self._lock:
            return dict(self._clients)

    # Scripting

    def fail_next(self, *failures: ScriptedFailure) -> None:
        """Queue failures; each request consumes one, in order, before anything else."""
        with self._lock:
            self._scripted.extend(failures)

    def fail_always(self, failure: ScriptedFailure | None) -> None:
        """Fail every request this way (after the queued ones); ``None`` stops."""
        with self._lock:
            self._standing_failure = failure

    def rate_limit(self, limit: int | None, window: float = 60.0) -> None:
        """Allow `limit` requests per `window` seconds; 0 or ``None`` lifts the limit.

        Windows are aligned to multiples of `window` on the IdP's clock.  Over
        the limit the IdP answers 429 as Okta does; every other answer carries
        the ``X-Rate-Limit-*`` headers while a limit is set.
        """
        if limit is not None and limit < 0:
            msg = (
                f"The rate limit must be a positive number of requests, not {limit!r}."
            )
            raise ConfigurationError(msg)
        if not window > 0:
            msg = f"The rate-limit window must be a positive number of seconds, not {window!r}."
            raise ConfigurationError(msg)

        with self._lock:
            self._rate_limit = _RateLimit(limit, window) if limit else None

    # Observations

    def issued(self, client_id: str | None = None) -> int:
        """The number of tokens issued to `client_id`, or to all clients."""
        with self._lock:
            if client_id is None:
                return sum(self._issued.values())
            return self._issued[client_id]

    @property
    def requests(self) -> list[IdPRequest]:
        """A copy of the record of every request received on the token path."""
        with self._lock:
            return list(self._requests)

    def reset_counts(self) -> None:
        """Forget the tokens issued and the requests received so far."""
        with self._lock:
            self._issued.clear()
            self._requests.clear()

    # Running on the caller's event loop

    async def start(self) -> None:
        """Bind the port and start answering."""
        if self._runner is not None:
            msg = f"The fake IdP is already running at {self.url}."
            raise RuntimeError(msg)

        app = web.Application()
        app.router.add_route("*", _TOKEN_PATH, self._serve_token_request)
        app.router.add_get(_STATS_PATH, self._serve_stats)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await runner.setup()

        site = web.TCPSite(
            runner, self.host, self._requested_port, backlog=_LISTEN_BACKLOG
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise

        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop answering and release the port; nothing happens if not running."""
        runner, self._runner = self._runner, None
        if runner is None:
            return

        self._port = None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # Running in a thread of its own

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a daemon thread.

        Returns once the port is bound; errors from binding are raised here.
        """
        if self._thread is not None:
            msg = f"The fake IdP is already running in a thread at {self.url}."
            raise RuntimeError(msg)

        thread = LoopThread("tokenfleet-fake-idp")
        try:
            thread.call(self.start())
        except BaseException:
            thread.close()
            raise
        self._thread = thread

    def stop_thread(self) -> None:
        """Stop the server started by `start_in_thread` and wait for its thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return

        try:
            thread.call(self.stop())
        finally:
            thread.close()

    @contextmanager
    def running_in_thread(self) -> Iterator[Self]:
        """Run the server in a thread for the duration of a ``with`` block."""
        self.start_in_thread()
        try:
            yield self
        finally:
            self.stop_thread()

    # Serving

    async def _serve_token_request(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = self._decide(request, body)

        await asyncio.sleep(self._draw_latency() + answer.delay)

        if answer.drop and request.transport is not None:
            # Aborting leaves aiohttp nothing to write the response to; it
            # treats that as a client that went away and stays quiet.
            request.transport.abort()
        return web.Response(
            status=answer.status, body=answer.body, headers=answer.headers
        )

    async def _serve_stats(self, request: web.Request) -> web.Response:
        with self._lock:
            stats = {"issued": dict(self._issued), "requests": len(self._requests)}

        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    def _draw_latency(self) -> float:
        latency = self.latency
        if isinstance(latency, tuple):
            low, high = latency
            return random.uniform(low, high)
        return latency

    def _decide(self, request: web.Request, body: bytes) -> _Answer:
        """Decide, count and record the answer to one token request."""
        form = _parse_form(request.content_type, body)
        authorization = request.headers.get("Authorization")

        with self._lock:
            try:
                answer = self._decide_locked(request, authorization, form)
            except _RejectedError as rejection:
                answer = rejection.answer

            self._requests.append(
                IdPRequest(
                    client_id=self._presented_client_id(authorization, form),
                    scopes=_requested_scopes(form),
                    status=0 if answer.drop else answer.status,
                    at=time.monotonic(),
                )
            )

        return answer

    def _decide_locked(
        self,
        request: web.Request,
        authorization: str | None,
        form: dict[str, str] | str,
    ) -> _Answer:
        """Route, script, rate-limit and grant; the caller holds the lock."""
        if request.match_info["auth_server_id"] != self.auth_server_id:
            raise _RejectedError(
                _unknown_auth_server(request.match_info["auth_server_id"])
            )
        if request.method != "POST":
            raise _RejectedError(_method_not_allowed(request.method))

        failure = self._scripted.popleft() if self._scripted else self._standing_failure
        if failure is not None:
            raise _RejectedError(_scripted_answer(failure))

        limit_headers: dict[str, str] = {}
        if self._rate_limit is not None:
            admitted, limit_headers = self._rate_limit.admit(self._clock())
            if not admitted:
                raise _RejectedError(_rate_limited(limit_headers))

        try:
            answer = self._grant(authorization, form)
        except _RejectedError as rejection:
            answer = rejection.answer
        answer.headers.update(limit_headers)

        return answer

    def _grant(self, authorization: str | None, form: dict[str, str] | str) -> _Answer:
        """Apply the client-credentials grant, raising `_RejectedError` on any error."""
        if isinstance(form, str):
            raise _RejectedError(_oauth_error(400, "invalid_request", form))

        client = self._authenticate(authorization, form)
        _check_grant_type(form)
        scopes = _requested_scopes(form)
        _check_scopes(client, scopes)

        token = self._mint_token(client, scopes)
        self._issued[client.client_id] += 1

        return token

    def _authenticate(
        self, authorization: str | None, form: dict[str, str]
    ) -> FakeClient:
        basic = _basic_credentials(authorization)
        if basic is not None and "client_secret" in form:
            description = (
                "Only one client authentication method may be used per request."
            )
            raise _RejectedError(_oauth_error(400, "invalid_request", description))

        candidates = basic if basic is not None else []
        posted_id, posted_secret = form.get("client_id"), form.get("client_secret")
        if basic is None and posted_id is not None and posted_secret is not None:
            candidates = [(posted_id, posted_secret)]

        for client_id, secret in candidates:
            client = self._clients.get(client_id)
            if client is not None and _same_secret(client, secret):
                return client

        raise _RejectedError(_invalid_client())

    def _presented_client_id(
        self, authorization: str | None, form: dict[str, str] | str
    ) -> str | None:
        """The client id a request presented, preferring a registered reading."""
        try:
            candidates = _basic_credentials(authorization)
        except _RejectedError:
            return None
        if candidates is None:
            return form.get("client_id") if isinstance(form, dict) else None

        for client_id, _secret in candidates:
            if client_id in self._clients:
                return client_id
        return candidates[0][0]

    def _mint_token(self, client: FakeClient, scopes: tuple[str, ...]) -> _Answer:
        now = self._clock()
        lifetime = (
            client.expires_in if client.expires_in is not None else self.expires_in
        )
        header = {"kid": self._key_id, "alg": "RS256"}
        claims = {
            "ver": 1,
            "jti": f"AT.{secrets.token_urlsafe(32)}",
            "iss": self.issuer,
            "aud": "api://default",
            "iat": int(now),
            "exp": int(now + lifetime),
            "cid": client.client_id,
            "scp": list(scopes),
            "sub": client.client_id,
        }
        access_token = ".".join(
            _base64url(part)
            for part in (
                orjson.dumps(header),
                orjson.dumps(claims),
                secrets.token_bytes(256),
            )
        )

        payload: dict[str, Any] = {"token_type": "Bearer"}
        if self.include_expires_in:
            payload["expires_in"] = (
                int(lifetime) if float(lifetime).is_integer() else lifetime
            )
        payload["access_token"] = access_token
        payload["scope"] = " ".join(scopes)

        return _json_answer(200, payload, {"Pragma": "no-cache"})


# Reading requests


def _parse_form(content_type: str, body: bytes) -> dict[str, str] | str:
    """The form parameters, or a description of why there are none."""
    if content_type != _FORM_CONTENT_TYPE:
        return f"The request's content type must be {_FORM_CONTENT_TYPE}, not {content_type!r}."

    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)
        )
    except (UnicodeDecodeError, ValueError):
        return "The request body is not a valid form."

    # RFC 6749 §3.2: parameters must not be sent more than once.
    form = dict(pairs)
    if len(form) != len(pairs):
        return "A request parameter was sent more than once."
    return form


def _basic_credentials(authorization: str | None) -> list[tuple[str, str]] | None:
    """Both readings of an HTTP Basic header: urldecoded (RFC 6749) and raw.

    ``None`` when the request carries no Basic credentials at all.  The id
    ends at the first colon in both readings: an RFC 6749 id has its colons
    percent-encoded, and an RFC 7617 raw id cannot contain one.
    """
    if authorization is None:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None

    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise _RejectedError(_invalid_client()) from exc
    raw_id, colon, raw_secret = decoded.partition(":")
    if not colon:
        raise _RejectedError(_invalid_client())

    form_decoded = (
        urllib.parse.unquote_plus(raw_id),
        urllib.parse.unquote_plus(raw_secret),
    )
    return [form_decoded, (raw_id, raw_secret)]


def _same_secret(client: FakeClient, secret: str) -> bool:
    return hmac.compare_digest(client.client_secret.encode(), secret.encode())


def _requested_scopes(form: dict[str, str] | str) -> tuple[str, ...]:
    if isinstance(form, str):
        return ()

    # RFC 6749 §3.3: space-delimited; repeated scopes count once.
    return tuple(
        dict.fromkeys(scope for scope in form.get("scope", "").split(" ") if scope)
    )


def _check_grant_type(form: dict[str, str]) -> None:
    grant_type = form.get("grant_type")
    if grant_type is None:
        description = "The request must name a grant_type."
        raise _RejectedError(_oauth_error(400, "invalid_request", description))
    if grant_type != "client_credentials":
        description = (
            f"The grant type {grant_type!r} is not supported; use client_credentials."
        )
        raise _RejectedError(_oauth_error(400, "unsupported_grant_type", description))


def _check_scopes(client: FakeClient, scopes: tuple[str, ...]) -> None:
    # Okta has no default scopes for client credentials unless an
    # administrator configured some; the fake never does.
    if not scopes:
        description = "The authorization server has no default scopes, so 'scope' must be provided."
        raise _RejectedError(_oauth_error(400, "invalid_scope", description))

    for scope in scopes:
        if scope not in client.scopes:
            description = (
                f"The scope {scope!r} is not allowed for client {client.client_id!r}."
            )
            raise _RejectedError(_oauth_error(400, "invalid_scope", description))


# Building answers


def _base64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _json_answer(
    status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> _Answer:
    return _Answer(
        status=status,
        body=orjson.dumps(payload),
        headers={
            "Content-Type": "application/json",
            "Cache-Control": "no-store",
            **(headers or {}),
        },
    )


def _oauth_error(
    status: int,
    error: str,
    description: str,
    headers: Mapping[str, str] | None = None,
) -> _Answer:
    payload = {"error": error, "error_description": description}
    return _json_answer(status, payload, headers)


def _invalid_client() -> _Answer:
    description = (
        "Client authentication failed: unknown client, wrong secret or no credentials."
    )
    challenge = {"WWW-Authenticate": f'Basic realm="{_REALM}"'}
    return _oauth_error(401, "invalid_client", description, challenge)


def _okta_error(
    status: int, code: str, summary: str, headers: Mapping[str, str] | None = None
) -> _Answer:
    payload = {
        "errorCode": code,
        "errorSummary": summary,
        "errorLink": code,
        "errorId": f"oae{secrets.token_urlsafe(16)}",
        "errorCauses": [],
    }
    return _json_answer(status, payload, headers)


def _rate_limited(limit_headers: Mapping[str, str]) -> _Answer:
    summary = "API call exceeded rate limit due to too many requests."
    return _okta_error(429, "E0000047", summary, limit_headers)


def _unknown_auth_server(auth_server_id: str) -> _Answer:
    summary = f"No authorization server has the id {auth_server_id!r}."
    return _okta_error(404, "E0000007", summary)


def _method_not_allowed(method: str) -> _Answer:
    summary = f"The token endpoint accepts POST only, not {method}."
    return _okta_error(405, "E0000022", summary, {"Allow": "POST"})


def _scripted_answer(failure: ScriptedFailure) -> _Answer:
    if failure.body is not None:
        body = failure.body
    elif failure.status == 429:
        body = _rate_limited({}).body
    else:
        error = _ERROR_BY_STATUS.get(
            failure.status,
            "server_error" if failure.status >= 500 else "invalid_request",
        )
        description = f"The fake IdP was scripted to fail with HTTP {failure.status}."
        body = orjson.dumps({"error": error, "error_description": description})

    headers = {"Content-Type": failure.content_type, "Cache-Control": "no-store"}
    if failure.status == 401:
        headers["WWW-Authenticate"] = f'Basic realm="{_REALM}"'
    headers.update(failure.headers)

    return _Answer(
        status=failure.status,
        body=body,
        headers=headers,
        delay=failure.delay,
        drop=failure.drop,
    )
