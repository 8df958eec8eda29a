"""lpctl's help screens: flags are shown without a value type.

typer's rich help prints the value type beside every option, flags included (``--json <bool>``, ``--help
<bool>``), which reads as if the flag took a value. :class:`LpctlGroup`, the root command's class, clears the
type shown for every flag of every command under it (``--help`` included) once, when the command tree is built.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup, TyperOption


def _hide_flag_types(command: Any) -> None:
    help_option = command.get_help_option(typer.Context(command))  # made once per command, then cached
    for param in [*command.params, help_option]:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""  # the rich help shows a metavar instead of the type; empty: nothing
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_types(sub)


class LpctlGroup(TyperGroup):
    """The root ``lpctl`` group (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _hide_flag_types(self)
