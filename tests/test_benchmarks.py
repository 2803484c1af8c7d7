"""The quick version of every benchmark runs and writes sane results.

The full benchmarks are not part of the suite; these runs only make sure the
scripts still work against the current library.  Speed targets are never
asserted here: a loaded test machine would make them flaky, and they are
reported in benchmarks/README.md instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MAX_PNG_BYTES = 200_000

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None
    or importlib.util.find_spec("authlib") is None
    or importlib.util.find_spec("cashews") is None,
    reason="the benchmarks need the 'bench' extra (authlib, cashews, matplotlib)",
)


def _load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py, which is a script folder, not a package."""
    spec = importlib.util.spec_from_file_location(
        f"tokenfleet_bench_{name}", BENCHMARKS / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_quick(name: str, out: Path) -> dict[str, Any]:
    """Run the quick version of a benchmark and return its JSON results."""
    status = _load(name).main(["--quick", "--out", str(out)])

    assert status == 0
    assert (out / f"{name}.md").read_text().count("|") > 10
    png = out / f"{name}.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert png.stat().st_size < MAX_PNG_BYTES
    results: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert results["quick"] is True
    assert results["machine"]["cpus"] >= 1
    return results


def _ordered(latency: dict[str, float]) -> bool:
    return 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]


def test_hot_path_measures_every_alternative(tmp_path: Path) -> None:
    """The hot path run reports each alternative with ordered percentiles."""
    results = _run_quick("hot_path", tmp_path)

    rows = results["rows"]
    situations = {row["situation"] for row in rows}
    assert situations == {"in-process hit", "Redis hit", "cold miss"}
    assert sum(row["floor"] for row in rows) == 3
    assert {row["name"] for row in rows} >= {
        "tokenfleet",
        "Authlib AsyncOAuth2Client",
        "cashews, Redis, lock",
    }
    for row in rows:
        assert row["calls_per_second"] > 0
        assert _ordered(row["latency_us"])
        assert row["cost_vs_floor"] > 0
    assert (
        results["settings"]["redis_payload_bytes"] > results["settings"]["token_chars"]
    )


def test_scale_reports_memory_and_hit_cost_per_size(tmp_path: Path) -> None:
    """The scale run reports hit cost and bytes per entry for each tenant count."""
    results = _run_quick("scale", tmp_path)

    rows = results["rows"]
    assert [row["tenants"] for row in rows] == [10, 100]
    for row in rows:
        assert row["hit"]["all_in_process"] is True
        assert row["hit"]["tokenfleet_ns"] > 0
        assert row["hit"]["floor_ns"] > 0
        # An entry holds at least the token, in Redis and in the process.
        assert row["redis"]["memory_usage_per_key"] > row["token_chars"]
        assert row["in_process"]["bytes_per_entry"] > row["token_chars"]


@pytest.mark.fleet
def test_fleet_runs_every_client_and_counts_idp_calls(tmp_path: Path) -> None:
    """The fleet run covers tokenfleet and both baselines, every tenant fetched."""
    results = _run_quick("fleet", tmp_path)

    rows = {row["mode"]: row for row in results["rows"]}
    assert set(rows) == {"tokenfleet", "per-process", "authlib"}
    for row in rows.values():
        tenants = row["fleet"]["tenants"]
        assert row["calls"] > 0
        assert row["idp"]["keys"] == tenants
        assert row["idp"]["calls"] >= tenants
        assert row["idp"]["calls_per_key_per_generation"] >= 1.0
        latency = row["latency_ms"]
        assert _ordered(latency["cold_start"])
        assert latency["steady"]["calls"] + latency["expiry"]["calls"] > 0
    assert (
        rows["tokenfleet"]["counters"]["idp_fetches"]
        == rows["tokenfleet"]["idp"]["calls"]
    )


@pytest.mark.fleet
def test_faults_run_kills_and_restarts_redis(tmp_path: Path) -> None:
    """The fault run records the outage, the IdP calls and the recovery."""
    results = _run_quick("faults", tmp_path)

    settings = results["settings"]
    assert 0 < settings["kill_at_s"] < settings["restart_at_s"]
    assert results["calls"] > 0
    assert results["idp"]["calls"] >= settings["fleet"]["tenants"]
    assert results["idp"]["during_outage"] <= results["idp"]["calls"]
    timeline = results["timeline"]
    assert len(timeline["t"]) == len(timeline["calls"]) == len(timeline["idp_calls"])
    assert sum(timeline["idp_calls"]) <= results["idp"]["calls"]
    assert math.isfinite(results["recovery"]["converged_after_s"])
