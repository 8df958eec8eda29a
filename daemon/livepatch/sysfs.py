"""/sys/kernel/livepatch as data (kernel-mechanics §7.9), plus per-task patch states.

=====================================  =======  =================================================
path                                   mode     value
=====================================  =======  =================================================
<patch>/enabled                        rw       1 while enabled (or patching), 0 otherwise
<patch>/transition                     r        1 iff this patch is in transition
<patch>/force                          w        (write-only: force the transition)
<patch>/replace                        r        the atomic-replace flag
<patch>/stack_order                    r        1-based position among loaded patches
<patch>/<object>/patched               r        1 once the object's funcs are on their stacks
<patch>/<object>/<function,sympos>/    dir      one per func (sympos 0 shown as 1)
=====================================  =======  =================================================
"""

from __future__ import annotations

from typing import Any

from daemon.livepatch.core import Livepatch

MODES = {"enabled": "-rw-r--r--", "transition": "-r--r--r--", "force": "--w-------", "replace": "-r--r--r--",
         "stack_order": "-r--r--r--", "patched": "-r--r--r--"}


def patch_view(lp: Livepatch, name: str) -> dict[str, Any]:
    """One patch's directory: attribute values, objects and functions, and its transition's progress."""
    with lp.lock:
        patch = lp.patch(name)
        tr = lp.transition if lp.transition is not None and lp.transition.patch is patch else None
        return {
            "enabled": int(patch.enabled),
            "transition": int(tr is not None),
            "replace": int(patch.replace),
            "stack_order": lp.patches.index(patch) + 1,
            "forced": patch.forced,
            "replaced": patch.replaced,
            "module": patch.module.name,
            "states": [{"id": i, "version": v} for i, v in sorted(patch.states.items())],
            "objects": {o.name: {"patched": int(o.patched), "funcs": [f.sysfs_name for f in o.funcs if not f.nop]}
                        for o in patch.objects},
            "progress": None if tr is None else {
                "target": "patched" if tr.target else "unpatched",
                "attempts": tr.attempts,
                "signals_sent": tr.signals_sent,
                "blocked": {str(pid): why for pid, why in sorted(tr.blocked.items())},
            },
        }


def view(lp: Livepatch) -> dict[str, dict[str, Any]]:
    with lp.lock:
        return {p.name: patch_view(lp, p.name) for p in lp.patches}


def files(lp: Livepatch) -> list[tuple[str, str, str]]:
    """(path, mode, content) of every readable file, as ``grep . -r /sys/kernel/livepatch`` would show."""
    out = []
    for name, d in view(lp).items():
        for attr in ("enabled", "transition", "replace", "stack_order"):
            out.append((f"{name}/{attr}", MODES[attr], f"{d[attr]}\n"))
        out.append((f"{name}/force", MODES["force"], ""))
        for obj, o in d["objects"].items():
            out.append((f"{name}/{obj}/patched", MODES["patched"], f"{o['patched']}\n"))
    return out
