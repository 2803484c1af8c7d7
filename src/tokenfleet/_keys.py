"""Cache keys: what identifies an entry, and how it is spelled in Redis.

An entry is identified by the token URL, the client id, the scope set and a
fingerprint of the client secret.  The fingerprint is an HMAC of the secret,
so two callers holding different secrets for the same client never share a
token, and the secret cannot be read back from anything stored.  All of it is
hashed into a fixed-length entry id, which bounds key length whatever the
inputs and keeps client ids and URLs out of Redis key names.

Every Redis key of an entry carries the entry id as a Redis Cluster hash tag,
``{<id>}``, so the token, its lease and its failure record live in one slot
and one Lua script can touch them all.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from ._errors import ConfigurationError

# A library-wide default key for the secret fingerprint.  Setting your own
# `fingerprint_key` (the same on every worker) makes the fingerprint useless
# to anyone who reads Redis but does not hold that key.
DEFAULT_FINGERPRINT_KEY = b"tokenfleet/v1/credential-fingerprint"

_ID_LENGTH = 32
_NAMESPACE_LIMIT = 64


def fingerprint(client_id: str, client_secret: str, key: bytes) -> bytes:
    """Return the keyed hash that stands for *client_secret* in cache keys."""
    message = client_id.encode() + b"\x00" + client_secret.encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def entry_id(
    token_url: str, client_id: str, scopes: tuple[str, ...], secret_fingerprint: bytes
) -> str:
    """Return the fixed-length id of the entry for these request parameters."""
    digest = hashlib.sha256()
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    for part in (
        token_url.encode(),
        client_id.encode(),
        " ".join(scopes).encode(),
        secret_fingerprint,
    ):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)

    return digest.hexdigest()[:_ID_LENGTH]


def token_digest(access_token: str) -> str:
    """Return the short digest that names one token in entries and notifications."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:_ID_LENGTH]


def check_namespace(namespace: str) -> str:
    """Return *namespace* when it can prefix Redis keys, else raise."""
    if (
        not isinstance(namespace, str)
        or not namespace
        or len(namespace) > _NAMESPACE_LIMIT
        or any(ch in "{} \t\r\n" or not ch.isprintable() for ch in namespace)
    ):
        msg = (
            f"The namespace {namespace!r} is not usable: it must be 1 to "
            f"{_NAMESPACE_LIMIT} printable characters without spaces or braces."
        )
        raise ConfigurationError(msg)

    return namespace


@dataclass(frozen=True, slots=True)
class KeySchema:
    """How entry ids become Redis key names within one namespace."""

    namespace: str

    @property
    def channel(self) -> str:
        """The pub/sub channel carrying commit and invalidation notices."""
        return f"{self.namespace}:notices"

    def token(self, eid: str) -> str:
        """The key holding the entry's current token."""
        return f"{self.namespace}:{{{eid}}}:token"

    def lease(self, eid: str) -> str:
        """The key whose owner is the one worker allowed to fetch."""
        return f"{self.namespace}:{{{eid}}}:lease"

    def failure(self, eid: str) -> str:
        """The key remembering a recent failed fetch (cooldown)."""
        return f"{self.namespace}:{{{eid}}}:failure"

    def endpoint_cooldown(self, url_id: str) -> str:
        """The key that pauses every fetch from one token URL."""
        return f"{self.namespace}:{{u{url_id}}}:cooldown"


def url_id(token_url: str) -> str:
    """Return the fixed-length id of a token URL."""
    return hashlib.sha256(token_url.encode()).hexdigest()[:_ID_LENGTH]
