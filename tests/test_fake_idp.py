"""The fake Okta token endpoint, exercised over real HTTP on loopback."""

from __future__ import annotations

import base64
import http.client
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from tokenfleet._errors import ConfigurationError
from tokenfleet.testing._fake_idp import FakeIdP, IdPRequest, ScriptedFailure

CLIENT_ID = "0oafleet417"
CLIENT_SECRET = "s3cret-for-tests"
READ_FORM = {"grant_type": "client_credentials", "scope": "submissions.read"}


class MovableClock:
    """A Unix clock that only moves when a test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Reply:
    """What the fake IdP answered to one request."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


def basic_rfc6749(client_id: str, secret: str) -> dict[str, str]:
    """An Authorization header with id and secret form-encoded first."""
    pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def basic_raw(client_id: str, secret: str) -> dict[str, str]:
    """An Authorization header with id and secret as they are (RFC 7617)."""
    pair = f"{client_id}:{secret}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def jwt_segment(token: str, index: int) -> Any:
    """One base64url segment of a JWT, parsed as JSON."""
    segment = token.split(".")[index]
    return orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


async def post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    form: Mapping[str, str] | None = None,
) -> Reply:
    """POST a form to `url` and read the whole answer."""
    data = dict(READ_FORM if form is None else form)
    async with session.post(url, headers=headers, data=data) as response:
        return Reply(response.status, dict(response.headers), await response.read())


async def request_token(
    session: aiohttp.ClientSession,
    idp: FakeIdP,
    *,
    client_id: str = CLIENT_ID,
    secret: str = CLIENT_SECRET,
    form: Mapping[str, str] | None = None,
) -> Reply:
    """Ask `idp` for a token with RFC 6749 Basic credentials."""
    return await post(
        session, idp.token_url, headers=basic_rfc6749(client_id, secret), form=form
    )


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdP]:
    """A running fake IdP with one registered client."""
    async with FakeIdP() as running:
        running.add_client(CLIENT_ID, CLIENT_SECRET)
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as client_session:
        yield client_session


# Successful answers


@pytest.mark.anyio
async def test_binds_a_free_loopback_port(idp: FakeIdP) -> None:
    """The server reports the port it was bound to in its URLs."""
    assert idp.port > 0
    assert idp.token_url == (
        f"http://127.0.0.1:{idp.port}/oauth2/ausfake0000000000417/v1/token"
    )


@pytest.mark.anyio
async def test_success_has_okta_shape(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A valid request gets Okta's JSON fields and no-store caching headers."""
    reply = await request_token(session, idp)

    assert reply.status == 200
    payload = reply.json()
    assert list(payload) == ["token_type", "expires_in", "access_token", "scope"]
    assert payload["token_type"] == "Bearer"
    assert payload["expires_in"] == 3600
    assert isinstance(payload["expires_in"], int)
    assert payload["scope"] == "submissions.read"
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Pragma"] == "no-cache"


@pytest.mark.anyio
async def test_access_token_carries_okta_claims(
    session: aiohttp.ClientSession,
) -> None:
    """The token is a JWT with Okta's claims, dated by the IdP's clock."""
    async with FakeIdP(clock=MovableClock(1_700_000_000.75)) as idp:
        idp.add_client(CLIENT_ID, CLIENT_SECRET)
        form = {**READ_FORM, "scope": "submissions.write submissions.read"}
        token = (await request_token(session, idp, form=form)).json()["access_token"]
        issuer = idp.issuer

    header, claims = jwt_segment(token, 0), jwt_segment(token, 1)
    assert header["alg"] == "RS256"
    assert header["kid"]
    assert claims["ver"] == 1
    assert claims["jti"].startswith("AT.")
    assert claims["iss"] == issuer
    assert issuer.endswith("/oauth2/ausfake0000000000417")
    assert claims["aud"] == "api://default"
    assert claims["iat"] == 1_700_000_000
    assert claims["exp"] == 1_700_003_600
    assert claims["cid"] == CLIENT_ID
    assert claims["sub"] == CLIENT_ID
    assert claims["scp"] == ["submissions.write", "submissions.read"]


@pytest.mark.anyio
async def test_tokens_are_unique(idp: FakeIdP, session: aiohttp.ClientSession) -> None:
    """Every token issued differs from every other, down to its jti."""
    replies = [await request_token(session, idp) for _ in range(10)]

    tokens = {reply.json()["access_token"] for reply in replies}
    assert len(tokens) == 10
    assert len({jwt_segment(token, 1)["jti"] for token in tokens}) == 10


@pytest.mark.anyio
async def test_client_lifetime_overrides_the_idp_lifetime(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A client's own expires_in wins, and a fractional one stays fractional."""
    idp.add_client("short-lived", "pw", expires_in=0.5)

    reply = await request_token(session, idp, client_id="short-lived", secret="pw")

    assert reply.json()["expires_in"] == 0.5


@pytest.mark.anyio
async def test_integral_float_lifetime_is_sent_as_int(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A lifetime of 300.0 seconds is answered as the integer 300."""
    idp.expires_in = 300.0

    expires_in = (await request_token(session, idp)).json()["expires_in"]

    assert expires_in == 300
    assert isinstance(expires_in, int)


@pytest.mark.anyio
async def test_expires_in_can_be_left_out(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """With include_expires_in off, the answer has no expires_in field."""
    idp.include_expires_in = False

    payload = (await request_token(session, idp)).json()

    assert "expires_in" not in payload
    assert jwt_segment(payload["access_token"], 1)["exp"] > 0


# Client authentication

AWKWARD_ID = "fleet:client %41+1 é"
AWKWARD_SECRET = "p:a%20ss+w ørd:"


@pytest.mark.anyio
async def test_accepts_rfc6749_encoded_basic_credentials(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Form-encoded id and secret with ':', '%', '+', spaces and non-ASCII pass."""
    idp.add_client(AWKWARD_ID, AWKWARD_SECRET)

    headers = basic_rfc6749(AWKWARD_ID, AWKWARD_SECRET)
    reply = await post(session, idp.token_url, headers=headers)

    assert reply.status == 200
    assert jwt_segment(reply.json()["access_token"], 1)["cid"] == AWKWARD_ID


@pytest.mark.anyio
async def test_accepts_raw_basic_credentials(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Raw id and secret pass, the secret keeping its ':', '%', '+' and spaces."""
    raw_id = AWKWARD_ID.replace(":", "")
    idp.add_client(raw_id, AWKWARD_SECRET)

    reply = await post(
        session, idp.token_url, headers=basic_raw(raw_id, AWKWARD_SECRET)
    )

    assert reply.status == 200
    assert jwt_segment(reply.json()["access_token"], 1)["cid"] == raw_id


@pytest.mark.anyio
async def test_accepts_client_secret_post(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Credentials in the form body authenticate the client too."""
    form = {**READ_FORM, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    reply = await post(session, idp.token_url, form=form)

    assert reply.status == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(basic_rfc6749(CLIENT_ID, "wrong"), id="wrong-secret"),
        pytest.param(basic_raw("nobody", CLIENT_SECRET), id="unknown-client"),
        pytest.param({"Authorization": "Basic !!not-base64"}, id="garbled-header"),
        pytest.param({}, id="no-credentials"),
    ],
)
async def test_bad_credentials_are_invalid_client(
    idp: FakeIdP, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """Credentials that match no client get 401 invalid_client and a challenge."""
    reply = await post(session, idp.token_url, headers=headers)

    assert reply.status == 401
    assert reply.json()["error"] == "invalid_client"
    assert reply.headers["WWW-Authenticate"].startswith('Basic realm="')
    assert reply.headers["Cache-Control"] == "no-store"


@pytest.mark.anyio
async def test_removed_client_is_invalid_client(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Once removed, a client that used to get tokens gets invalid_client."""
    assert (await request_token(session, idp)).status == 200

    idp.remove_client(CLIENT_ID)
    reply = await request_token(session, idp)

    assert reply.status == 401
    assert reply.json()["error"] == "invalid_client"


@pytest.mark.anyio
async def test_two_authentication_methods_are_refused(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Basic credentials plus a client_secret in the body is invalid_request."""
    form = {**READ_FORM, "client_secret": CLIENT_SECRET}

    reply = await request_token(session, idp, form=form)

    assert reply.status == 400
    assert reply.json()["error"] == "invalid_request"


def test_client_secret_stays_out_of_repr() -> None:
    """A registered client's repr names its id but never its secret."""
    idp = FakeIdP()
    idp.add_client(CLIENT_ID, CLIENT_SECRET)

    text = repr(idp.clients[CLIENT_ID])

    assert CLIENT_ID in text
    assert CLIENT_SECRET not in text


# Request validation


@pytest.mark.anyio
async def test_scope_outside_the_client_is_invalid_scope(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Asking for a scope the client does not have gets 400 invalid_scope."""
    form = {**READ_FORM, "scope": "submissions.read submissions.delete"}

    reply = await request_token(session, idp, form=form)

    assert reply.status == 400
    assert reply.json()["error"] == "invalid_scope"
    assert "submissions.delete" in reply.json()["error_description"]


@pytest.mark.anyio
async def test_missing_scope_is_invalid_scope(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Without a scope parameter Okta has no default scopes to fall back on."""
    reply = await request_token(session, idp, form={"grant_type": "client_credentials"})

    assert reply.status == 400
    assert reply.json()["error"] == "invalid_scope"


@pytest.mark.anyio
async def test_other_grant_is_unsupported_grant_type(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A grant other than client_credentials gets unsupported_grant_type."""
    form = {**READ_FORM, "grant_type": "password"}

    reply = await request_token(session, idp, form=form)

    assert reply.status == 400
    assert reply.json()["error"] == "unsupported_grant_type"


@pytest.mark.anyio
async def test_missing_grant_type_is_invalid_request(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A request naming no grant_type gets invalid_request."""
    reply = await request_token(session, idp, form={"scope": "submissions.read"})

    assert reply.status == 400
    assert reply.json()["error"] == "invalid_request"


@pytest.mark.anyio
async def test_json_body_is_invalid_request(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A body that is not application/x-www-form-urlencoded gets invalid_request."""
    headers = basic_rfc6749(CLIENT_ID, CLIENT_SECRET)

    async with session.post(idp.token_url, headers=headers, json=READ_FORM) as resp:
        status, payload = resp.status, orjson.loads(await resp.read())

    assert status == 400
    assert payload["error"] == "invalid_request"


@pytest.mark.anyio
async def test_get_on_token_path_is_405(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Only POST is allowed on the token path."""
    async with session.get(idp.token_url) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"


@pytest.mark.anyio
async def test_unknown_authorization_server_is_404(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A token path naming another authorization server is not found."""
    url = idp.token_url.replace(idp.auth_server_id, "ausother")

    reply = await post(session, url, headers=basic_rfc6749(CLIENT_ID, CLIENT_SECRET))

    assert reply.status == 404


# Scripted failures


@pytest.mark.anyio
async def test_scripted_failure_sends_status_headers_and_raw_body(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A scripted failure answers exactly as scripted, once."""
    idp.fail_next(
        ScriptedFailure(
            status=503,
            headers={"Retry-After": "7"},
            body=b"<html>down for maintenance</html>",
            content_type="text/html",
        )
    )

    failed = await request_token(session, idp)
    recovered = await request_token(session, idp)

    assert failed.status == 503
    assert failed.headers["Retry-After"] == "7"
    assert failed.headers["Content-Type"] == "text/html"
    assert failed.body == b"<html>down for maintenance</html>"
    assert recovered.status == 200


@pytest.mark.anyio
async def test_scripted_failure_without_body_sends_oauth_error(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A scripted 503 without a body sends an RFC 6749 JSON error."""
    idp.fail_next(ScriptedFailure(status=503))

    reply = await request_token(session, idp)

    assert reply.status == 503
    assert reply.json()["error"] == "temporarily_unavailable"
    assert reply.json()["error_description"]


@pytest.mark.anyio
async def test_scripted_429_without_body_sends_okta_body(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A scripted 429 without a body sends Okta's rate-limit error."""
    idp.fail_next(ScriptedFailure(status=429, headers={"Retry-After": "2"}))

    reply = await request_token(session, idp)

    assert reply.status == 429
    assert reply.json()["errorCode"] == "E0000047"
    assert reply.headers["Retry-After"] == "2"


@pytest.mark.anyio
async def test_scripted_failures_come_in_order_before_authentication(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Queued failures are consumed one per request even with bad credentials."""
    idp.fail_next(ScriptedFailure(status=500), ScriptedFailure(status=502))

    statuses = [
        (await request_token(session, idp, secret="wrong")).status for _ in range(3)
    ]

    assert statuses == [500, 502, 401]


@pytest.mark.anyio
async def test_scripted_failure_waits_its_delay(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A scripted delay holds the answer back for that long."""
    idp.fail_next(ScriptedFailure(status=500, delay=0.2))

    started = time.monotonic()
    reply = await request_token(session, idp)

    assert reply.status == 500
    assert time.monotonic() - started >= 0.2


@pytest.mark.anyio
async def test_dropped_connection_is_a_client_connection_error(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A dropped request gets no HTTP answer at all, and is recorded as 0."""
    idp.fail_next(ScriptedFailure(drop=True))

    with pytest.raises(aiohttp.ClientConnectionError):
        await request_token(session, idp)

    assert [request.status for request in idp.requests] == [0]
    assert (await request_token(session, idp)).status == 200


@pytest.mark.anyio
async def test_standing_failure_lasts_until_cleared(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """fail_always fails every request until it is set to None."""
    idp.fail_always(ScriptedFailure(status=502))

    during = [(await request_token(session, idp)).status for _ in range(3)]
    idp.fail_always(None)
    after = await request_token(session, idp)

    assert during == [502, 502, 502]
    assert after.status == 200


# Rate limiting


@pytest.mark.anyio
async def test_over_the_rate_limit_answers_okta_429(
    session: aiohttp.ClientSession,
) -> None:
    """Past the limit, the IdP answers 429 with Okta's headers and body."""
    async with FakeIdP(clock=MovableClock(1_000.0)) as idp:
        idp.add_client(CLIENT_ID, CLIENT_SECRET)
        idp.rate_limit(2, window=60.0)
        admitted = [await request_token(session, idp) for _ in range(2)]
        refused = await request_token(session, idp)

    assert [reply.status for reply in admitted] == [200, 200]
    assert refused.status == 429
    assert refused.headers["X-Rate-Limit-Limit"] == "2"
    assert refused.headers["X-Rate-Limit-Remaining"] == "0"
    assert refused.headers["X-Rate-Limit-Reset"] == "1020"
    assert refused.json()["errorCode"] == "E0000047"
    assert refused.json()["errorSummary"] == (
        "API call exceeded rate limit due to too many requests."
    )


@pytest.mark.anyio
async def test_successes_carry_rate_limit_headers(
    session: aiohttp.ClientSession,
) -> None:
    """While a limit is set, each success says how much of it is left."""
    async with FakeIdP(clock=MovableClock(1_000.0)) as idp:
        idp.add_client(CLIENT_ID, CLIENT_SECRET)
        idp.rate_limit(5, window=60.0)
        replies = [await request_token(session, idp) for _ in range(2)]

    assert [reply.headers["X-Rate-Limit-Remaining"] for reply in replies] == [
        "4",
        "3",
    ]
    assert {reply.headers["X-Rate-Limit-Limit"] for reply in replies} == {"5"}
    assert {reply.headers["X-Rate-Limit-Reset"] for reply in replies} == {"1020"}


@pytest.mark.anyio
async def test_rate_limit_window_starts_afresh_at_its_boundary(
    session: aiohttp.ClientSession,
) -> None:
    """When the clock reaches the window's end, requests are admitted again."""
    clock = MovableClock(1_019.5)
    async with FakeIdP(clock=clock) as idp:
        idp.add_client(CLIENT_ID, CLIENT_SECRET)
        idp.rate_limit(1, window=60.0)
        first = await request_token(session, idp)
        refused = await request_token(session, idp)
        clock.now = 1_020.0
        next_window = await request_token(session, idp)

    assert [first.status, refused.status, next_window.status] == [200, 429, 200]
    assert next_window.headers["X-Rate-Limit-Reset"] == "1080"


@pytest.mark.anyio
async def test_rate_limit_zero_lifts_the_limit(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """rate_limit(0) removes both the limit and its headers."""
    idp.rate_limit(1)
    idp.rate_limit(0)

    replies = [await request_token(session, idp) for _ in range(3)]

    assert [reply.status for reply in replies] == [200, 200, 200]
    assert "X-Rate-Limit-Limit" not in replies[-1].headers


def test_negative_rate_limit_is_a_configuration_error() -> None:
    """A negative number of requests per window is refused."""
    with pytest.raises(ConfigurationError, match="-1"):
        FakeIdP().rate_limit(-1)


# Counting and recording


@pytest.mark.anyio
async def test_issued_counts_tokens_per_client(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """issued() counts successful token requests per client and in total."""
    idp.add_client("other", "pw")

    for _ in range(2):
        await request_token(session, idp)
    await request_token(session, idp, client_id="other", secret="pw")
    await request_token(session, idp, secret="wrong")

    assert idp.issued(CLIENT_ID) == 2
    assert idp.issued("other") == 1
    assert idp.issued() == 3


@pytest.mark.anyio
async def test_requests_are_recorded_with_their_outcome(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Every token request is recorded with its client, scopes and status."""
    before = time.monotonic()
    await request_token(session, idp)
    await request_token(session, idp, secret="wrong")

    records = idp.requests

    assert [(r.client_id, r.scopes, r.status) for r in records] == [
        (CLIENT_ID, ("submissions.read",), 200),
        (CLIENT_ID, ("submissions.read",), 401),
    ]
    assert all(isinstance(r, IdPRequest) and r.at >= before for r in records)


@pytest.mark.anyio
async def test_reset_counts_forgets_history(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """After reset_counts, nothing has been issued or received."""
    await request_token(session, idp)

    idp.reset_counts()

    assert idp.issued() == 0
    assert idp.requests == []


@pytest.mark.anyio
async def test_stats_endpoint_reports_counts(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """GET /_fake/stats reports tokens per client and requests received."""
    await request_token(session, idp)
    await request_token(session, idp, secret="wrong")

    async with session.get(f"{idp.url}/_fake/stats") as response:
        stats = orjson.loads(await response.read())

    assert stats == {"issued": {CLIENT_ID: 1}, "requests": 2}


# Latency


@pytest.mark.anyio
async def test_latency_does_not_serialise_requests(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """Twenty requests with 0.2 s latency each finish together, in under 1 s."""
    idp.latency = 0.2
    statuses: list[int] = []

    async def fetch() -> None:
        statuses.append((await request_token(session, idp)).status)

    started = time.monotonic()
    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(fetch)
    elapsed = time.monotonic() - started

    assert statuses == [200] * 20
    assert 0.2 <= elapsed < 1.0


@pytest.mark.anyio
async def test_latency_range_is_drawn_within_bounds(
    idp: FakeIdP, session: aiohttp.ClientSession
) -> None:
    """A (low, high) latency delays each answer by at least low seconds."""
    idp.latency = (0.1, 0.15)

    started = time.monotonic()
    reply = await request_token(session, idp)

    assert reply.status == 200
    assert time.monotonic() - started >= 0.1


# Running in a thread


def sync_token_status(idp: FakeIdP) -> int:
    """Ask `idp` for a token with the standard library's blocking HTTP client."""
    connection = http.client.HTTPConnection("127.0.0.1", idp.port, timeout=5)
    try:
        connection.request(
            "POST",
            urllib.parse.urlsplit(idp.token_url).path,
            body=urllib.parse.urlencode(READ_FORM),
            headers={
                **basic_raw(CLIENT_ID, CLIENT_SECRET),
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_running_in_thread_serves_synchronous_callers() -> None:
    """From sync code, the threaded IdP issues tokens and then frees its port."""
    idp = FakeIdP()
    idp.add_client(CLIENT_ID, CLIENT_SECRET)

    with idp.running_in_thread():
        port = idp.port
        status = sync_token_status(idp)

    assert status == 200
    assert idp.issued(CLIENT_ID) == 1
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()


def test_start_in_thread_and_stop_thread() -> None:
    """start_in_thread returns with the port bound; stop_thread stops serving."""
    idp = FakeIdP()
    idp.add_client(CLIENT_ID, CLIENT_SECRET)

    idp.start_in_thread()
    try:
        status = sync_token_status(idp)
    finally:
        idp.stop_thread()

    assert status == 200
    with pytest.raises(RuntimeError, match="not running"):
        _ = idp.port
