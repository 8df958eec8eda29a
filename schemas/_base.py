"""Base models and value types shared by every message of the wire contract."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

SCHEMA_VERSION = 1
"""Bumped on an incompatible change of any document below (the topic root carries ``v1`` too)."""

U64_MAX = (1 << 64) - 1


class Inbound(BaseModel):
    """A message the daemon receives: strict (no coercion), unknown fields rejected, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Outbound(BaseModel):
    """A message the daemon sends: clients parse it tolerantly (unknown fields ignored: forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,16}")


def _parse_address(value: Any) -> Any:
    """Accept a guest address as a JSON integer or as a ``"0x…"`` string; anything else is left to fail."""
    if isinstance(value, str):
        if not _HEX.fullmatch(value):
            raise ValueError("an address is an integer or a hex string like '0xffff800080001000'")
        return int(value, 16)
    return value


Address = Annotated[
    int,
    BeforeValidator(_parse_address),
    Field(ge=0, le=U64_MAX),
    PlainSerializer(lambda v: f"{v:#x}", return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": U64_MAX},
                              {"type": "string", "pattern": "^0[xX][0-9a-fA-F]{1,16}$"}],
                    "description": "guest virtual address: integer or hex string (replies use hex strings)"}),
]
"""A 64-bit guest virtual address."""

RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+=-]+$")]
"""Chosen by the client, unique per request: the daemon answers a repeated id with the reply it journaled."""

HostId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
"""A host's MQTT identity: one topic level, no wildcards."""
