"""lpctl commands of the patch verbs (installed on the app by clients.cli.main)."""

from __future__ import annotations

import typer


def install(app: typer.Typer) -> None:
    """Add this module's commands (and sub-apps) to lpctl."""
