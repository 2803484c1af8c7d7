"""``tokenfleet demo``, run for a few seconds with real worker processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenfleet._cli import main
from tokenfleet.testing import RedisServer

SHORT_DEMO = [
    "demo",
    *("--duration", "4"),
    *("--processes", "2"),
    *("--tasks", "5"),
    *("--tenants", "2"),
    *("--expires-in", "2"),
]
LIFETIMES = 4 / 2

TENANT_LINE = re.compile(r"^\s+(tenant-\d+)\s+(\d+)\s+(\d+\.\d\d)$", re.MULTILINE)
EVERY_TENANT_LINE = re.compile(
    r"^\s+every tenant\s+(\d+)\s+(\d+\.\d\d) per tenant$", re.MULTILINE
)


def issued_per_tenant(output: str) -> dict[str, tuple[int, float]]:
    """The summary's (issued, per lifetime) figures by tenant."""
    return {
        client_id: (int(issued), float(per_lifetime))
        for client_id, issued, per_lifetime in TENANT_LINE.findall(output)
    }


@pytest.mark.fleet
def test_short_demo_prints_tokens_per_tenant_per_lifetime(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 4-second demo exits 0 and reports issued tokens per tenant per lifetime."""
    status = main(SHORT_DEMO)
    output = capsys.readouterr().out

    assert status == 0, output
    assert "Token store: a private redis-server" in output
    figures = issued_per_tenant(output)
    assert sorted(figures) == ["tenant-0", "tenant-1"]
    for issued, per_lifetime in figures.values():
        assert issued >= 1
        assert per_lifetime == pytest.approx(issued / LIFETIMES, abs=0.005)
    every = EVERY_TENANT_LINE.search(output)
    assert every is not None, output
    assert int(every[1]) == sum(issued for issued, _ in figures.values())
    assert re.search(r"^\s+failures\s+0$", output, re.MULTILINE), output


@pytest.mark.fleet
def test_demo_without_redis_server_says_each_process_fetches(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With no redis-server on PATH the demo runs on memory and says so."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not RedisServer.available()

    status = main(SHORT_DEMO)
    output = capsys.readouterr().out

    assert status == 0, output
    assert "redis-server is not installed" in output
    assert "each of the 2 processes fetched its own tokens" in output
    # Each process fetched for itself: at least its first token per tenant.
    for issued, _ in issued_per_tenant(output).values():
        assert issued >= 2
