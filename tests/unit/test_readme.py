"""The README stays true: its two commands exist and every setting is in its configuration table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdp_activation.settings import ActivationSettings
from cdp_identity.settings import IdentitySettings
from cdp_ingest.settings import IngestSettings
from cdp_kit.settings import ServiceSettings
from cdp_segmentation.settings import SegmentationSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS: list[type[ServiceSettings]] = [IngestSettings, IdentitySettings, SegmentationSettings, ActivationSettings]


def documented() -> set[str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(CDP_[A-Z0-9_]+)` \|", section, flags=re.MULTILINE))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.service)
def test_every_setting_is_in_the_configuration_table(settings: type[ServiceSettings]) -> None:
    missing = {f"CDP_{name.upper()}" for name in settings.model_fields} - documented()
    assert not missing, f"README configuration table lacks {sorted(missing)}"


def test_the_table_documents_nothing_that_does_not_exist() -> None:
    known = {f"CDP_{name.upper()}" for s in SETTINGS for name in s.model_fields}
    assert documented() <= known, sorted(documented() - known)


@pytest.mark.parametrize("target", ["demo", "test"])
def test_the_readme_commands_are_make_targets(target: str) -> None:
    assert f"make {target}" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE)


def test_every_linked_document_exists() -> None:
    for link in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / link).exists(), link
