"""The ``tokenfleet`` command.

``tokenfleet regions`` lists the known stages and cells, ``tokenfleet
fake-idp`` runs the fake IdP on a loopback port until stopped, and
``tokenfleet token`` fetches one token with the credentials found in the
environment, and ``tokenfleet demo`` runs a fleet of processes sharing
tokens through Redis.

Each subcommand is one ``_add_<name>`` function that registers its parser
and sets ``run`` to the function carrying it out; `SUBCOMMANDS` lists them in
the order ``--help`` shows them.  A ``run`` function takes the parsed
arguments and returns the exit status: 0 on success, 1 when the work failed,
2 for usage errors.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO, TypeAlias

import anyio
import orjson

from ._demo import add_demo_arguments, run_demo
from ._endpoint import BasicAuthEncoding, TokenEndpointClient, _is_loopback
from ._errors import TokenFleetError
from ._models import ClientCredentials, TokenResponse, normalize_scopes
from ._regions import REGIONS, resolve_region
from .testing._fake_idp import FakeIdP

if TYPE_CHECKING:
    # argparse's subparsers object is generic only in typeshed.
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

ENV_CLIENT_ID = "TOKENFLEET_CLIENT_ID"
ENV_CLIENT_SECRET = "TOKENFLEET_CLIENT_SECRET"
ENV_TOKEN_URL = "TOKENFLEET_TOKEN_URL"
ENV_STAGE = "TOKENFLEET_STAGE"
ENV_CELL = "TOKENFLEET_CELL"

DEFAULT_SCOPES = "submissions.read submissions.write"
DEMO_CLIENT_ID = "demo-client"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Run = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A failure to report on one line of stderr, with the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def _fail(message: str, status: int) -> int:
    # One line per failure, whatever the message holds, so that scripts can
    # read it and people can grep it.
    print(f"tokenfleet: {' '.join(message.split())}", file=sys.stderr)
    return status


# Argument types


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        msg = f"{text!r} is not a port number between 0 and 65535"
        raise argparse.ArgumentTypeError(msg)
    return port


def _seconds(*, positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
            kind = "positive" if positive else "non-negative"
            msg = f"{text!r} is not a {kind} number of seconds"
            raise argparse.ArgumentTypeError(msg)
        return seconds

    return parse


# tokenfleet regions


def _add_regions(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "regions",
        help="list the stages and cells with their token and API URLs",
        description="List the Resistant Documents stages and cells, each with "
        "its AWS region, token URL and API base URL.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead")
    parser.set_defaults(run=_run_regions)


def _run_regions(args: argparse.Namespace) -> int:
    rows = [
        {
            "stage": region.stage,
            "cell": region.cell,
            "aws_region": region.aws_region,
            "token_url": region.token_url,
            "api_base_url": region.api_base_url,
        }
        for region in REGIONS
    ]

    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        header = {
            "stage": "STAGE",
            "cell": "CELL",
            "aws_region": "AWS REGION",
            "token_url": "TOKEN URL",
            "api_base_url": "API BASE URL",
        }
        _print_table([header, *rows], sys.stdout)

    return EXIT_OK


def _print_table(rows: list[dict[str, str]], out: TextIO) -> None:
    widths = {key: max(len(row[key]) for row in rows) for key in rows[0]}
    for row in rows:
        line = "  ".join(row[key].ljust(width) for key, width in widths.items())
        print(line.rstrip(), file=out)


# tokenfleet fake-idp


def _add_fake_idp(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "fake-idp",
        help="run an Okta-like fake token endpoint on a loopback port",
        description="Run the fake IdP of tokenfleet.testing until Ctrl-C or "
        "SIGTERM, with one registered client: 'demo-client' with a random "
        "secret unless --client-id and --client-secret say otherwise.  The "
        "credentials and the token URL are printed as export lines ready to "
        "paste into a shell.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="loopback address to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--port", type=_port, default=0, help="port to listen on (default: any free)"
    )
    parser.add_argument(
        "--client-id",
        default=DEMO_CLIENT_ID,
        help="client id to register (default: %(default)s)",
    )
    parser.add_argument(
        "--client-secret", help="secret of that client (default: a random one)"
    )
    parser.add_argument(
        "--scopes",
        default=DEFAULT_SCOPES,
        help="space-separated scopes the client may ask for (default: %(default)r)",
    )
    parser.add_argument(
        "--expires-in",
        type=_seconds(positive=True),
        default=3600.0,
        help="token lifetime in seconds (default: 3600)",
    )
    parser.add_argument(
        "--latency",
        type=_seconds(positive=False),
        default=0.0,
        help="seconds to wait before each answer (default: 0)",
    )
    parser.set_defaults(run=_run_fake_idp)


def _run_fake_idp(args: argparse.Namespace) -> int:
    if not _is_loopback(args.host):
        msg = (
            f"The fake IdP only listens on loopback addresses, not {args.host!r}: "
            "it hands out tokens over plain http. Use 127.0.0.1."
        )
        raise CommandError(msg, EXIT_USAGE)
    # "localhost" may resolve to both 127.0.0.1 and ::1, and with --port 0
    # each would get a port of its own; one address keeps one URL.
    host = "127.0.0.1" if args.host == "localhost" else args.host

    idp = FakeIdP(
        host=host,
        port=args.port,
        expires_in=args.expires_in,
        latency=args.latency,
    )
    secret = args.client_secret or secrets.token_urlsafe(24)
    idp.add_client(args.client_id, secret, scopes=normalize_scopes(args.scopes))

    try:
        anyio.run(_serve_until_stopped, idp, args.client_id, secret)
    except OSError as exc:
        msg = f"The fake IdP cannot listen on {host} port {args.port}: {exc.strerror or exc}."
        raise CommandError(msg) from exc

    print(f"Fake IdP stopped after issuing {idp.issued()} tokens.", file=sys.stderr)
    return EXIT_OK


async def _serve_until_stopped(idp: FakeIdP, client_id: str, secret: str) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with idp:
            _announce(idp.url, idp.token_url, client_id, secret)
            async for _signum in signals:
                break


def _announce(url: str, token_url: str, client_id: str, secret: str) -> None:
    # The secret is printed on purpose: it belongs to the user's own fake.
    lines = [
        f"Fake IdP listening at {url} (Ctrl-C to stop)",
        f"client id:     {client_id}",
        f"client secret: {secret}",
        f"token URL:     {token_url}",
        "",
        f"export {ENV_CLIENT_ID}={shlex.quote(client_id)}",
        f"export {ENV_CLIENT_SECRET}={shlex.quote(secret)}",
        f"export {ENV_TOKEN_URL}={shlex.quote(token_url)}",
    ]
    print("\n".join(lines), flush=True)


# tokenfleet token


def _add_token(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "token",
        help="fetch one access token with the credentials in the environment",
        description=f"Fetch one access token for the client in {ENV_CLIENT_ID} "
        f"and {ENV_CLIENT_SECRET}.  The token endpoint is --token-url, or the "
        f"one of --stage and --cell; {ENV_TOKEN_URL}, {ENV_STAGE} and "
        f"{ENV_CELL} are the defaults.  The token is masked unless "
        "--show-token is given.",
    )
    parser.add_argument("--stage", help=f"stage, for example prod (env {ENV_STAGE})")
    parser.add_argument("--cell", help=f"cell, for example eu-1 (env {ENV_CELL})")
    parser.add_argument("--token-url", help=f"token endpoint URL (env {ENV_TOKEN_URL})")
    parser.add_argument(
        "--scopes",
        default=DEFAULT_SCOPES,
        help="space-separated scopes to request (default: %(default)r)",
    )
    parser.add_argument(
        "--show-token", action="store_true", help="print the whole access token"
    )
    parser.add_argument(
        "--basic-auth",
        choices=("rfc6749", "raw"),
        default="rfc6749",
        help="how id and secret are encoded in HTTP Basic (default: %(default)s)",
    )
    parser.set_defaults(run=_run_token)


def _run_token(args: argparse.Namespace) -> int:
    if args.token_url and (args.stage or args.cell):
        msg = "Give either --token-url or --stage and --cell, not both."
        raise CommandError(msg, EXIT_USAGE)

    credentials = ClientCredentials(_env(ENV_CLIENT_ID), _env(ENV_CLIENT_SECRET))
    token_url = _token_url(args)
    scopes = normalize_scopes(args.scopes)

    requested_at = time.time()
    response = anyio.run(_fetch, credentials, token_url, scopes, args.basic_auth)

    shown = {
        "token_type": response.token_type,
        "expires_in": response.expires_in,
        "expires_at": round(requested_at + response.expires_in, 3),
        "scopes": list(scopes),
        "access_token": response.access_token
        if args.show_token
        else _masked(response.access_token),
    }
    sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")

    return EXIT_OK


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        msg = f"The environment variable {name} is not set; export it first."
        raise CommandError(msg)
    return value


def _token_url(args: argparse.Namespace) -> str:
    """The token URL: flags first, then the environment; a URL beats a region."""
    if args.token_url:
        return str(args.token_url)
    if args.stage or args.cell:
        return _region_token_url(args.stage, args.cell)
    if os.environ.get(ENV_TOKEN_URL):
        return os.environ[ENV_TOKEN_URL]
    if os.environ.get(ENV_STAGE) or os.environ.get(ENV_CELL):
        return _region_token_url(None, None)

    msg = (
        f"No token endpoint given: pass --token-url, or --stage and --cell, or "
        f"set {ENV_TOKEN_URL}, or {ENV_STAGE} and {ENV_CELL}."
    )
    raise CommandError(msg)


def _region_token_url(stage: str | None, cell: str | None) -> str:
    stage = stage or os.environ.get(ENV_STAGE)
    cell = cell or os.environ.get(ENV_CELL)
    if not stage:
        msg = f"No stage given: pass --stage or set {ENV_STAGE}."
        raise CommandError(msg)
    if not cell:
        msg = f"No cell given: pass --cell or set {ENV_CELL}."
        raise CommandError(msg)

    return resolve_region(stage, cell).token_url


async def _fetch(
    credentials: ClientCredentials,
    token_url: str,
    scopes: tuple[str, ...],
    basic_auth: BasicAuthEncoding,
) -> TokenResponse:
    async with TokenEndpointClient(basic_auth=basic_auth) as client:
        return await client.fetch(credentials, token_url, scopes)


def _masked(access_token: str) -> str:
    # Six characters identify a token in a conversation without making it
    # usable; a token too short to spare them shows none.
    prefix = access_token[:6] if len(access_token) > 12 else ""
    return f"{prefix}…({len(access_token)} chars)"


# tokenfleet demo


def _add_demo(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="run a fleet of processes sharing tokens, and show what the IdP saw",
        description="Run the fake IdP, a private redis-server (unless "
        "--redis-url names one; without either, an in-memory cache per "
        "process) and a fleet of worker processes asking for tokens, with a "
        "live progress line and a summary of calls, latency and tokens "
        "issued per tenant per lifetime.",
    )
    add_demo_arguments(parser)
    parser.set_defaults(run=run_demo)


# The command

SUBCOMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    _add_regions,
    _add_fake_idp,
    _add_token,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``tokenfleet`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="tokenfleet",
        description="Fleet-wide OAuth2 client-credentials tokens: tools.",
    )
    subcommands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    for add in SUBCOMMANDS:
        add(subcommands)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokenfleet`` command with *argv* and return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2); a status is
        # returned instead so that main() can be called from Python too.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    run: Run = args.run
    try:
        return run(args)
    except CommandError as exc:
        return _fail(str(exc), exc.status)
    except TokenFleetError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`tokenfleet regions | head`): not an error of
        # ours, and Python must not complain again when it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
