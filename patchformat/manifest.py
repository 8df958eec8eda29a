"""A live patch's manifest: what it replaces, which kernel it is for, its states and callbacks.

It carries what Linux puts in ``struct klp_patch`` / ``klp_object`` / ``klp_func`` / ``klp_state``, as data::

    {
      "schema": 1,
      "name": "livepatch_cmdline",                      # the patch (module) name, as in /sys/kernel/livepatch
      "build_id": "1b73...32",                          # the target kernel's GNU build id (hex)
      "replace": false,                                 # atomic replace of every earlier patch
      "objects": [{"name": "vmlinux",
                   "funcs": [{"old_name": "cmdline_proc_show", "old_sympos": 0,
                              "new_name": "livepatch_cmdline_proc_show"}],
                   "callbacks": {"pre_patch": null, "post_patch": null,
                                 "pre_unpatch": null, "post_unpatch": null}}],
      "states": [{"id": 1, "version": 1}]
    }

``old_sympos`` 0 means the name must be unique in kallsyms; n picks its n-th occurrence. ``new_name`` and the
callbacks name functions defined in the patch object. Callbacks follow the guest ABI in
``daemon/guest/patches/livepatch.h``: ``int pre_patch(const char *objname)``, the others return void.

:func:`canonical_json` is the byte form that is hashed and signed: every field present (defaults included),
keys sorted, no whitespace, ASCII.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from patchformat.errors import ManifestError

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=127)]
PatchName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", min_length=1, max_length=55)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FuncSpec(_Model):
    """One replaced function (``klp_func``)."""

    old_name: Identifier
    old_sympos: Annotated[int, Field(ge=0)] = 0
    new_name: Identifier


class Callbacks(_Model):
    """Per-object callbacks (``klp_callbacks``): names of functions in the patch object, or None."""

    pre_patch: Identifier | None = None
    post_patch: Identifier | None = None
    pre_unpatch: Identifier | None = None
    post_unpatch: Identifier | None = None

    def named(self) -> dict[str, str]:
        """{callback kind: function name} for the callbacks that are set."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ObjectSpec(_Model):
    """What the patch changes in one object (``klp_object``); only the kernel itself exists here."""

    name: Literal["vmlinux"] = "vmlinux"
    funcs: tuple[FuncSpec, ...] = ()  # may be empty, as in Linux (a patch that only runs callbacks)
    callbacks: Callbacks = Callbacks()

    @model_validator(mode="after")
    def _unique_funcs(self) -> ObjectSpec:
        seen = [(f.old_name, f.old_sympos) for f in self.funcs]
        if len(set(seen)) != len(seen):
            raise ValueError(f"object {self.name} replaces a function twice")
        return self


class StateSpec(_Model):
    """A system state the patch introduces or takes over (``klp_state``)."""

    id: Annotated[int, Field(ge=0, lt=1 << 64)]
    version: Annotated[int, Field(ge=0, lt=1 << 32)]


class Manifest(_Model):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    name: PatchName
    build_id: Annotated[str, Field(pattern=r"^[0-9a-f]{8,128}$")]
    replace: bool = False
    objects: Annotated[tuple[ObjectSpec, ...], Field(min_length=1)]
    states: tuple[StateSpec, ...] = ()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        names = [o.name for o in self.objects]
        if len(set(names)) != len(names):
            raise ValueError("an object is listed twice")
        ids = [s.id for s in self.states]
        if len(set(ids)) != len(ids):
            raise ValueError("a state id is listed twice")
        return self

    def functions(self) -> list[str]:
        """Every function of the object the manifest names: new functions, then callbacks."""
        out = [f.new_name for o in self.objects for f in o.funcs]
        out += [name for o in self.objects for name in o.callbacks.named().values()]
        return list(dict.fromkeys(out))

    def to_dict(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(f"invalid patch manifest: {_summary(exc)}",
                                errors=exc.errors(include_url=False, include_input=False)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ManifestError(f"invalid patch manifest: {_summary(exc)}",
                                errors=exc.errors(include_url=False, include_input=False)) from None


def _summary(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "manifest"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def canonical_json(manifest: Manifest) -> bytes:
    """The manifest's signed form: all fields, sorted keys, compact separators, ASCII only."""
    return json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
