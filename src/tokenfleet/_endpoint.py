"""The token endpoint client: one POST per token, retried with care.

One `aiohttp.ClientSession` serves every request of a client.  429, 5xx and
network errors are retried with exponential backoff and full jitter inside a
total deadline, honouring ``Retry-After`` and ``X-Rate-Limit-Reset``; other
4xx answers are final.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import quote_plus, urlencode, urlsplit

import aiohttp

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import (
    ConfigurationError,
    IdPUnavailableError,
    MalformedResponseError,
    RateLimitedError,
    TokenFleetError,
)
from ._models import ClientCredentials, TokenResponse, normalize_scopes
from ._parse import parse_token_success, retry_after_seconds, token_endpoint_error

logger = logging.getLogger("tokenfleet.endpoint")

BasicAuthEncoding = Literal["rfc6749", "raw"]

_USER_AGENT = "tokenfleet/0.1"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How token requests are retried.

    Attempt *n* (from 0) waits a random time between 0 and
    ``min(max_backoff, initial_backoff * multiplier ** n)`` (full jitter).
    When the IdP names a wait (``Retry-After``, ``X-Rate-Limit-Reset``), that
    wait is taken instead, plus up to `initial_backoff` of jitter so that
    workers do not come back in step.  No attempt starts after `deadline`
    seconds; `max_attempts` bounds the count.
    """

    deadline: float = 30.0
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    max_attempts: int = 6

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            msg = f"max_attempts must be at least 1, not {self.max_attempts!r}."
            raise ConfigurationError(msg)
        for name in ("deadline", "initial_backoff", "max_backoff", "multiplier"):
            value = getattr(self, name)
            # Written as "not >= 0" so that NaN, which compares false to
            # everything, is refused too.
            if not isinstance(value, int | float) or not value >= 0:
                msg = f"{name} must be a non-negative number of seconds, not {value!r}."
                raise ConfigurationError(msg)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Return the jittered wait before retry number *attempt* (from 0)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return rng.uniform(0.0, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


def basic_authorization(
    credentials: ClientCredentials, encoding: BasicAuthEncoding
) -> str:
    """Return the ``Authorization: Basic`` value for *credentials*.

    ``"rfc6749"`` form-urlencodes the id and the secret before joining them
    (RFC 6749 §2.3.1); ``"raw"`` joins them as they are, which some IdPs
    expect.
    """
    if encoding == "rfc6749":
        user, password = (
            quote_plus(credentials.client_id),
            quote_plus(credentials.client_secret),
        )
    elif encoding == "raw":
        user, password = credentials.client_id, credentials.client_secret
    else:
        msg = f"basic_auth must be 'rfc6749' or 'raw', not {encoding!r}."
        raise ConfigurationError(msg)

    pair = f"{user}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown_url(token_url: str) -> str:
    # Userinfo always ends at the last '@' (a raw '@' in a password only adds
    # earlier ones), so nothing before it is ever quoted back.
    if "@" not in token_url:
        return repr(token_url)
    return repr("…@" + token_url.rpartition("@")[2])


def validate_token_url(token_url: str, *, allow_insecure_http: bool = False) -> str:
    """Return *token_url* when it is an absolute https URL, else raise.

    Plain http is accepted for loopback hosts (tests, a local fake IdP) and
    wherever *allow_insecure_http* is set.
    """
    if not isinstance(token_url, str) or not token_url:
        msg = f"The token URL must be a non-empty string, not {token_url!r}."
        raise ConfigurationError(msg)

    try:
        parts = urlsplit(token_url)
        host = parts.hostname or ""
    except ValueError as exc:
        msg = f"The token URL {_shown_url(token_url)} cannot be parsed."
        raise ConfigurationError(msg) from exc

    if parts.scheme not in ("https", "http") or not host:
        msg = f"The token URL {_shown_url(token_url)} must be an absolute http(s) URL."
        raise ConfigurationError(msg)
    if parts.username is not None or parts.password is not None or parts.fragment:
        msg = "The token URL must not carry credentials or a fragment; pass credentials as ClientCredentials."
        raise ConfigurationError(msg)
    if parts.scheme == "http" and not (allow_insecure_http or _is_loopback(host)):
        msg = (
            f"The token URL {_shown_url(token_url)} uses plain http to a host that is not "
            "loopback; client secrets would travel unencrypted. Use https, or "
            "set allow_insecure_http=True."
        )
        raise ConfigurationError(msg)

    return token_url


class _RetryableError(Exception):
    """One failed attempt that may be tried again."""

    def __init__(self, final: TokenFleetError, wait_hint: float | None) -> None:
        super().__init__(str(final))
        self.final = final
        self.wait_hint = wait_hint


class TokenEndpointClient:
    """Fetches client-credentials tokens from one or more token endpoints.

    Use it as an async context manager, or call `aclose` when done.  A
    session passed in is used as is and left open; otherwise one session is
    created on first use and closed by `aclose`.
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        basic_auth: BasicAuthEncoding = "rfc6749",
        request_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        max_body_bytes: int = 64 * 1024,
        default_expires_in: float = 300.0,
        allow_insecure_http: bool = False,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if basic_auth not in ("rfc6749", "raw"):
            msg = f"basic_auth must be 'rfc6749' or 'raw', not {basic_auth!r}."
            raise ConfigurationError(msg)
        if not request_timeout > 0:
            msg = f"request_timeout must be a positive number of seconds, not {request_timeout!r}."
            raise ConfigurationError(msg)
        if max_body_bytes < 1024:
            msg = f"max_body_bytes must be at least 1024, not {max_body_bytes!r}."
            raise ConfigurationError(msg)
        if not default_expires_in > 0:
            msg = f"default_expires_in must be a positive number of seconds, not {default_expires_in!r}."
            raise ConfigurationError(msg)

        self._session = session
        self._owns_session = session is None
        self._basic_auth: BasicAuthEncoding = basic_auth
        self.request_timeout = float(request_timeout)
        self.retry = retry or RetryPolicy()
        self._max_body_bytes = max_body_bytes
        self._default_expires_in = float(default_expires_in)
        self._allow_insecure_http = allow_insecure_http
        self._clock = clock or SYSTEM_CLOCK
        self._rng = rng or random.Random()
        self._closed = False

    async def __aenter__(self) -> TokenEndpointClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session this client created; a borrowed session stays open."""
        self._closed = True
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": _USER_AGENT},
                # A token request must never follow a proxy set for other
                # traffic by accident; the caller can pass its own session.
                trust_env=False,
            )
        return self._session

    def check_token_url(self, token_url: str) -> str:
        """Validate *token_url* with this client's settings; see `validate_token_url`."""
        return validate_token_url(
            token_url, allow_insecure_http=self._allow_insecure_http
        )

    async def fetch(
        self,
        credentials: ClientCredentials,
        token_url: str,
        scopes: Iterable[str] | str | None = None,
        *,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[TokenFleetError, float], Awaitable[None]] | None = None,
    ) -> TokenResponse:
        """Request a token, retrying transient failures within the deadline.

        *on_retry*, when given, is awaited with the error and the wait before
        each retry: the cache uses it to tell the fleet about a rate limit
        while this request waits it out.
        """
        if self._closed:
            msg = "This TokenEndpointClient is closed."
            raise TokenFleetError(msg)
        if not isinstance(credentials, ClientCredentials):
            msg = f"credentials must be ClientCredentials, not {type(credentials).__name__}."
            raise ConfigurationError(msg)
        self.check_token_url(token_url)
        scope_list = normalize_scopes(scopes)

        policy = retry or self.retry
        started = self._clock.monotonic()
        attempt = 0
        while True:
            try:
                return await self._attempt(
                    credentials, token_url, scope_list, policy, started
                )
            except _RetryableError as failure:
                wait = self._next_wait(failure, policy, attempt)
                elapsed = self._clock.monotonic() - started
                if (
                    attempt + 1 >= policy.max_attempts
                    or elapsed + wait >= policy.deadline
                ):
                    logger.warning(
                        "token_request.failed",
                        extra={
                            "client_id": credentials.client_id,
                            "token_url": token_url,
                            "attempts": attempt + 1,
                            "error": type(failure.final).__name__,
                        },
                    )
                    raise failure.final from failure.final.__cause__
                logger.debug(
                    "token_request.retrying",
                    extra={
                        "client_id": credentials.client_id,
                        "token_url": token_url,
                        "attempt": attempt + 1,
                        "wait": round(wait, 3),
                        "error": type(failure.final).__name__,
                    },
                )
                if on_retry is not None:
                    await on_retry(failure.final, wait)
                await self._clock.sleep(wait)
                attempt += 1

    def _next_wait(
        self, failure: _RetryableError, policy: RetryPolicy, attempt: int
    ) -> float:
        if failure.wait_hint is not None:
            return failure.wait_hint + self._rng.uniform(0.0, policy.initial_backoff)
        return policy.backoff(attempt, self._rng)

    async def _attempt(
        self,
        credentials: ClientCredentials,
        token_url: str,
        scopes: tuple[str, ...],
        policy: RetryPolicy,
        started: float,
    ) -> TokenResponse:
        form = {"grant_type": "client_credentials"}
        if scopes:
            form["scope"] = " ".join(scopes)
        headers = {
            "Authorization": basic_authorization(credentials, self._basic_auth),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        remaining = policy.deadline - (self._clock.monotonic() - started)
        timeout = aiohttp.ClientTimeout(
            total=max(0.05, min(self.request_timeout, remaining))
        )

        logger.debug(
            "token_request.started",
            extra={
                "client_id": credentials.client_id,
                "token_url": token_url,
                "scopes": scopes,
            },
        )
        try:
            async with self._get_session().post(
                token_url,
                data=urlencode(form),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                body = await self._read_body(response)
                status = response.status
                content_type = response.headers.get("Content-Type")
                response_headers = response.headers.copy()
        except (TimeoutError, aiohttp.ClientError) as exc:
            final = IdPUnavailableError(
                f"The token endpoint {token_url} could not be reached or did not answer in time ({type(exc).__name__})."
            )
            final.__cause__ = exc
            raise _RetryableError(final, None) from exc

        return self._interpret(
            status, content_type, body, response_headers, token_url, credentials
        )

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._max_body_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            self._refuse_size(
                response.status, response.headers.get("Content-Type"), limit
            )

        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(16 * 1024):
            size += len(chunk)
            if size > limit:
                self._refuse_size(
                    response.status, response.headers.get("Content-Type"), limit
                )
            chunks.append(chunk)

        return b"".join(chunks)

    def _refuse_size(self, status: int, content_type: str | None, limit: int) -> None:
        msg = (
            f"The token endpoint answered HTTP {status} with content type "
            f"{content_type or 'none'!r} and a body larger than {limit} bytes; it was not read."
        )
        raise MalformedResponseError(msg)

    def _interpret(
        self,
        status: int,
        content_type: str | None,
        body: bytes,
        headers: Mapping[str, str],
        token_url: str,
        credentials: ClientCredentials,
    ) -> TokenResponse:
        now = self._clock.time()
        if 200 <= status < 300:
            token = parse_token_success(
                body,
                status=status,
                content_type=content_type,
                now=now,
                default_expires_in=self._default_expires_in,
            )
            logger.debug(
                "token_request.complete",
                extra={
                    "client_id": credentials.client_id,
                    "token_url": token_url,
                    "expires_in": token.expires_in,
                },
            )
            return token

        wait_hint = retry_after_seconds(headers, now=now)
        if status == 429:
            shown = (
                f"; it asked to wait {wait_hint:.1f} s" if wait_hint is not None else ""
            )
            final: TokenFleetError = RateLimitedError(
                f"The token endpoint {token_url} is rate limiting this client (HTTP 429){shown}.",
                retry_after=wait_hint,
                endpoint_wide="X-Rate-Limit-Reset" in headers,
            )
            raise _RetryableError(final, wait_hint)
        if status >= 500:
            final = IdPUnavailableError(
                f"The token endpoint {token_url} answered HTTP {status}.",
                status=status,
                retry_after=wait_hint,
            )
            raise _RetryableError(final, wait_hint)

        raise token_endpoint_error(body, status=status, content_type=content_type)
