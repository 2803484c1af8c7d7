"""Validation of token endpoint answers: examples first, then properties."""

from __future__ import annotations

import base64
import email.utils
import math
import string
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfleet._errors import (
    InvalidClientError,
    InvalidScopeError,
    MalformedResponseError,
    TokenEndpointError,
    TokenFleetError,
)
from tokenfleet._models import TokenResponse
from tokenfleet._parse import (
    MAX_EXPIRES_IN,
    jwt_expiry,
    parse_token_success,
    retry_after_seconds,
    token_endpoint_error,
)

NOW = 1_700_000_000.0
DEFAULT_EXPIRES_IN = 300.0
JSON = "application/json"

# The characters RFC 6750 §2.1 allows in a bearer token, and then some: any
# visible ASCII character is accepted as an access token.
VISIBLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))


def _jwt(claims: object) -> str:
    def segment(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    header = segment(orjson.dumps({"alg": "RS256"}))
    return f"{header}.{segment(orjson.dumps(claims))}.c2lnbmF0dXJl"


def _success(document: dict[str, Any]) -> TokenResponse:
    return parse_token_success(
        orjson.dumps(document),
        status=200,
        content_type=JSON,
        now=NOW,
        default_expires_in=DEFAULT_EXPIRES_IN,
    )


# parse_token_success


def test_okta_answer_is_parsed() -> None:
    """A typical Okta answer gives its token, type, lifetime and scope."""
    token = _success(
        {
            "token_type": "Bearer",
            "expires_in": 3600,
            "access_token": "eyJ.abc.def",
            "scope": "submissions.read submissions.write",
        }
    )

    assert token == TokenResponse(
        access_token="eyJ.abc.def",
        token_type="Bearer",
        expires_in=3600.0,
        scope="submissions.read submissions.write",
    )


def test_token_type_is_case_insensitive_and_normalised() -> None:
    """``bearer`` in any case is accepted and reported as ``Bearer``."""
    token = _success({"access_token": "t", "token_type": "bEaReR", "expires_in": 60})

    assert token.token_type == "Bearer"


def test_unknown_fields_are_ignored() -> None:
    """Fields outside RFC 6749 §5.1 do not disturb parsing."""
    token = _success(
        {
            "access_token": "t",
            "token_type": "Bearer",
            "expires_in": 60,
            "refresh_token": None,
            "id_token": ["x"],
            "ext": {"nested": True},
        }
    )

    assert token.expires_in == 60.0


def test_non_string_scope_is_dropped() -> None:
    """A scope that is not a string is reported as absent."""
    token = _success(
        {"access_token": "t", "token_type": "Bearer", "expires_in": 60, "scope": 5}
    )

    assert token.scope is None


@pytest.mark.parametrize(
    ("raw", "expected"), [("120", 120.0), (" 90.5 ", 90.5), (45.25, 45.25)]
)
def test_expires_in_may_be_a_numeric_string(raw: object, expected: float) -> None:
    """``expires_in`` is read from a number or a numeric string."""
    token = _success({"access_token": "t", "token_type": "Bearer", "expires_in": raw})

    assert token.expires_in == expected


@pytest.mark.parametrize(
    "raw",
    [0, -5, "0", "-1", "soon", "nan", "inf", True, [60], {"s": 60}, MAX_EXPIRES_IN * 2],
)
def test_expires_in_that_is_not_positive_seconds_is_refused(raw: object) -> None:
    """A present ``expires_in`` must be a positive, finite, sane number."""
    with pytest.raises(MalformedResponseError, match="'expires_in'"):
        _success({"access_token": "t", "token_type": "Bearer", "expires_in": raw})


def test_missing_expires_in_falls_back_to_the_jwt_exp() -> None:
    """Without ``expires_in``, the JWT ``exp`` claim gives the lifetime."""
    access_token = _jwt({"exp": NOW + 1800, "sub": "c"})

    token = _success({"access_token": access_token, "token_type": "Bearer"})

    assert token.expires_in == 1800.0


def test_an_earlier_jwt_exp_shortens_expires_in() -> None:
    """A token whose ``exp`` comes before now + ``expires_in`` lives until ``exp``."""
    access_token = _jwt({"exp": NOW + 3599})

    token = _success(
        {"access_token": access_token, "token_type": "Bearer", "expires_in": 3600}
    )

    assert token.expires_in == 3599.0


@pytest.mark.parametrize("exp", [NOW + 7200, NOW - 10])
def test_a_later_or_past_jwt_exp_leaves_expires_in_alone(exp: float) -> None:
    """``exp`` never lengthens ``expires_in``, and a past ``exp`` (clock skew) is ignored."""
    access_token = _jwt({"exp": exp})

    token = _success(
        {"access_token": access_token, "token_type": "Bearer", "expires_in": 3600}
    )

    assert token.expires_in == 3600.0


def test_null_expires_in_counts_as_missing() -> None:
    """``"expires_in": null`` is treated like an absent field."""
    access_token = _jwt({"exp": NOW + 900})

    token = _success(
        {"access_token": access_token, "token_type": "Bearer", "expires_in": None}
    )

    assert token.expires_in == 900.0


def test_missing_expires_in_and_exp_uses_the_default() -> None:
    """An opaque token without ``expires_in`` lives the default lifetime."""
    token = _success({"access_token": "opaque-token", "token_type": "Bearer"})

    assert token.expires_in == DEFAULT_EXPIRES_IN


def test_exp_in_the_past_is_refused() -> None:
    """A JWT that has already expired is not accepted as a fresh token."""
    access_token = _jwt({"exp": NOW - 1})

    with pytest.raises(
        MalformedResponseError, match="'exp' claim is not in the future"
    ):
        _success({"access_token": access_token, "token_type": "Bearer"})


@pytest.mark.parametrize(
    "document",
    [
        {"token_type": "Bearer", "expires_in": 60},
        {"access_token": "", "token_type": "Bearer", "expires_in": 60},
        {"access_token": 12345, "token_type": "Bearer", "expires_in": 60},
        {"access_token": None, "token_type": "Bearer", "expires_in": 60},
    ],
)
def test_missing_or_non_string_access_token_is_refused(
    document: dict[str, Any],
) -> None:
    """``access_token`` must be a non-empty string."""
    with pytest.raises(MalformedResponseError, match="'access_token'"):
        _success(document)


@pytest.mark.parametrize("access_token", ["two words", "line\nbreak", "tab\t", "é"])
def test_access_token_with_header_breaking_characters_is_refused(
    access_token: str,
) -> None:
    """Spaces, control and non-ASCII characters cannot go into a header."""
    with pytest.raises(MalformedResponseError, match="not allowed in an HTTP header"):
        _success(
            {"access_token": access_token, "token_type": "Bearer", "expires_in": 60}
        )


def test_other_token_types_are_refused_by_name() -> None:
    """A token type other than Bearer is named in the error."""
    with pytest.raises(MalformedResponseError, match="token type 'mac'"):
        _success({"access_token": "t", "token_type": "mac", "expires_in": 60})


def test_non_string_token_type_is_described_by_its_type() -> None:
    """A token type that is not a string is named by its JSON type only."""
    with pytest.raises(MalformedResponseError, match="token type 'list'"):
        _success({"access_token": "t", "token_type": ["Bearer"], "expires_in": 60})


def test_non_json_body_names_status_and_content_type_only() -> None:
    """A body that is not JSON is described without being quoted."""
    body = b"<html>token=leaked-value</html>"

    with pytest.raises(MalformedResponseError) as caught:
        parse_token_success(
            body,
            status=200,
            content_type="text/html",
            now=NOW,
            default_expires_in=DEFAULT_EXPIRES_IN,
        )

    message = str(caught.value)
    assert "HTTP 200" in message
    assert "'text/html'" in message
    assert "leaked-value" not in message


@pytest.mark.parametrize("body", [b"[]", b'"token"', b"42", b"null"])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    """Only a JSON object can be a token response."""
    with pytest.raises(MalformedResponseError, match="not an object"):
        parse_token_success(
            body,
            status=200,
            content_type=JSON,
            now=NOW,
            default_expires_in=DEFAULT_EXPIRES_IN,
        )


def test_missing_content_type_is_described_as_none() -> None:
    """An answer without a content type says so in the error."""
    with pytest.raises(MalformedResponseError, match="content type 'none'"):
        parse_token_success(
            b"not json",
            status=200,
            content_type=None,
            now=NOW,
            default_expires_in=DEFAULT_EXPIRES_IN,
        )


# token_endpoint_error


def _error(document: object, status: int = 400) -> TokenFleetError:
    return token_endpoint_error(
        orjson.dumps(document), status=status, content_type=JSON
    )


def test_invalid_client_becomes_invalid_client_error() -> None:
    """``invalid_client`` maps to InvalidClientError with its details."""
    error = _error(
        {"error": "invalid_client", "error_description": "Bad secret."}, status=401
    )

    assert isinstance(error, InvalidClientError)
    assert error.error == "invalid_client"
    assert error.error_description == "Bad secret."
    assert error.status == 401
    assert "Bad secret." in str(error)


def test_invalid_scope_becomes_invalid_scope_error() -> None:
    """``invalid_scope`` maps to InvalidScopeError."""
    error = _error({"error": "invalid_scope", "error_description": "No such scope."})

    assert isinstance(error, InvalidScopeError)
    assert error.error == "invalid_scope"
    assert error.status == 400


@pytest.mark.parametrize(
    "code",
    ["invalid_request", "unauthorized_client", "unsupported_grant_type", "x_custom"],
)
def test_other_errors_become_token_endpoint_error(code: str) -> None:
    """Any other RFC 6749 §5.2 code is a plain TokenEndpointError."""
    error = _error({"error": code, "error_description": "Details."}, status=403)

    assert type(error) is TokenEndpointError
    assert error.error == code
    assert error.error_description == "Details."
    assert error.status == 403
    assert repr(code) in str(error)


def test_error_without_description_keeps_none() -> None:
    """An error document without a description reports None."""
    error = _error({"error": "invalid_request"})

    assert isinstance(error, TokenEndpointError)
    assert error.error_description is None


def test_error_description_is_cleaned_and_shortened() -> None:
    """Control characters become spaces and long descriptions are cut."""
    error = _error(
        {"error": "invalid_request", "error_description": "a\nb" + "c" * 999}
    )

    assert isinstance(error, TokenEndpointError)
    assert error.error_description is not None
    assert error.error_description.startswith("a b")
    assert len(error.error_description) == 300
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    "document",
    [
        {"errorCode": "E0000047", "errorSummary": "Rate limit."},
        {"error": ""},
        {"error": 7},
    ],
)
def test_document_without_error_code_is_malformed(document: object) -> None:
    """A 4xx JSON body without an RFC 6749 error code is malformed."""
    error = _error(document)

    assert isinstance(error, MalformedResponseError)
    assert "'error' code" in str(error)


def test_non_json_error_body_is_malformed_and_not_quoted() -> None:
    """A non-JSON 4xx body is described by status and content type only."""
    error = token_endpoint_error(
        b"Forbidden: secret-looking-text", status=403, content_type="text/plain"
    )

    assert isinstance(error, MalformedResponseError)
    assert "HTTP 403" in str(error)
    assert "'text/plain'" in str(error)
    assert "secret-looking-text" not in str(error)


# retry_after_seconds


def test_retry_after_seconds_is_read() -> None:
    """``Retry-After: 7`` asks for seven seconds."""
    assert retry_after_seconds({"Retry-After": " 7 "}, now=NOW) == 7.0


def test_retry_after_http_date_is_read() -> None:
    """``Retry-After`` as an HTTP date is measured from *now*."""
    header = email.utils.formatdate(NOW + 42, usegmt=True)

    assert retry_after_seconds({"Retry-After": header}, now=NOW) == 42.0


def test_retry_after_date_in_the_past_means_no_wait() -> None:
    """A date already gone asks for zero seconds."""
    header = email.utils.formatdate(NOW - 600, usegmt=True)

    assert retry_after_seconds({"Retry-After": header}, now=NOW) == 0.0


def test_okta_reset_header_is_read() -> None:
    """``X-Rate-Limit-Reset`` (Unix seconds) gives the wait until the reset."""
    headers = {"X-Rate-Limit-Reset": str(int(NOW + 13))}

    assert retry_after_seconds(headers, now=NOW) == 13.0


def test_longer_of_both_hints_wins() -> None:
    """With both headers present, the longer wait is taken."""
    headers = {"Retry-After": "5", "X-Rate-Limit-Reset": str(int(NOW + 20))}

    assert retry_after_seconds(headers, now=NOW) == 20.0


def test_negative_hint_is_clamped_to_zero() -> None:
    """A negative wait means no wait at all."""
    assert retry_after_seconds({"Retry-After": "-3"}, now=NOW) == 0.0


def test_enormous_hint_is_capped() -> None:
    """A wait beyond any token lifetime is capped."""
    assert retry_after_seconds({"Retry-After": "1e300"}, now=NOW) == MAX_EXPIRES_IN


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Retry-After": "soon"},
        {"Retry-After": "nan"},
        {"X-Rate-Limit-Reset": "later"},
        {"X-Rate-Limit-Reset": "inf"},
        {"Retry-After": "Wed, 21 Oct 2015 07:28:00 -0000"},
    ],
)
def test_missing_or_unreadable_hints_give_none(headers: dict[str, str]) -> None:
    """Without a readable hint there is no wait to honour."""
    assert retry_after_seconds(headers, now=NOW) is None


# jwt_expiry


def test_jwt_expiry_reads_exp() -> None:
    """The ``exp`` claim of a JWT is returned as a float."""
    assert jwt_expiry(_jwt({"exp": 1_700_003_600})) == 1_700_003_600.0


@pytest.mark.parametrize(
    "access_token",
    [
        "opaque",
        "a.b",
        "a.b.c.d",
        "a.!!!.c",
        "a.bm90IGpzb24.c",
        _jwt([1, 2]),
        _jwt({"sub": "c"}),
        _jwt({"exp": "1700000000"}),
        _jwt({"exp": True}),
        "a.é.c",
    ],
)
def test_jwt_expiry_is_none_without_a_numeric_exp(access_token: str) -> None:
    """Anything but a JWT with a numeric ``exp`` gives None."""
    assert jwt_expiry(access_token) is None


# Properties: no input makes the parser raise anything but TokenFleetError.

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_NUMERIC_STRINGS = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats().map(repr),
    st.sampled_from(["nan", "inf", "-inf", " 60 ", "1_000", "0x10", "1e999"]),
)
_JWTS = st.dictionaries(
    st.sampled_from(["exp", "iat", "sub"]), _JSON_VALUES, max_size=3
).map(_jwt)

_TOKEN_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "access_token": _JSON_VALUES | _JWTS | st.text(VISIBLE_ASCII, min_size=1),
        "token_type": _JSON_VALUES | st.sampled_from(["Bearer", "bearer", "mac"]),
        "expires_in": _JSON_VALUES | _NUMERIC_STRINGS,
        "scope": _JSON_VALUES,
        "error": _JSON_VALUES | st.sampled_from(["invalid_client", "invalid_scope"]),
        "error_description": _JSON_VALUES,
    },
)


def _dump(document: object) -> bytes:
    # orjson writes NaN and infinities as null, which is still JSON.
    return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)


@given(
    body=st.binary() | _TOKEN_DOCUMENTS.map(_dump),
    status=st.integers(min_value=100, max_value=599),
    content_type=st.none() | st.text(max_size=40),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_parse_token_success_raises_only_tokenfleet_errors(
    body: bytes, status: int, content_type: str | None, now: float
) -> None:
    """Whatever the body, parsing succeeds or raises a TokenFleetError."""
    try:
        token = parse_token_success(
            body,
            status=status,
            content_type=content_type,
            now=now,
            default_expires_in=DEFAULT_EXPIRES_IN,
        )
    except TokenFleetError:
        return

    assert token.token_type == "Bearer"
    assert 0 < token.expires_in <= MAX_EXPIRES_IN


@given(
    body=st.binary() | _TOKEN_DOCUMENTS.map(_dump) | _JSON_VALUES.map(_dump),
    status=st.integers(min_value=400, max_value=499),
    content_type=st.none() | st.text(max_size=40),
)
def test_token_endpoint_error_always_returns_an_error(
    body: bytes, status: int, content_type: str | None
) -> None:
    """Whatever the body, an error object is returned and nothing is raised."""
    error = token_endpoint_error(body, status=status, content_type=content_type)

    assert isinstance(error, TokenEndpointError | MalformedResponseError)
    assert f"HTTP {status}" in str(error)


_HEADER_NAMES = st.sampled_from(["Retry-After", "X-Rate-Limit-Reset", "Date"])
_HEADER_VALUES = (
    st.text(max_size=40)
    | _NUMERIC_STRINGS
    | st.floats(min_value=-2e10, max_value=2.5e11).map(
        lambda when: email.utils.formatdate(when, usegmt=True)
    )
    | st.builds(
        "{}, {:02d} {} {} {:02d}:{:02d}:{:02d} {}".format,
        st.sampled_from(["Mon", "Xyz", ""]),
        st.integers(min_value=-5, max_value=99),
        st.sampled_from(["Jan", "Feb", "Foo"]),
        st.integers(min_value=-10, max_value=99999),
        st.integers(min_value=0, max_value=99),
        st.integers(min_value=0, max_value=99),
        st.integers(min_value=0, max_value=99),
        st.sampled_from(["GMT", "+9999", "-0000", "UT", "EST", ""]),
    )
)


@given(
    headers=st.dictionaries(_HEADER_NAMES, _HEADER_VALUES),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_retry_after_seconds_returns_none_or_a_sane_wait(
    headers: dict[str, str], now: float
) -> None:
    """Any header values give None or a wait between zero and the cap."""
    wait = retry_after_seconds(headers, now=now)

    assert wait is None or 0.0 <= wait <= MAX_EXPIRES_IN


@given(access_token=st.text() | _JWTS | st.binary().map(lambda raw: f"a.{raw!r}.c"))
def test_jwt_expiry_returns_none_or_a_finite_number(access_token: str) -> None:
    """Any string gives None or a finite ``exp``."""
    exp = jwt_expiry(access_token)

    assert exp is None or math.isfinite(exp)


# Properties: valid answers always parse.

_BEARER = st.sampled_from(["Bearer", "bearer", "BEARER", "bEARER"])
_LIFETIMES = st.floats(min_value=1e-3, max_value=MAX_EXPIRES_IN) | st.integers(
    min_value=1, max_value=int(MAX_EXPIRES_IN)
)


@given(
    access_token=st.text(VISIBLE_ASCII, min_size=1, max_size=2000),
    token_type=_BEARER,
    lifetime=_LIFETIMES,
    as_string=st.booleans(),
    scope=st.none() | st.text(string.ascii_lowercase + ". ", max_size=60),
    extra=st.dictionaries(
        st.text(max_size=10).filter(
            lambda key: key not in {"access_token", "token_type", "expires_in", "scope"}
        ),
        _JSON_VALUES,
        max_size=3,
    ),
)
def test_valid_answers_always_parse(
    access_token: str,
    token_type: str,
    lifetime: float,
    as_string: bool,
    scope: str | None,
    extra: dict[str, Any],
) -> None:
    """A well-formed §5.1 answer parses to exactly what it says."""
    document: dict[str, Any] = {
        **extra,
        "access_token": access_token,
        "token_type": token_type,
        "expires_in": repr(lifetime) if as_string else lifetime,
    }
    if scope is not None:
        document["scope"] = scope

    token = _success(document)

    assert token.access_token == access_token
    assert token.token_type == "Bearer"
    assert token.expires_in == float(lifetime)
    assert token.scope == scope


@given(
    access_token=st.text(VISIBLE_ASCII, min_size=1, max_size=500),
    token_type=_BEARER,
    lifetime=st.integers(min_value=1, max_value=int(MAX_EXPIRES_IN)),
)
def test_jwt_without_expires_in_always_parses(
    access_token: str, token_type: str, lifetime: int
) -> None:
    """A JWT with a future ``exp`` and no ``expires_in`` lives until ``exp``."""
    jwt = _jwt({"exp": int(NOW) + lifetime, "sub": access_token})

    token = _success({"access_token": jwt, "token_type": token_type})

    assert token.expires_in == float(lifetime)


# Properties: no message ever quotes the access token.

# Long enough that finding it in a message cannot be a coincidence.
_MARKED_TOKENS = st.text(VISIBLE_ASCII, min_size=12, max_size=60).map(
    lambda tail: f"tok-{tail}"
) | st.text(min_size=12, max_size=60).map(lambda tail: f"tok-{tail}")
_DOCUMENTS_WITHOUT_TOKEN = _TOKEN_DOCUMENTS.map(
    lambda document: {k: v for k, v in document.items() if k != "access_token"}
)


@given(
    access_token=_MARKED_TOKENS | _MARKED_TOKENS.map(lambda t: _jwt({"sub": t})),
    rest=_DOCUMENTS_WITHOUT_TOKEN,
    status=st.integers(min_value=200, max_value=499),
    content_type=st.none() | st.text(max_size=40),
)
def test_no_error_message_contains_the_access_token(
    access_token: str, rest: dict[str, Any], status: int, content_type: str | None
) -> None:
    """Neither parser quotes the access token of the body it refuses."""
    body = _dump({**rest, "access_token": access_token})

    errors: list[BaseException] = [
        token_endpoint_error(body, status=status, content_type=content_type)
    ]
    try:
        parse_token_success(
            body,
            status=status,
            content_type=content_type,
            now=NOW,
            default_expires_in=DEFAULT_EXPIRES_IN,
        )
    except TokenFleetError as exc:
        errors.append(exc)

    for error in errors:
        assert access_token not in str(error)
        assert access_token not in repr(error)
        assert access_token not in repr(vars(error))
