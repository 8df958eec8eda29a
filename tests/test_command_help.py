"""What ``--help`` tells a new user: lpctl's flags take no value; ``livepatchd serve`` explains every option and
shows its defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from mqtt_fixtures import REPO
from typer.testing import CliRunner

from clients.cli.main import app
from daemon.settings import default_state_dir

runner = CliRunner()


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_lpctl_help_shows_no_value_type_for_a_flag() -> None:
    root = runner.invoke(app, ["--help"], terminal_width=200)
    assert root.exit_code == 0
    json_line = next(line for line in root.stdout.splitlines() if "--json" in line)
    assert "<bool>" not in json_line
    assert "print the daemon's reply" in json_line
    assert "<float range>" in next(line for line in root.stdout.splitlines() if "--timeout" in line), \
        "options with values keep their type"
    paths = list(_commands(typer.main.get_command(app)))
    assert len(paths) > 40  # every command and group of lpctl
    for path in paths:
        shown = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert shown.exit_code == 0, path
        assert "<bool>" not in shown.stdout, f"lpctl {' '.join(path)} --help: {shown.stdout}"


def _serve_help() -> str:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin",
                                                                  "HOME": str(default_state_dir().parents[2])})
    return done.stdout


def _option_help(text: str, option: str) -> str:
    """The option's entry: its line and the indented lines under it, joined."""
    match = re.search(rf"^  {re.escape(option)}\b.*\n(?:^ {{4,}}\S.*\n)*", text, re.MULTILINE)
    assert match is not None, f"{option} is not in serve --help"
    return " ".join(match.group(0).split())


@pytest.mark.parametrize(("option", "says"), [
    ("--protocol", "auto tries 5 and falls back to 3.1.1"),
    ("--log-level", "else info"),
    ("--log-format", "auto: console on a terminal, JSON otherwise"),
    ("--state-dir", f"else {default_state_dir()}"),
    ("--cpus", "else 2"),
])
def test_serve_help_explains_each_option_and_its_default(option: str, says: str) -> None:
    assert says in _option_help(_serve_help(), option)


@pytest.mark.parametrize("module", ["clients.cli.fleet_cmds", "clients.cli.ftrace_cmds", "clients.cli.profile_cmds",
                                    "clients.cli.patch_cmds",
                                    "clients.cli.observe_cmds", "clients.cli.runner", "clients.cli.main"])
def test_each_lpctl_module_imports_on_its_own(module: str) -> None:
    """No import cycle between lpctl's main module and its command modules (the shared helpers are in runner)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_lpctl_main_runs_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "clients.cli.main", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Operate livepatchd daemons over MQTT." in done.stdout
