"""The catalog entry of a verb."""

from __future__ import annotations

from dataclasses import dataclass

from schemas._base import Outbound
from schemas.envelope import Request


@dataclass(frozen=True)
class VerbSpec:
    """A verb's wire contract: its request model, the model of its reply's ``data``, and a summary."""

    verb: str
    request: type[Request]
    data: type[Outbound]
    summary: str
    mutating: bool = False
