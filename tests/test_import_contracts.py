"""The layering contracts themselves (pyproject's import-linter section): what they must keep forbidding.

``lint-imports`` checks the code against them; this checks that nobody loosened them: no optional layer (a
renamed package would silently drop out of the contract), and the forbidden edges of the one-door rule."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture(scope="module")
def contracts() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    return found


def forbids(contracts: list[dict[str, Any]], source: str, target: str) -> bool:
    return any(c["type"] == "forbidden" and source in c["source_modules"] and target in c["forbidden_modules"]
               for c in contracts)


def test_no_layer_is_optional(contracts: list[dict[str, Any]]) -> None:
    layers = [layer for c in contracts if c["type"] == "layers" for layer in c["layers"]]
    assert layers
    assert [layer for layer in layers if "(" in layer] == []
    packages = {p.strip() for layer in layers for p in layer.split("|")}
    assert {"daemon.service", "daemon.livepatch", "daemon.module_loader", "daemon.ftrace", "daemon.arch",
            "daemon.kernel", "daemon.emu"} <= packages


@pytest.mark.parametrize(("source", "target"), [
    ("daemon.service", "daemon.arch"), ("daemon.service", "daemon.emu"), ("daemon.service", "daemon.guest"),
    ("daemon.livepatch", "daemon.emu"), ("daemon.module_loader", "daemon.emu"), ("daemon.app", "schemas"),
    ("daemon.ftrace", "schemas"), ("daemon.livepatch", "schemas"), ("daemon.kernel", "schemas"),
    ("clients", "daemon"), ("patchformat", "daemon"), ("patchformat", "schemas"), ("patchformat", "clients"),
])
def test_the_one_door_edges_are_forbidden(contracts: list[dict[str, Any]], source: str, target: str) -> None:
    assert forbids(contracts, source, target), f"{source} -> {target} must be forbidden"
