"""Stage and cell resolution to token endpoints and API base URLs."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tokenfleet._errors import ConfigurationError, UnknownRegionError
from tokenfleet._regions import REGIONS, Region, resolve_region

API_BASE_URLS = {
    ("prod", "eu-1"): "https://api.documents.resistant.ai",
    ("prod", "us-1"): "https://api.us-1.documents.resistant.ai",
    ("prod", "ca-1"): "https://api.ca-1.documents.resistant.ai",
    ("prod", "ap-2"): "https://api.ap-2.documents.resistant.ai",
    ("prod", "ap-3"): "https://api.ap-3.documents.resistant.ai",
    ("test", "eu-1"): "https://api.documents.testing.resistant.ai",
}


@pytest.mark.parametrize("region", REGIONS, ids=lambda r: f"{r.stage}-{r.cell}")
def test_every_region_resolves_to_itself(region: Region) -> None:
    """Each listed stage and cell pair resolves to its own entry."""
    assert resolve_region(region.stage, region.cell) is region


def test_stage_and_cell_pairs_are_unique() -> None:
    """No stage and cell pair is listed twice."""
    pairs = [(region.stage, region.cell) for region in REGIONS]

    assert len(pairs) == len(set(pairs))


def test_api_base_urls_match_the_documentation() -> None:
    """The API base URL of every pair is the documented one."""
    found = {(region.stage, region.cell): region.api_base_url for region in REGIONS}

    assert found == API_BASE_URLS


def test_token_urls_are_okta_custom_servers_on_one_https_host() -> None:
    """Every token URL is https, on one host, shaped /oauth2/<id>/v1/token."""
    parts = [urlsplit(region.token_url) for region in REGIONS]

    assert {part.scheme for part in parts} == {"https"}
    assert len({part.hostname for part in parts}) == 1
    for part in parts:
        segments = part.path.split("/")
        assert segments[:2] == ["", "oauth2"]
        assert segments[3:] == ["v1", "token"]
        assert segments[2]


def test_token_urls_differ_between_cells() -> None:
    """Each pair has its own authorization server."""
    urls = [region.token_url for region in REGIONS]

    assert len(urls) == len(set(urls))


@pytest.mark.parametrize(
    ("stage", "cell", "expected"),
    [
        ("production", "us-1", ("prod", "us-1")),
        ("PROD", "CA-1", ("prod", "ca-1")),
        ("  testing ", " eu-1 ", ("test", "eu-1")),
        ("Test", "Eu-1", ("test", "eu-1")),
    ],
)
def test_aliases_case_and_whitespace_are_accepted(
    stage: str, cell: str, expected: tuple[str, str]
) -> None:
    """Stage aliases, letter case and surrounding blanks do not matter."""
    region = resolve_region(stage, cell)

    assert (region.stage, region.cell) == expected


def test_unknown_stage_lists_the_valid_pairs() -> None:
    """An unknown stage is named in the error, with every valid pair."""
    with pytest.raises(UnknownRegionError) as caught:
        resolve_region("staging", "eu-1")

    message = str(caught.value)
    assert "'staging'" in message
    for region in REGIONS:
        assert f"{region.stage}/{region.cell}" in message


def test_unknown_cell_names_the_cell_and_stage() -> None:
    """A cell missing from a stage is named with that stage."""
    with pytest.raises(UnknownRegionError) as caught:
        resolve_region("test", "us-1")

    message = str(caught.value)
    assert "'us-1'" in message
    assert "'test'" in message


def test_unknown_region_is_a_configuration_error() -> None:
    """Callers catching ConfigurationError also catch unknown regions."""
    with pytest.raises(ConfigurationError):
        resolve_region("prod", "mars-1")


def test_non_string_arguments_are_refused() -> None:
    """A stage or cell that is not a string raises UnknownRegionError."""
    with pytest.raises(UnknownRegionError, match="must be strings"):
        resolve_region("prod", 1)  # type: ignore[arg-type]
