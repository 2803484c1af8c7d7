"""Fleet-wide OAuth2 client-credentials tokens, shared through Redis.

`TokenCache` is the entry point: it returns a valid access token for a set
of client credentials and scopes, and makes sure that across every process
sharing one Redis, the IdP is asked once per token lifetime.
"""

from ._cache import CacheStats, TokenCache
from ._endpoint import RetryPolicy, TokenEndpointClient
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
    UnknownRegionError,
)
from ._models import ClientCredentials, Token, TokenResponse
from ._regions import REGIONS, Region, resolve_region

__all__ = [
    "REGIONS",
    "CacheClosedError",
    "CacheStats",
    "ClientCredentials",
    "ConfigurationError",
    "IdPUnavailableError",
    "InvalidClientError",
    "InvalidScopeError",
    "MalformedResponseError",
    "RateLimitedError",
    "Region",
    "RetryPolicy",
    "Token",
    "TokenCache",
    "TokenEndpointClient",
    "TokenEndpointError",
    "TokenFleetError",
    "TokenResponse",
    "UnknownRegionError",
    "resolve_region",
]
