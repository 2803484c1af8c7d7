"""The ``tokenfleet`` command, in-process and as real subprocesses."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tokenfleet._cli import main
from tokenfleet._parse import jwt_expiry
from tokenfleet._regions import REGIONS
from tokenfleet.testing._fake_idp import FakeIdP, ScriptedFailure

CLIENT_ID = "cli-client"
CLIENT_SECRET = "cli-sEcReT-3e9d-never-printed"
ENV_NAMES = (
    "TOKENFLEET_CLIENT_ID",
    "TOKENFLEET_CLIENT_SECRET",
    "TOKENFLEET_TOKEN_URL",
    "TOKENFLEET_STAGE",
    "TOKENFLEET_CELL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's TOKENFLEET_* variables out of every test."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    """A fake IdP on its own thread, so main() can run its own event loop."""
    fake = FakeIdP()
    fake.add_client(CLIENT_ID, CLIENT_SECRET)
    with fake.running_in_thread():
        yield fake


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch, idp: FakeIdP) -> FakeIdP:
    """The environment of a user who pasted the fake IdP's export lines."""
    monkeypatch.setenv("TOKENFLEET_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("TOKENFLEET_TOKEN_URL", idp.token_url)
    return idp


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# tokenfleet regions


def test_regions_lists_every_token_url(capsys: pytest.CaptureFixture[str]) -> None:
    """The table names every stage, cell and token URL."""
    status, out, _ = _run(capsys, "regions")

    assert status == 0
    for region in REGIONS:
        assert region.token_url in out
        assert region.api_base_url in out
        assert region.aws_region in out


def test_regions_table_is_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    """Every token URL starts in the same column as its header."""
    _, out, _ = _run(capsys, "regions")

    header, *rows = out.splitlines()
    column = header.index("TOKEN URL")
    assert len(rows) == len(REGIONS)
    for row, region in zip(rows, REGIONS, strict=True):
        assert row.index(region.token_url) == column


def test_regions_json_describes_every_region(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--json`` prints one object per region with all five fields."""
    status, out, _ = _run(capsys, "regions", "--json")

    assert status == 0
    assert orjson.loads(out) == [
        {
            "stage": region.stage,
            "cell": region.cell,
            "aws_region": region.aws_region,
            "token_url": region.token_url,
            "api_base_url": region.api_base_url,
        }
        for region in REGIONS
    ]


# Usage


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a subcommand, the usage is shown and the status is 2."""
    status, _, err = _run(capsys)

    assert status == 2
    assert "usage: tokenfleet" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` lists the subcommands and succeeds."""
    status, out, _ = _run(capsys, "--help")

    assert status == 0
    for command in ("regions", "fake-idp", "token"):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        ("fake-idp", "--port", "http"),
        ("fake-idp", "--port", "70000"),
        ("fake-idp", "--latency", "-1"),
        ("fake-idp", "--expires-in", "0"),
        ("token", "--basic-auth", "base64"),
    ],
)
def test_bad_option_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    """An option value of the wrong shape exits 2 and names the value."""
    status, _, err = _run(capsys, *argv)

    assert status == 2
    assert repr(argv[-1]) in err or argv[-1] in err


def test_fake_idp_refuses_a_non_loopback_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The fake IdP never listens beyond loopback."""
    status, out, err = _run(capsys, "fake-idp", "--host", "0.0.0.0")

    assert status == 2
    assert out == ""
    assert "'0.0.0.0'" in err
    assert "loopback" in err


# tokenfleet token, in-process


def _token_output(out: str) -> dict[str, Any]:
    shown = orjson.loads(out)
    assert isinstance(shown, dict)
    return shown


def test_token_is_fetched_and_masked(
    capsys: pytest.CaptureFixture[str], credentials: FakeIdP
) -> None:
    """By default the token is printed as six characters and its length."""
    status, out, err = _run(capsys, "token")

    assert status == 0
    assert err == ""
    shown = _token_output(out)
    assert set(shown) == {
        "token_type",
        "expires_in",
        "expires_at",
        "scopes",
        "access_token",
    }
    prefix, _, length = shown["access_token"].partition("…")
    assert len(prefix) == 6
    assert length.startswith("(")
    assert "." not in shown["access_token"]
    assert credentials.issued(CLIENT_ID) == 1


def test_show_token_prints_the_whole_token(
    capsys: pytest.CaptureFixture[str], credentials: FakeIdP
) -> None:
    """``--show-token`` prints the usable JWT, whose exp matches expires_at."""
    status, out, _ = _run(capsys, "token", "--show-token")

    shown = _token_output(out)
    assert status == 0
    exp = jwt_expiry(shown["access_token"])
    assert exp is not None
    assert abs(exp - shown["expires_at"]) <= 2.0


@pytest.mark.parametrize(
    ("access_token", "masked"),
    [
        ("opaque-token-0123456789", "opaque…(23 chars)"),
        ("short-token", "…(11 chars)"),
    ],
)
def test_mask_shows_six_characters_and_the_length(
    capsys: pytest.CaptureFixture[str],
    credentials: FakeIdP,
    access_token: str,
    masked: str,
) -> None:
    """The mask keeps six characters, or none of a short token, and the length."""
    body = orjson.dumps(
        {"access_token": access_token, "token_type": "Bearer", "expires_in": 60}
    )
    credentials.fail_next(ScriptedFailure(status=200, body=body))

    _, out, _ = _run(capsys, "token")

    assert _token_output(out)["access_token"] == masked


def test_token_reports_lifetime_and_sorted_scopes(
    capsys: pytest.CaptureFixture[str], credentials: FakeIdP
) -> None:
    """The output carries the type, lifetime, expiry time and scopes."""
    before = time.time()

    _, out, _ = _run(capsys, "token", "--scopes", "submissions.write submissions.read")

    shown = _token_output(out)
    assert shown["token_type"] == "Bearer"
    # The fake IdP, like Okta, truncates the JWT exp to whole seconds, and
    # the parser believes the earlier of exp and expires_in.
    assert 3599.0 <= shown["expires_in"] <= 3600.0
    assert before + 3599.0 <= shown["expires_at"] <= time.time() + 3600.0
    assert shown["scopes"] == ["submissions.read", "submissions.write"]
    assert credentials.requests[0].scopes == ("submissions.read", "submissions.write")


def test_raw_basic_auth_is_used_when_asked(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    credentials: FakeIdP,
) -> None:
    """``--basic-auth raw`` sends a secret with ':' and '%' unencoded."""
    credentials.add_client("raw-client", "se:cr%et")
    monkeypatch.setenv("TOKENFLEET_CLIENT_ID", "raw-client")
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", "se:cr%et")

    status, _, _ = _run(capsys, "token", "--basic-auth", "raw")

    assert status == 0
    assert credentials.issued("raw-client") == 1


def test_token_url_flag_beats_the_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    credentials: FakeIdP,
) -> None:
    """``--token-url`` is used even when TOKENFLEET_TOKEN_URL says otherwise."""
    monkeypatch.setenv("TOKENFLEET_TOKEN_URL", "http://127.0.0.1:9/nowhere")

    status, _, _ = _run(capsys, "token", "--token-url", credentials.token_url)

    assert status == 0
    assert credentials.issued(CLIENT_ID) == 1


@pytest.mark.parametrize("name", ["TOKENFLEET_CLIENT_ID", "TOKENFLEET_CLIENT_SECRET"])
def test_missing_credentials_name_the_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    credentials: FakeIdP,
    name: str,
) -> None:
    """An unset credential variable is named on one line, exit 1, no request."""
    monkeypatch.delenv(name)

    status, out, err = _run(capsys, "token")

    assert status == 1
    assert out == ""
    assert name in err
    assert err.count("\n") == 1
    assert credentials.requests == []


def test_missing_token_endpoint_names_the_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a URL or a region, the error says how to give one."""
    monkeypatch.setenv("TOKENFLEET_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", CLIENT_SECRET)

    status, _, err = _run(capsys, "token")

    assert status == 1
    assert "--token-url" in err
    assert "TOKENFLEET_TOKEN_URL" in err


def test_stage_without_cell_names_the_cell_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage alone is not enough: the cell's option and variable are named."""
    monkeypatch.setenv("TOKENFLEET_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("TOKENFLEET_STAGE", "prod")

    status, _, err = _run(capsys, "token")

    assert status == 1
    assert "--cell" in err
    assert "TOKENFLEET_CELL" in err


def test_unknown_region_is_reported_before_any_request(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown stage and cell pair exits 1 listing the valid ones."""
    monkeypatch.setenv("TOKENFLEET_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", CLIENT_SECRET)

    status, _, err = _run(capsys, "token", "--stage", "prod", "--cell", "mars-1")

    assert status == 1
    assert "'mars-1'" in err
    assert "prod/eu-1" in err


def test_token_url_and_region_together_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], credentials: FakeIdP
) -> None:
    """``--token-url`` with ``--stage`` is contradictory: exit 2."""
    status, _, err = _run(
        capsys, "token", "--token-url", credentials.token_url, "--stage", "prod"
    )

    assert status == 2
    assert "--token-url" in err
    assert credentials.requests == []


def test_plain_http_to_a_remote_host_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secret is not sent over http to a host that is not loopback."""
    monkeypatch.setenv("TOKENFLEET_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", CLIENT_SECRET)

    status, _, err = _run(
        capsys, "token", "--token-url", "http://example.invalid/oauth2/a/v1/token"
    )

    assert status == 1
    assert "plain http" in err


def test_invalid_client_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    credentials: FakeIdP,
) -> None:
    """A rejected secret prints the IdP's verdict on one line, never the secret."""
    monkeypatch.setenv("TOKENFLEET_CLIENT_SECRET", "wrong-" + CLIENT_SECRET)

    status, out, err = _run(capsys, "token")

    assert status == 1
    assert out == ""
    assert err.startswith("tokenfleet: ")
    assert err.count("\n") == 1
    assert "invalid_client" in err
    assert CLIENT_SECRET not in err


# tokenfleet fake-idp, as a real process serving tokenfleet token


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _cli_process(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenfleet", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )


def _read_exports(process: subprocess.Popen[str]) -> dict[str, str]:
    """Read the announcement up to its three export lines and parse them."""
    assert process.stdout is not None
    exports: dict[str, str] = {}
    while len(exports) < 3:
        line = process.stdout.readline()
        if not line:
            _, err = process.communicate(timeout=5)
            pytest.fail(f"fake-idp ended before announcing itself: {err}")
        if line.startswith("export "):
            name, _, value = shlex.split(line)[1].partition("=")
            exports[name] = value
    return exports


def _stop(process: subprocess.Popen[str], signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, err


def _token_process(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenfleet", "token", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=30,
        check=False,
    )


@pytest.fixture
def demo_idp() -> Iterator[subprocess.Popen[str]]:
    """``tokenfleet fake-idp`` with its defaults, on a free port."""
    process = _cli_process("fake-idp", "--port", str(_free_port()))
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_fake_idp_process_serves_the_token_command(
    demo_idp: subprocess.Popen[str],
) -> None:
    """The printed export lines are all ``tokenfleet token`` needs."""
    exports = _read_exports(demo_idp)

    fetched = _token_process(exports)

    assert fetched.returncode == 0, fetched.stderr
    assert orjson.loads(fetched.stdout)["token_type"] == "Bearer"
    assert exports["TOKENFLEET_CLIENT_ID"] == "demo-client"
    assert len(exports["TOKENFLEET_CLIENT_SECRET"]) >= 24
    base_url = exports["TOKENFLEET_TOKEN_URL"].split("/oauth2/")[0]
    # The URL is the loopback address of the fake started above.
    with urllib.request.urlopen(f"{base_url}/_fake/stats", timeout=5) as answer:  # noqa: S310
        assert orjson.loads(answer.read())["issued"] == {"demo-client": 1}


def test_fake_idp_process_stops_cleanly_on_sigterm(
    demo_idp: subprocess.Popen[str],
) -> None:
    """SIGTERM stops the fake IdP with exit status 0."""
    _read_exports(demo_idp)

    status, err = _stop(demo_idp, signal.SIGTERM)

    assert status == 0
    assert "stopped" in err


def test_fake_idp_process_stops_cleanly_on_ctrl_c(
    demo_idp: subprocess.Popen[str],
) -> None:
    """Ctrl-C (SIGINT) stops the fake IdP with exit status 0 and no traceback."""
    _read_exports(demo_idp)

    status, err = _stop(demo_idp, signal.SIGINT)

    assert status == 0
    assert "Traceback" not in err


def test_fake_idp_process_honours_client_options() -> None:
    """Client id, secret, scopes and lifetime options reach the fake."""
    process = _cli_process(
        "fake-idp",
        "--port",
        "0",
        "--client-id",
        "my client",
        "--client-secret",
        "my:secret",
        "--scopes",
        "reports.read",
        "--expires-in",
        "120",
    )
    try:
        exports = _read_exports(process)
        fetched = _token_process(exports, "--scopes", "reports.read")
        refused = _token_process(exports)
    finally:
        status, _ = _stop(process, signal.SIGTERM)

    assert exports["TOKENFLEET_CLIENT_ID"] == "my client"
    assert exports["TOKENFLEET_CLIENT_SECRET"] == "my:secret"
    assert fetched.returncode == 0, fetched.stderr
    assert 119.0 <= orjson.loads(fetched.stdout)["expires_in"] <= 120.0
    assert refused.returncode == 1
    assert "invalid_scope" in refused.stderr
    assert status == 0


def test_fake_idp_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    """A port already taken is reported on one line with exit status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        status, _, err = _run(capsys, "fake-idp", "--port", str(port))

    assert status == 1
    assert str(port) in err
    assert err.count("\n") == 1


def test_regions_into_a_closed_pipe_exits_quietly() -> None:
    """A reader that goes away (``| head``) ends the command without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "tokenfleet", "regions"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)

    assert finished.returncode == 1
    assert b"Traceback" not in finished.stderr
    assert finished.stderr == b""
