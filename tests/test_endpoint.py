"""The token endpoint client, over real HTTP to the fake IdP.

Waits between retries go through `ManualClock`, which records what it was
asked to sleep and moves its own time at once, so no test sleeps for real
except where a request timeout is the point.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.lowlevel
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfleet._endpoint import (
    RetryPolicy,
    TokenEndpointClient,
    basic_authorization,
    validate_token_url,
)
from tokenfleet._errors import (
    ConfigurationError,
    IdPUnavailableError,
    InvalidClientError,
    InvalidScopeError,
    MalformedResponseError,
    RateLimitedError,
    TokenEndpointError,
    TokenFleetError,
)
from tokenfleet._models import ClientCredentials, TokenResponse
from tokenfleet.testing._fake_idp import FakeIdP, ScriptedFailure

NOW = 1_700_000_000.0
CLIENT_ID = "0oa-fleet-client"
CLIENT_SECRET = "sEcReT-8c1f2b-must-never-leak"
CREDENTIALS = ClientCredentials(CLIENT_ID, CLIENT_SECRET)
SCOPES = ("submissions.read", "submissions.write")
DEFAULT_POLICY = RetryPolicy()


class ManualClock:
    """A clock that moves only when slept on, and records every wait."""

    def __init__(self, start: float = NOW) -> None:
        self.now = start
        self.elapsed = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        """Return the wall-clock time."""
        return self.now

    def monotonic(self) -> float:
        """Return the seconds slept so far."""
        return self.elapsed

    async def sleep(self, seconds: float) -> None:
        """Record the wait and move both clocks past it at once."""
        self.sleeps.append(seconds)
        self.now += seconds
        self.elapsed += seconds
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def clock() -> ManualClock:
    """A fresh manual clock at a fixed, whole-second time."""
    return ManualClock()


@pytest.fixture
async def idp(clock: ManualClock) -> AsyncIterator[FakeIdP]:
    """A running fake IdP on the test clock, with one registered client."""
    async with FakeIdP(clock=clock.time) as fake:
        fake.add_client(CLIENT_ID, CLIENT_SECRET)
        yield fake


@pytest.fixture
async def client(clock: ManualClock) -> AsyncIterator[TokenEndpointClient]:
    """A client on the test clock with a seeded random source."""
    async with TokenEndpointClient(clock=clock, rng=random.Random(20240611)) as tec:
        yield tec


def _statuses(idp: FakeIdP) -> list[int]:
    return [request.status for request in idp.requests]


def _token_body(**fields: Any) -> bytes:
    return orjson.dumps(
        {"access_token": "opaque-token", "token_type": "Bearer", **fields}
    )


# Success and what is sent


@pytest.mark.anyio
async def test_token_is_fetched(idp: FakeIdP, client: TokenEndpointClient) -> None:
    """A registered client gets a Bearer token with the IdP's lifetime."""
    token = await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert token.token_type == "Bearer"
    assert token.expires_in == 3600.0
    assert token.scope == "submissions.read submissions.write"
    assert idp.issued(CLIENT_ID) == 1


@pytest.mark.anyio
async def test_scopes_are_sent_sorted_and_deduplicated(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """The form body carries each scope once, in sorted order."""
    sent: list[bytes] = []

    async def record_chunk(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestChunkSentParams,
    ) -> None:
        sent.append(params.chunk)

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(record_chunk)
    async with (
        aiohttp.ClientSession(trace_configs=[trace]) as session,
        TokenEndpointClient(session=session, clock=clock) as client,
    ):
        scopes = ["submissions.write", "submissions.read", "submissions.write"]
        await client.fetch(CREDENTIALS, idp.token_url, scopes)

    assert b"".join(sent) == (
        b"grant_type=client_credentials&scope=submissions.read+submissions.write"
    )
    assert idp.requests[0].scopes == SCOPES


AWKWARD_CREDENTIALS = [
    ("id:with:colons", "secret:with:colons"),
    ("id%41percent", "se%20cret%"),
    ("id+plus", "se+cr+et"),
    ("id with spaces", "secret with spaces"),
    ("idé-ünï-✓", "sécrèt-日本-🔑"),
    ("a:%+ é", "b:%+ é:"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("client_id", "client_secret"), AWKWARD_CREDENTIALS)
async def test_rfc6749_basic_form_carries_awkward_credentials(
    idp: FakeIdP, clock: ManualClock, client_id: str, client_secret: str
) -> None:
    """The default form-urlencoded Basic header survives any character."""
    idp.add_client(client_id, client_secret)

    async with TokenEndpointClient(clock=clock) as client:
        await client.fetch(
            ClientCredentials(client_id, client_secret), idp.token_url, SCOPES
        )

    assert idp.issued(client_id) == 1


# An id containing ':' cannot be told apart from the secret in the raw form
# (RFC 7617 forbids it), so only secrets carry colons here.
RAW_CREDENTIALS = [
    ("plain-id", "secret:with:colons"),
    ("id%41percent", "se%20cret%"),
    ("id+plus", "se+cr+et"),
    ("id with spaces", "secret with spaces"),
    ("idé-ünï-✓", "sécrèt-日本-🔑:"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("client_id", "client_secret"), RAW_CREDENTIALS)
async def test_raw_basic_form_carries_awkward_credentials(
    idp: FakeIdP, clock: ManualClock, client_id: str, client_secret: str
) -> None:
    """The raw Basic header sends id and secret as they are."""
    idp.add_client(client_id, client_secret)

    async with TokenEndpointClient(basic_auth="raw", clock=clock) as client:
        await client.fetch(
            ClientCredentials(client_id, client_secret), idp.token_url, SCOPES
        )

    assert idp.issued(client_id) == 1


def _decoded_basic(value: str) -> str:
    scheme, _, encoded = value.partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(encoded).decode()


def test_rfc6749_basic_value_encodes_each_part_before_joining() -> None:
    """The RFC form urlencodes id and secret, then joins them with ':'."""
    credentials = ClientCredentials("id:a b", "s+c:é")

    value = basic_authorization(credentials, "rfc6749")

    assert _decoded_basic(value) == "id%3Aa+b:s%2Bc%3A%C3%A9"


def test_raw_basic_value_joins_the_parts_unchanged() -> None:
    """The raw form joins id and secret as UTF-8 text."""
    credentials = ClientCredentials("id a", "s+c:é")

    value = basic_authorization(credentials, "raw")

    assert _decoded_basic(value) == "id a:s+c:é"


def test_unknown_basic_encoding_is_refused() -> None:
    """Only the two known Basic forms are accepted."""
    with pytest.raises(ConfigurationError, match="'latin1'"):
        basic_authorization(CREDENTIALS, "latin1")  # type: ignore[arg-type]


# Final errors


@pytest.mark.anyio
async def test_wrong_secret_is_invalid_client(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock
) -> None:
    """A rejected secret raises InvalidClientError with HTTP 401, unretried."""
    wrong = ClientCredentials(CLIENT_ID, "not-the-secret")

    with pytest.raises(InvalidClientError) as caught:
        await client.fetch(wrong, idp.token_url, SCOPES)

    assert caught.value.status == 401
    assert caught.value.error == "invalid_client"
    assert _statuses(idp) == [401]
    assert clock.sleeps == []


@pytest.mark.anyio
async def test_unknown_scope_is_invalid_scope(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """A scope the client may not have raises InvalidScopeError."""
    with pytest.raises(InvalidScopeError) as caught:
        await client.fetch(CREDENTIALS, idp.token_url, ["submissions.admin"])

    assert caught.value.status == 400
    assert caught.value.error_description is not None
    assert "submissions.admin" in caught.value.error_description


@pytest.mark.anyio
async def test_other_oauth_errors_keep_code_and_description(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """Other §5.2 errors raise TokenEndpointError with the IdP's details."""
    body = orjson.dumps(
        {"error": "unauthorized_client", "error_description": "Grant not allowed."}
    )
    idp.fail_next(ScriptedFailure(status=400, body=body))

    with pytest.raises(TokenEndpointError) as caught:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert type(caught.value) is TokenEndpointError
    assert caught.value.error == "unauthorized_client"
    assert caught.value.error_description == "Grant not allowed."
    assert caught.value.status == 400


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 418])
async def test_other_4xx_answers_are_never_retried(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock, status: int
) -> None:
    """A 4xx other than 429 is final: one request, no wait."""
    idp.fail_next(ScriptedFailure(status=status))

    with pytest.raises(TokenFleetError):
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert _statuses(idp) == [status]
    assert clock.sleeps == []


@pytest.mark.anyio
async def test_non_json_4xx_is_malformed_without_quoting_the_body(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """A non-JSON error page is named by status and content type only."""
    page = b"<html><body>Forbidden for session abc123-private</body></html>"
    idp.fail_next(ScriptedFailure(status=403, body=page, content_type="text/html"))

    with pytest.raises(MalformedResponseError) as caught:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    message = str(caught.value)
    assert "HTTP 403" in message
    assert "'text/html'" in message
    assert "abc123-private" not in message
    assert "Forbidden" not in message


@pytest.mark.anyio
async def test_body_over_the_limit_is_refused_by_content_length(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """An answer declaring more than 64 KiB is refused, not retried."""
    body = _token_body(padding="x" * (64 * 1024))
    idp.fail_next(ScriptedFailure(status=200, body=body))

    with pytest.raises(MalformedResponseError, match="larger than 65536 bytes"):
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert len(idp.requests) == 1


async def _read_request(stream: anyio.abc.SocketStream) -> None:
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive()

    head, _, body = received.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += await stream.receive()


@asynccontextmanager
async def chunked_server(chunks: list[bytes]) -> AsyncIterator[str]:
    """Serve one fixed chunked 200 answer on a loopback port; yield its URL.

    The fake IdP always declares a Content-Length; this server never does,
    so the client cannot know the size before reading.
    """

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                await _read_request(stream)
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                )
                for chunk in chunks:
                    await stream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await stream.send(b"0\r\n\r\n")
            except (anyio.BrokenResourceError, anyio.EndOfStream):
                # The client may hang up once it has read enough to refuse.
                return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    # anyio's typed attribute lookup, not Django's QuerySet.extra.
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with listener, anyio.create_task_group() as serving:
        serving.start_soon(listener.serve, answer)
        yield f"http://127.0.0.1:{port}/oauth2/aus0chunked/v1/token"
        serving.cancel_scope.cancel()


@pytest.mark.anyio
async def test_chunked_body_under_the_limit_is_read(
    client: TokenEndpointClient,
) -> None:
    """A chunked answer without Content-Length is read and parsed."""
    body = _token_body(expires_in=90)
    chunks = [body[:10], body[10:]]

    async with chunked_server(chunks) as token_url:
        token = await client.fetch(CREDENTIALS, token_url, SCOPES)

    assert token.access_token == "opaque-token"
    assert token.expires_in == 90.0


@pytest.mark.anyio
async def test_chunked_body_over_the_limit_is_refused(
    client: TokenEndpointClient,
) -> None:
    """A chunked answer growing past 64 KiB is refused while reading."""
    chunks = [b"x" * 8192] * 9

    async with chunked_server(chunks) as token_url:
        with pytest.raises(MalformedResponseError, match="larger than 65536 bytes"):
            await client.fetch(CREDENTIALS, token_url, SCOPES)


# Lifetimes


@pytest.mark.anyio
async def test_expires_in_as_numeric_string_is_accepted(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """``"expires_in": "120"`` gives a 120-second token."""
    idp.fail_next(ScriptedFailure(status=200, body=_token_body(expires_in="120")))

    token = await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert token.expires_in == 120.0


@pytest.mark.anyio
async def test_missing_expires_in_uses_the_jwt_exp(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """Without ``expires_in``, the lifetime comes from the token's ``exp``."""
    idp.include_expires_in = False
    idp.expires_in = 1234

    token = await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert token.expires_in == 1234.0


@pytest.mark.anyio
async def test_missing_expires_in_and_exp_uses_the_default(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """An opaque token without ``expires_in`` lives the configured default."""
    idp.fail_next(ScriptedFailure(status=200, body=_token_body()))

    async with TokenEndpointClient(clock=clock, default_expires_in=123) as client:
        token = await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert token.expires_in == 123.0


# Retries


@pytest.mark.anyio
async def test_429_then_success_is_retried(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock
) -> None:
    """A 429 without a hint is retried after a jittered backoff."""
    idp.fail_next(ScriptedFailure(status=429))

    token = await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert isinstance(token, TokenResponse)
    assert _statuses(idp) == [429, 200]
    assert len(clock.sleeps) == 1
    assert 0.0 <= clock.sleeps[0] <= DEFAULT_POLICY.initial_backoff


@pytest.mark.anyio
async def test_5xx_burst_then_success_is_retried(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock
) -> None:
    """A run of 5xx answers is retried until the IdP recovers."""
    idp.fail_next(
        ScriptedFailure(status=503),
        ScriptedFailure(status=502, body=b"Bad Gateway", content_type="text/plain"),
        ScriptedFailure(status=500),
    )

    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert _statuses(idp) == [503, 502, 500, 200]
    assert len(clock.sleeps) == 3


@pytest.mark.anyio
async def test_dropped_connection_is_retried(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """A connection closed without an answer is retried."""
    idp.fail_next(ScriptedFailure(drop=True))

    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert _statuses(idp) == [0, 200]


@pytest.mark.anyio
async def test_persistent_5xx_ends_in_idp_unavailable(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """When every attempt gets a 5xx, IdPUnavailableError names the status."""
    idp.fail_always(ScriptedFailure(status=503))

    with pytest.raises(IdPUnavailableError) as caught:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.status == 503
    assert len(idp.requests) == DEFAULT_POLICY.max_attempts


@pytest.mark.anyio
async def test_timeouts_end_in_idp_unavailable_after_retries(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """An IdP slower than the request timeout is retried, then given up on."""
    idp.latency = 1.0
    policy = RetryPolicy(max_attempts=2)

    async with TokenEndpointClient(
        clock=clock, request_timeout=0.1, retry=policy
    ) as client:
        with pytest.raises(IdPUnavailableError) as caught:
            await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert len(idp.requests) == 2
    assert len(clock.sleeps) == 1


@pytest.mark.anyio
async def test_429_exhausted_without_hint_has_no_retry_after(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """Running out of attempts on 429s raises RateLimitedError without a hint."""
    idp.fail_always(ScriptedFailure(status=429))

    async with TokenEndpointClient(
        clock=clock, retry=RetryPolicy(max_attempts=3)
    ) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.retry_after is None
    assert _statuses(idp) == [429, 429, 429]


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
async def test_backoffs_stay_within_the_full_jitter_ceiling(
    idp: FakeIdP, clock: ManualClock, seed: int
) -> None:
    """Wait *n* lies in [0, min(max_backoff, initial * multiplier ** n)]."""
    policy = RetryPolicy(
        initial_backoff=0.1, multiplier=3.0, max_backoff=1.0, max_attempts=7
    )
    idp.fail_next(*[ScriptedFailure(status=503)] * 6)

    async with TokenEndpointClient(
        clock=clock, retry=policy, rng=random.Random(seed)
    ) as client:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert len(clock.sleeps) == 6
    for attempt, wait in enumerate(clock.sleeps):
        ceiling = min(1.0, 0.1 * 3.0**attempt)
        assert 0.0 <= wait <= ceiling


@given(
    initial=st.floats(min_value=0, max_value=10),
    multiplier=st.floats(min_value=0, max_value=10),
    ceiling=st.floats(min_value=0, max_value=60),
    attempt=st.integers(min_value=0, max_value=50),
    seed=st.integers(),
)
def test_backoff_is_full_jitter_below_the_ceiling(
    initial: float, multiplier: float, ceiling: float, attempt: int, seed: int
) -> None:
    """Every backoff is between zero and the capped exponential ceiling."""
    policy = RetryPolicy(
        initial_backoff=initial, multiplier=multiplier, max_backoff=ceiling
    )

    wait = policy.backoff(attempt, random.Random(seed))

    assert 0.0 <= wait <= min(ceiling, initial * multiplier**attempt)


@pytest.mark.anyio
async def test_retry_after_seconds_is_honoured(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock
) -> None:
    """``Retry-After: 3`` makes the client wait 3 s plus a little jitter."""
    idp.fail_next(ScriptedFailure(status=429, headers={"Retry-After": "3"}))

    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert len(clock.sleeps) == 1
    assert 3.0 <= clock.sleeps[0] <= 3.0 + DEFAULT_POLICY.initial_backoff


@pytest.mark.anyio
async def test_retry_after_http_date_is_honoured(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock
) -> None:
    """``Retry-After`` as an HTTP date is measured on the client's clock."""
    when = email.utils.formatdate(NOW + 7, usegmt=True)
    idp.fail_next(ScriptedFailure(status=503, headers={"Retry-After": when}))

    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert len(clock.sleeps) == 1
    assert 7.0 <= clock.sleeps[0] <= 7.0 + DEFAULT_POLICY.initial_backoff


@pytest.mark.anyio
async def test_okta_rate_limit_reset_is_honoured(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """Over Okta's limit, the client waits for ``X-Rate-Limit-Reset``."""
    idp.rate_limit(1, window=60.0)
    reset = (math.floor(NOW / 60.0) + 1) * 60.0

    async with TokenEndpointClient(
        clock=clock, retry=RetryPolicy(deadline=120.0)
    ) as client:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert _statuses(idp) == [200, 429, 200]
    assert len(clock.sleeps) == 1
    assert reset - NOW <= clock.sleeps[0] <= reset - NOW + 0.2


@pytest.mark.anyio
async def test_hint_beyond_the_deadline_gives_up_without_sleeping(
    idp: FakeIdP, client: TokenEndpointClient, clock: ManualClock
) -> None:
    """A Retry-After longer than the deadline raises at once with the hint."""
    idp.fail_next(ScriptedFailure(status=429, headers={"Retry-After": "100"}))

    with pytest.raises(RateLimitedError) as caught:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.retry_after == 100.0
    assert clock.sleeps == []
    assert len(idp.requests) == 1


@pytest.mark.anyio
async def test_okta_rate_limit_is_reported_endpoint_wide(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """A 429 with Okta's rate-limit headers is marked as endpoint-wide."""
    idp.rate_limit(1, window=60.0)
    reset = (math.floor(NOW / 60.0) + 1) * 60.0

    async with TokenEndpointClient(clock=clock) as client:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)
        with pytest.raises(RateLimitedError) as caught:
            await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.endpoint_wide is True
    assert caught.value.retry_after == reset - NOW


@pytest.mark.anyio
async def test_plain_429_is_not_endpoint_wide(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """A 429 with only Retry-After concerns this client alone."""
    idp.fail_next(ScriptedFailure(status=429, headers={"Retry-After": "100"}))

    with pytest.raises(RateLimitedError) as caught:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.endpoint_wide is False


@pytest.mark.anyio
async def test_5xx_given_up_on_keeps_the_hint(idp: FakeIdP, clock: ManualClock) -> None:
    """IdPUnavailableError carries the Retry-After of the last 5xx."""
    idp.fail_next(ScriptedFailure(status=503, headers={"Retry-After": "2"}))

    async with TokenEndpointClient(
        clock=clock, retry=RetryPolicy(max_attempts=1)
    ) as client:
        with pytest.raises(IdPUnavailableError) as caught:
            await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert caught.value.retry_after == 2.0
    assert caught.value.status == 503


@pytest.mark.anyio
async def test_no_wait_crosses_the_deadline(idp: FakeIdP, clock: ManualClock) -> None:
    """Retries stop before the waits would add up past the deadline."""
    idp.fail_always(ScriptedFailure(status=503))
    policy = RetryPolicy(
        deadline=1.0,
        initial_backoff=0.3,
        multiplier=1.0,
        max_backoff=0.3,
        max_attempts=100,
    )

    async with TokenEndpointClient(
        clock=clock, retry=policy, rng=random.Random(5)
    ) as client:
        with pytest.raises(IdPUnavailableError):
            await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert sum(clock.sleeps) < 1.0
    assert len(idp.requests) == len(clock.sleeps) + 1
    assert len(idp.requests) < 100


# Secrets


def _leaks(value: object, secrets: list[str]) -> bool:
    shown = f"{value!s} {value!r}"
    return any(secret in shown for secret in secrets)


@pytest.mark.anyio
async def test_secrets_and_tokens_stay_out_of_logs_and_errors(
    idp: FakeIdP, client: TokenEndpointClient, caplog: pytest.LogCaptureFixture
) -> None:
    """No log record field and no error message holds a secret or a token."""
    caplog.set_level(logging.DEBUG)
    idp.fail_next(
        ScriptedFailure(status=503, headers={"Retry-After": "1"}),
        ScriptedFailure(drop=True),
        ScriptedFailure(status=429),
    )
    token = await client.fetch(CREDENTIALS, idp.token_url, SCOPES)
    secrets = [CLIENT_SECRET, token.access_token]

    wrong = ClientCredentials(CLIENT_ID, "wrong-" + CLIENT_SECRET)
    with pytest.raises(InvalidClientError) as rejected:
        await client.fetch(wrong, idp.token_url, SCOPES)
    idp.fail_always(ScriptedFailure(status=503))
    with pytest.raises(IdPUnavailableError) as unavailable:
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    for error in (rejected.value, unavailable.value):
        chain: BaseException | None = error
        while chain is not None:
            assert not _leaks(chain, secrets)
            chain = chain.__cause__
    ours = [r for r in caplog.records if r.name.startswith("tokenfleet")]
    assert {r.getMessage() for r in ours} >= {
        "token_request.started",
        "token_request.retrying",
        "token_request.complete",
        "token_request.failed",
    }
    for record in caplog.records:
        assert not _leaks(record.getMessage(), secrets)
        for value in vars(record).values():
            assert not _leaks(value, secrets)


def test_reprs_hide_secret_and_token() -> None:
    """Credentials and token responses redact what they carry."""
    response = TokenResponse("the-access-token", "Bearer", 60.0)

    assert CLIENT_SECRET not in repr(CREDENTIALS)
    assert "the-access-token" not in repr(response)


# Configuration and the session


@pytest.mark.anyio
async def test_plain_http_to_a_remote_host_is_refused_before_any_io(
    client: TokenEndpointClient,
) -> None:
    """Secrets are never sent in clear text: no session is even opened."""
    with pytest.raises(ConfigurationError, match="plain http"):
        await client.fetch(
            CREDENTIALS, "http://example.invalid/oauth2/aus/v1/token", SCOPES
        )

    assert client._session is None


@pytest.mark.anyio
async def test_one_session_serves_every_request(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """Successive fetches reuse the client's single session."""
    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)
    first = client._session
    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert first is not None
    assert client._session is first
    assert idp.issued(CLIENT_ID) == 2


@pytest.mark.anyio
async def test_aclose_closes_the_session_the_client_opened(
    idp: FakeIdP, clock: ManualClock
) -> None:
    """The client closes a session it created."""
    client = TokenEndpointClient(clock=clock)
    await client.fetch(CREDENTIALS, idp.token_url, SCOPES)
    session = client._session

    await client.aclose()

    assert session is not None
    assert session.closed


@pytest.mark.anyio
async def test_borrowed_session_stays_open(idp: FakeIdP, clock: ManualClock) -> None:
    """A session passed in belongs to the caller and is left open."""
    async with aiohttp.ClientSession() as session:
        async with TokenEndpointClient(session=session, clock=clock) as client:
            await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

        assert not session.closed


@pytest.mark.anyio
async def test_closed_client_refuses_to_fetch(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """Fetching after aclose raises TokenFleetError and sends nothing."""
    await client.aclose()

    with pytest.raises(TokenFleetError, match="closed"):
        await client.fetch(CREDENTIALS, idp.token_url, SCOPES)

    assert idp.requests == []


@pytest.mark.anyio
async def test_credentials_must_be_client_credentials(
    idp: FakeIdP, client: TokenEndpointClient
) -> None:
    """A bare tuple is refused as credentials."""
    with pytest.raises(ConfigurationError, match="tuple"):
        await client.fetch(
            (CLIENT_ID, CLIENT_SECRET),  # type: ignore[arg-type]
            idp.token_url,
            SCOPES,
        )


@pytest.mark.parametrize(
    "settings",
    [
        {"basic_auth": "utf8"},
        {"request_timeout": 0},
        {"max_body_bytes": 100},
        {"default_expires_in": -1},
    ],
)
def test_invalid_client_settings_are_refused(settings: dict[str, Any]) -> None:
    """Nonsensical client settings raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        TokenEndpointClient(**settings)


@pytest.mark.parametrize(
    "settings",
    [{"max_attempts": 0}, {"deadline": -1.0}, {"multiplier": float("nan")}],
)
def test_invalid_retry_policies_are_refused(settings: dict[str, Any]) -> None:
    """A retry policy needs an attempt and non-negative durations."""
    with pytest.raises(ConfigurationError):
        RetryPolicy(**settings)


@pytest.mark.parametrize(
    "token_url",
    [
        "https://eu.id.resistant.ai/oauth2/aus/v1/token",
        "http://127.0.0.1:8080/oauth2/aus/v1/token",
        "http://localhost/oauth2/aus/v1/token",
        "http://[::1]:9000/oauth2/aus/v1/token",
    ],
)
def test_https_and_loopback_http_urls_are_accepted(token_url: str) -> None:
    """https anywhere and http to loopback are valid token URLs."""
    assert validate_token_url(token_url) == token_url


def test_insecure_http_can_be_allowed_explicitly() -> None:
    """``allow_insecure_http`` lets plain http reach another host."""
    token_url = "http://idp.internal/oauth2/aus/v1/token"

    assert validate_token_url(token_url, allow_insecure_http=True) == token_url


@pytest.mark.parametrize(
    "token_url",
    ["", "/oauth2/aus/v1/token", "ftp://idp.example/token", "https://", "https://h/#x"],
)
def test_malformed_token_urls_are_refused(token_url: str) -> None:
    """Relative, empty, non-http and fragment URLs are refused."""
    with pytest.raises(ConfigurationError):
        validate_token_url(token_url)


@pytest.mark.parametrize(
    "token_url",
    [
        "https://client:pa55word-XYZ@idp.example/oauth2/aus/v1/token",
        "http://client:pa55word-XYZ@idp.example/oauth2/aus/v1/token",
        "ftp://client:pa55word-XYZ@idp.example/oauth2/aus/v1/token",
        "https://client:pa55word-XYZ@[::1/oauth2/aus/v1/token",
    ],
)
def test_credentials_in_the_url_are_refused_without_quoting_them(
    token_url: str,
) -> None:
    """A URL carrying a password is refused and the password is not echoed."""
    with pytest.raises(ConfigurationError) as caught:
        validate_token_url(token_url)

    assert "pa55word-XYZ" not in str(caught.value)
