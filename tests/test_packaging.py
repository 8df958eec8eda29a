"""What the package declares: its license is the one in LICENSE; aiomqtt stays below 3 (the bridge acknowledges
requests through aiomqtt 2's private paho client, which 3.x no longer has)."""

from __future__ import annotations

import tomllib

from mqtt_fixtures import REPO
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_license_file_matches_the_declared_license() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text.splitlines()[1]
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_aiomqtt_is_pinned_below_3() -> None:
    (aiomqtt,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("aiomqtt")]
    assert aiomqtt.specifier.contains(Version("2.5.1"))
    assert not aiomqtt.specifier.contains(Version("3.0.0"))
    assert not aiomqtt.specifier.contains(Version("3.0.0a1"), prereleases=True)
