"""Validation of token endpoint answers (RFC 6749 §5.1 and §5.2).

Everything here works on bytes already read and raises nothing but
`TokenFleetError` subclasses, whatever the input.  No message quotes the body:
it could hold a token.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import math
import re
from collections.abc import Mapping

import orjson

from ._errors import (
    InvalidClientError,
    InvalidScopeError,
    MalformedResponseError,
    TokenEndpointError,
)
from ._models import TokenResponse

# Lifetimes beyond ten years are not access tokens; they would also overflow
# Redis millisecond TTLs in arithmetic further down.
MAX_EXPIRES_IN = 10 * 365 * 24 * 3600.0

_DESCRIPTION_LIMIT = 300


def _describe(status: int, content_type: str | None) -> str:
    return f"HTTP {status} with content type {content_type or 'none'!r}"


def _load_object(
    body: bytes, status: int, content_type: str | None
) -> dict[str, object]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = f"The token endpoint answered {_describe(status, content_type)} whose body is not JSON."
        raise MalformedResponseError(msg) from exc

    if not isinstance(document, dict):
        msg = f"The token endpoint answered {_describe(status, content_type)} whose JSON body is not an object."
        raise MalformedResponseError(msg)

    return document


def _positive_seconds(value: object) -> float | None:
    """Return *value* as positive finite seconds, or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None

    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_EXPIRES_IN:
        return None

    return seconds


def jwt_expiry(access_token: str) -> float | None:
    """Return the ``exp`` claim of a JWT-shaped token, without verifying it.

    Returns None when the token is not a JWT or carries no numeric ``exp``.
    """
    parts = access_token.split(".")
    if len(parts) != 3:
        return None

    segment = parts[1]
    try:
        payload = orjson.loads(
            base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        )
    except (binascii.Error, ValueError):
        return None

    if not isinstance(payload, dict):
        return None
    exp = payload.get("exp")
    if (
        isinstance(exp, bool)
        or not isinstance(exp, int | float)
        or not math.isfinite(exp)
    ):
        return None

    return float(exp)


# RFC 6750 §2.1 b64token characters are a subset of visible ASCII; anything
# outside visible ASCII could split or smuggle an HTTP header.  A compiled
# pattern checks a 1 KB token some forty times faster than a Python loop.
_VISIBLE_ASCII = re.compile("[\x21-\x7e]+")


def _valid_token_characters(access_token: str) -> bool:
    return _VISIBLE_ASCII.fullmatch(access_token) is not None


def parse_token_success(
    body: bytes,
    *,
    status: int,
    content_type: str | None,
    now: float,
    default_expires_in: float,
) -> TokenResponse:
    """Validate a successful token response and return it.

    ``expires_in`` may be a number or a numeric string.  When it is missing,
    the JWT ``exp`` claim is used, and failing that *default_expires_in*.
    """
    document = _load_object(body, status, content_type)
    where = _describe(status, content_type)

    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        msg = f"The token endpoint answered {where} without a non-empty 'access_token' string."
        raise MalformedResponseError(msg)
    if not _valid_token_characters(access_token):
        msg = f"The token endpoint answered {where} with an 'access_token' containing characters not allowed in an HTTP header."
        raise MalformedResponseError(msg)

    token_type = document.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = (
            token_type
            if isinstance(token_type, str) and len(token_type) < 40
            else type(token_type).__name__
        )
        msg = f"The token endpoint answered {where} with token type {shown!r}; only 'Bearer' is supported."
        raise MalformedResponseError(msg)

    expires_in = _lifetime(document, access_token, where, now, default_expires_in)

    scope = document.get("scope")
    return TokenResponse(
        access_token=access_token,
        token_type="Bearer",
        expires_in=expires_in,
        scope=scope if isinstance(scope, str) else None,
    )


def _lifetime(
    document: Mapping[str, object],
    access_token: str,
    where: str,
    now: float,
    default_expires_in: float,
) -> float:
    if "expires_in" in document and document["expires_in"] is not None:
        expires_in = _positive_seconds(document["expires_in"])
        if expires_in is None:
            msg = f"The token endpoint answered {where} with an 'expires_in' that is not a positive number of seconds."
            raise MalformedResponseError(msg)
        # IdPs truncate iat and exp to whole seconds, so the token's own exp
        # can come up to a second before now + expires_in.  When the token
        # says so, believe the earlier of the two; an exp already in the past
        # by this clock says more about clock skew than about the token.
        exp = jwt_expiry(access_token)
        by_claim = _positive_seconds(exp - now) if exp is not None else None
        return min(expires_in, by_claim) if by_claim is not None else expires_in

    exp = jwt_expiry(access_token)
    if exp is None:
        return default_expires_in

    remaining = _positive_seconds(exp - now)
    if remaining is None:
        msg = f"The token endpoint answered {where} with no 'expires_in' and a token whose 'exp' claim is not in the future."
        raise MalformedResponseError(msg)

    return remaining


def _clean_text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    printable = "".join(ch if ch.isprintable() else " " for ch in value)
    return printable[:_DESCRIPTION_LIMIT]


def token_endpoint_error(
    body: bytes, *, status: int, content_type: str | None
) -> TokenEndpointError | MalformedResponseError:
    """Return the error to raise for a 4xx answer other than 429.

    RFC 6749 §5.2 error documents become `InvalidClientError`,
    `InvalidScopeError` or `TokenEndpointError`; anything else becomes
    `MalformedResponseError`.
    """
    where = _describe(status, content_type)
    try:
        document = _load_object(body, status, content_type)
    except MalformedResponseError as exc:
        return exc

    error = _clean_text(document.get("error"))
    if not error:
        msg = f"The token endpoint answered {where} without an RFC 6749 'error' code."
        return MalformedResponseError(msg)

    description = _clean_text(document.get("error_description"))
    detail = f": {description}" if description else "."
    if error == "invalid_client":
        cls: type[TokenEndpointError] = InvalidClientError
        msg = f"The token endpoint rejected the client credentials ({where}, invalid_client){detail}"
    elif error == "invalid_scope":
        cls = InvalidScopeError
        msg = f"The token endpoint refused the requested scopes ({where}, invalid_scope){detail}"
    else:
        cls = TokenEndpointError
        msg = f"The token endpoint answered {where} with error {error!r}{detail}"

    return cls(msg, error=error, error_description=description, status=status)


def retry_after_seconds(headers: Mapping[str, str], *, now: float) -> float | None:
    """Return how long the IdP asked clients to wait, or None when it did not say.

    Reads ``Retry-After`` (seconds or an HTTP date) and Okta's
    ``X-Rate-Limit-Reset`` (Unix seconds); when both are present, the longer
    wait wins.  Unparseable values are ignored.
    """
    waits: list[float] = []

    retry_after = headers.get("Retry-After")
    if retry_after is not None:
        waits.extend(_retry_after_value(retry_after.strip(), now))

    reset = headers.get("X-Rate-Limit-Reset")
    if reset is not None:
        try:
            reset_at = float(reset.strip())
        except ValueError:
            pass
        else:
            if math.isfinite(reset_at):
                waits.append(reset_at - now)

    if not waits:
        return None

    return min(max(0.0, max(waits)), MAX_EXPIRES_IN)


def _retry_after_value(value: str, now: float) -> list[float]:
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return [seconds] if math.isfinite(seconds) else []

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return []
    if when.tzinfo is None:
        return []

    return [when.timestamp() - now]
