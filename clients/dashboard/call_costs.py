"""The call-cost table of a host: guest instructions each ops, hijack or live patch adds to a call of a function it
covers, from what the host's retained ``state`` says is registered there.

The emulated kernel is deterministic: what a call through ftrace costs in guest instructions depends only on the
path its call site takes, so a small model gives it exactly (``tests/test_dashboard_call_costs.py`` checks the
model against a counting kernel; ``bench.ftrace_ops`` measures the same paths):

- a site with one ops calls it directly (CALL_OPS): ``DIRECT`` + the callback's own instructions;
- a site with two ops or more calls ``ftrace_list_ops``, which walks *every* registered ops:
  ``LIST`` + ``LIST_PER_OPS_ON_SITE`` + callback per ops covering the site, + ``LIST_PER_OTHER_OPS`` per
  registered ops that does not.

The state does not say which ops share a site, only how many functions each covers and how many call sites are
enabled: when the covered functions add up to more than the enabled sites, some sites are shared, and the table
gives both costs (alone; on a site shared with one other ops).
"""

from __future__ import annotations

from typing import Any

DIRECT = 33
"""mov/bl at the entry, ftrace_caller, the per-callsite ops' callback called and returned from (body excluded)."""
LIST = 78
LIST_PER_OPS_ON_SITE = 24
LIST_PER_OTHER_OPS = 20
CALLBACK_BODY = {"nop": 6, "count": 12}
"""ops_func_nop / ops_func_count's own instructions."""
KLP_BODY = 23
"""klp_ftrace_handler and the replacement's difference to the original: bench.livepatch's 56 extra guest
instructions per patched call of livepatch_demo_target, less ``DIRECT``."""
DIRECT_TRAMPOLINE = {"in BL range": 3, "out of range": 11}
"""A direct hijack to ftrace_stub_direct_tramp: a bl straight to it, or through a veneer (bench.ftrace_ops)."""


def direct(body: int) -> int:
    return DIRECT + body


def listed(bodies: list[int], others: int) -> int:
    """A site shared by ``bodies`` (each ops' callback body) while ``others`` more ops are registered."""
    return LIST + sum(LIST_PER_OPS_ON_SITE + b for b in bodies) + LIST_PER_OTHER_OPS * max(0, others)


def table(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The host's rows (one per ops, hijack or enabled patch) and whether sites are shared; None without an ftrace
    section."""
    comps = (state or {}).get("components") or {}
    ft = comps.get("ftrace")
    if not isinstance(ft, dict):
        return None
    lp = comps.get("livepatch") if isinstance(comps.get("livepatch"), dict) else {}
    rows: list[dict[str, Any]] = []
    for o in ft.get("ops") or []:
        if isinstance(o, dict):
            body = CALLBACK_BODY.get(str(o.get("callback")), CALLBACK_BODY["nop"])
            rows.append({"kind": "ops", "name": o.get("name"), "via": f"ops_func_{o.get('callback')}",
                         "functions": int(o.get("functions") or 0), "body": body})
    for p in (lp or {}).get("patches") or []:
        if isinstance(p, dict) and p.get("enabled"):
            rows.append({"kind": "patch", "name": p.get("name"), "via": "klp_ftrace_handler",
                         "functions": len(p.get("funcs") or []), "body": KLP_BODY})
    hijacks = [j for j in ft.get("hijacks") or [] if isinstance(j, dict)]
    registered = int(ft.get("ops_registered") or 0)
    covered = sum(r["functions"] for r in rows) + len(hijacks)
    enabled = int(ft.get("enabled_functions") or 0)
    shared = covered > enabled
    for r in rows:
        r["direct"] = direct(r["body"])
        # shared with one ops_func_nop; every other registered ops walked too
        r["shared"] = listed([r["body"], CALLBACK_BODY["nop"]], registered - 2) if registered >= 2 else None
        del r["body"]
    for j in hijacks:
        if j.get("mode") == "direct":
            rows.append({"kind": "hijack", "name": j.get("name"), "via": "direct trampoline", "functions": 1,
                         "direct": DIRECT_TRAMPOLINE["in BL range"], "shared": None,
                         "note": f"{DIRECT_TRAMPOLINE['out of range']} through a veneer"})
        else:
            rows.append({"kind": "hijack", "name": j.get("name"), "via": "ftrace_redirect_call", "functions": 1,
                         "direct": None, "shared": None, "note": f"redirected to {j.get('target')}"})
    # ops the table does not list (the function tracer's, the profiler's): their functions are not published,
    # only that they are registered; where they cover a listed function, its site is shared too
    listed_ops = len(ft.get("ops") or []) + len(hijacks) + sum(r["functions"] for r in rows if r["kind"] == "patch")
    return {"rows": rows, "ops_registered": registered, "enabled_functions": enabled, "covered": covered,
            "shared_sites": shared, "other_ops": max(0, registered - listed_ops),
            "model": {"direct": DIRECT, "list": LIST, "list_per_ops_on_site": LIST_PER_OPS_ON_SITE,
                      "list_per_other_ops": LIST_PER_OTHER_OPS, "callbacks": CALLBACK_BODY}}
