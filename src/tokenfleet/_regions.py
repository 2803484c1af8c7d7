"""Token endpoints and API base URLs of the Resistant Documents stages and cells."""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import UnknownRegionError


@dataclass(frozen=True, slots=True)
class Region:
    """One stage and cell of the Resistant Documents API."""

    stage: str
    cell: str
    aws_region: str
    token_url: str
    api_base_url: str


_OKTA = "https://eu.id.resistant.ai/oauth2"

REGIONS: tuple[Region, ...] = (
    Region(
        "prod",
        "eu-1",
        "eu-west-1",
        f"{_OKTA}/aus2un1hkrKhPjir4417/v1/token",
        "https://api.documents.resistant.ai",
    ),
    Region(
        "prod",
        "us-1",
        "us-east-1",
        f"{_OKTA}/aus3tzuy12e5blAJi417/v1/token",
        "https://api.us-1.documents.resistant.ai",
    ),
    Region(
        "prod",
        "ca-1",
        "ca-central-1",
        f"{_OKTA}/ausd6inbxjwgeJfq4417/v1/token",
        "https://api.ca-1.documents.resistant.ai",
    ),
    Region(
        "prod",
        "ap-2",
        "ap-south-1",
        f"{_OKTA}/aus827qzu1l953dI4417/v1/token",
        "https://api.ap-2.documents.resistant.ai",
    ),
    Region(
        "prod",
        "ap-3",
        "ap-southeast-2",
        f"{_OKTA}/ausp40dse1Q0rzDq6417/v1/token",
        "https://api.ap-3.documents.resistant.ai",
    ),
    Region(
        "test",
        "eu-1",
        "eu-west-1",
        f"{_OKTA}/aus17c52xbW6c0yA9417/v1/token",
        "https://api.documents.testing.resistant.ai",
    ),
)

_STAGE_ALIASES = {
    "prod": "prod",
    "production": "prod",
    "test": "test",
    "testing": "test",
}

_BY_KEY = {(region.stage, region.cell): region for region in REGIONS}


def _valid_pairs() -> str:
    return ", ".join(f"{region.stage}/{region.cell}" for region in REGIONS)


def resolve_region(stage: str, cell: str) -> Region:
    """Return the region of *stage* and *cell*.

    Stages are matched case-insensitively and accept ``prod``/``production``
    and ``test``/``testing``; cells are matched case-insensitively.  Raises
    `UnknownRegionError`, listing the valid pairs, for anything else.
    """
    if not isinstance(stage, str) or not isinstance(cell, str):
        msg = f"Stage and cell must be strings, not {type(stage).__name__} and {type(cell).__name__}."
        raise UnknownRegionError(msg)

    canonical_stage = _STAGE_ALIASES.get(stage.strip().lower())
    if canonical_stage is None:
        msg = (
            f"Unknown stage {stage!r}: use 'prod' (or 'production') or "
            f"'test' (or 'testing'). Valid stage/cell pairs: {_valid_pairs()}."
        )
        raise UnknownRegionError(msg)

    region = _BY_KEY.get((canonical_stage, cell.strip().lower()))
    if region is None:
        msg = (
            f"There is no cell {cell!r} in stage {canonical_stage!r}. "
            f"Valid stage/cell pairs: {_valid_pairs()}."
        )
        raise UnknownRegionError(msg)

    return region
