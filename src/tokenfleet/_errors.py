"""The exception hierarchy.

Every error tokenfleet raises derives from `TokenFleetError`.  Errors from
aiohttp, redis-py and orjson are translated where they happen and chained
with ``from``, so callers only need to know these classes.  No message ever
contains a client secret or an access token.
"""

from __future__ import annotations


class TokenFleetError(Exception):
    """Base class of every error raised by tokenfleet."""


class ConfigurationError(TokenFleetError, ValueError):
    """Raised when an argument or a setting is invalid.

    Nothing is sent and no cache entry is touched when this is raised.
    """


class UnknownRegionError(ConfigurationError):
    """Raised when a stage and cell pair names no known token endpoint."""


class TokenEndpointError(TokenFleetError):
    """Raised when the token endpoint answers with an RFC 6749 §5.2 error.

    `error` holds the OAuth2 error code (``invalid_request``,
    ``unauthorized_client`` ...), `error_description` the IdP's explanation
    when it gave one, and `status` the HTTP status.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str,
        error_description: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.error_description = error_description
        self.status = status


class InvalidClientError(TokenEndpointError):
    """Raised when the IdP rejects the client credentials (``invalid_client``)."""


class InvalidScopeError(TokenEndpointError):
    """Raised when the IdP refuses the requested scopes (``invalid_scope``)."""


class RateLimitedError(TokenFleetError):
    """Raised when the IdP answers 429 and the retry deadline leaves no room.

    `retry_after` is the number of seconds the IdP asked clients to wait,
    taken from ``Retry-After`` or Okta's ``X-Rate-Limit-Reset``, or ``None``
    when it gave no hint.  `endpoint_wide` is true when the IdP reported a
    rate-limit bucket (``X-Rate-Limit-*`` headers), which Okta shares between
    every client of the endpoint; the cache then backs off for the whole
    token URL, not only for one client.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        endpoint_wide: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.endpoint_wide = endpoint_wide


class IdPUnavailableError(TokenFleetError):
    """Raised when the IdP cannot be reached or keeps failing.

    Network errors, timeouts and 5xx answers are retried first; this is
    raised once the retry deadline is spent.  `status` is the last HTTP
    status seen, or ``None`` when no answer arrived; `retry_after` is the
    wait the IdP asked for with its last answer, if it named one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class MalformedResponseError(TokenFleetError):
    """Raised when the token endpoint's answer cannot be understood.

    The message names the status and content type, never the body, which
    could hold a token.
    """


class CacheClosedError(TokenFleetError):
    """Raised when a closed `TokenCache` is used."""
