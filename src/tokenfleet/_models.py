"""Credentials, tokens and scope sets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ._errors import ConfigurationError

_SCOPE_FORBIDDEN = frozenset(' "\\')


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """An OAuth2 client id and secret.

    The secret never appears in the repr, in logs, in exceptions or in Redis
    keys.
    """

    client_id: str
    client_secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            msg = "The client id must be a non-empty string."
            raise ConfigurationError(msg)
        if not isinstance(self.client_secret, str) or not self.client_secret:
            msg = f"The client secret of client {self.client_id!r} must be a non-empty string."
            raise ConfigurationError(msg)

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r}, client_secret='***')"


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A validated answer of the token endpoint (RFC 6749 §5.1).

    `expires_in` is in seconds.  `scope` is the granted scope string when the
    IdP returned one.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_in: float
    scope: str | None = None

    def __repr__(self) -> str:
        return (
            f"TokenResponse(token_type={self.token_type!r}, "
            f"expires_in={self.expires_in!r}, scope={self.scope!r}, access_token='***')"
        )


@dataclass(frozen=True, slots=True)
class Token:
    """An access token as handed to callers.

    `expires_at` is Unix time in seconds.  `scopes` is the sorted set of scopes
    the token was requested for.  `authorization` is the value for the HTTP
    ``Authorization`` header.  The token itself never appears in the repr.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    scopes: tuple[str, ...]
    client_id: str
    token_url: str
    _entry_key: str = field(default="", repr=False, compare=False)

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value, for example ``Bearer eyJ...``."""
        return f"{self.token_type} {self.access_token}"

    def __repr__(self) -> str:
        return (
            f"Token(client_id={self.client_id!r}, token_type={self.token_type!r}, "
            f"scopes={self.scopes!r}, expires_at={self.expires_at!r}, access_token='***')"
        )


def normalize_scopes(scopes: Iterable[str] | str | None) -> tuple[str, ...]:
    """Return *scopes* de-duplicated and sorted.

    A string is split on whitespace, so ``"a b"`` and ``["b", "a", "a"]``
    give the same tuple.  Raises `ConfigurationError` for a scope that is not
    a non-empty string of RFC 6749 §3.3 characters.
    """
    if scopes is None:
        return ()
    if isinstance(scopes, str):
        items: list[object] = list(scopes.split())
    else:
        try:
            items = list(scopes)
        except TypeError as exc:
            msg = f"Scopes must be a string or an iterable of strings, not {type(scopes).__name__}."
            raise ConfigurationError(msg) from exc

    names: set[str] = set()
    for scope in items:
        if not isinstance(scope, str) or not scope:
            msg = f"Each scope must be a non-empty string, not {scope!r}."
            raise ConfigurationError(msg)
        if any(ch in _SCOPE_FORBIDDEN or not (0x21 <= ord(ch) <= 0x7E) for ch in scope):
            msg = (
                f"Scope {scope!r} contains a character that RFC 6749 §3.3 does "
                "not allow (space, quote, backslash or non-printable)."
            )
            raise ConfigurationError(msg)
        names.add(scope)

    return tuple(sorted(names))
