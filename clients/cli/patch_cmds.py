"""lpctl commands of the patch verbs (installed on the app by clients.cli.main).

``lpctl patch build|sign|show`` work offline. Signing and showing a bundle use the artifact format the daemon
uses (:mod:`patchformat`), in this process; building needs the guest toolchain and kernel image, so it runs
``livepatchd patch build`` (``python -m daemon.cli``, same interpreter) in a subprocess (lpctl never imports the
daemon). The others talk to a daemon over the SDK. ``lpctl read FUNCTION`` shows what a reader function (like
``proc_cmdline_read``) renders now.

Exit codes are lpctl's: 0 ok; 1 an error reply (its code is printed; with --json, the reply itself), a failed
build or signature, or — for ``--wait`` — a transition that did not complete in time or was reversed; 2 usage;
3 broker unreachable or no reply within --timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.cli.runner import Options, call_verb, err, fail, out, run
from clients.sdk import LivepatchClient, ReplyError
from patchformat import signing
from patchformat.bundle import PatchBundle
from patchformat.errors import ArtifactError
from patchformat.summary import short_key_id, signed_line, summary
from schemas.livepatch import (
    CallReadData,
    PatchChangeData,
    PatchInfoData,
    PatchListData,
    PatchLoadData,
    PatchTransitionData,
    PatchUnloadData,
    TransitionProgress,
)
from schemas.patch_insight import PatchCheckData, PatchEffectData

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

patch_app = typer.Typer(no_args_is_help=True, help="Live patches: build and sign bundles; load, enable, disable, "
                        "unload, list, inspect and force them on a host.",
                        epilog="Exit codes: 0 ok, 1 error reply / build failed / transition not completed, "
                        "2 usage, 3 broker unreachable or timeout.")

WaitOpt = Annotated[bool, typer.Option("--wait", help="wait for the transition to complete, with a progress bar "
                                       "(with --json: the daemon waits and sends one reply)")]
WaitTimeoutOpt = Annotated[float, typer.Option("--wait-timeout", min=0.1, help="seconds to wait for the transition")]


def install(app: typer.Typer) -> None:
    """Add this module's commands (and sub-apps) to lpctl."""
    app.add_typer(patch_app, name="patch")
    app.command("read")(read)


# -- offline: build and sign through livepatchd ------------------------------------------------------------------


def _livepatchd(ctx: typer.Context, *args: str) -> None:
    """Run ``livepatchd patch ARGS`` (--json passed through); exit 1 with its message when it fails."""
    opts: Options = ctx.obj
    cmd = [sys.executable, "-m", "daemon.cli", "patch", *(["--json"] if opts.json else []), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        fail(EXIT_FAILED, f"cannot run livepatchd: {exc}", "is livepatchd installed in this Python environment?")
    if proc.returncode == 0:
        sys.stdout.write(proc.stdout)
        return
    if opts.json and proc.stdout.strip():
        sys.stdout.write(proc.stdout)
    message = proc.stderr.strip() or proc.stdout.strip() or f"livepatchd exited with {proc.returncode}"
    if "No module named daemon" in message:
        fail(EXIT_FAILED, "livepatchd is not installed in this Python environment",
             "pip install livepatchd (the patch builder needs the guest toolchain and kernel image)")
    if proc.returncode == 2:  # argparse: a usage error
        fail(EXIT_USAGE, message)
    fail(EXIT_FAILED, message)


@patch_app.command("build")
def build(ctx: typer.Context,
          source: Annotated[Path, typer.Argument(help="the patch's C source (SOURCE.c)")],
          *,
          manifest: Annotated[Path, typer.Option("--manifest", help="its manifest (JSON; build_id optional)")],
          out_path: Annotated[Path, typer.Option("--out", help="the bundle file to write (e.g. P.lpb); with "
                                                  "--build/--all-builds one per build: P-<release>.lpb (a "
                                                  "directory: DIR/<name>-<release>.lpb)")],
          build_id: Annotated[str | None, typer.Option(help="target this kernel build id (default: the kernel "
                                                             "image livepatchd ships)")] = None,
          builds: Annotated[list[str] | None, typer.Option("--build", metavar="RELEASE", help="build for this "
                                                           "shipped kernel build, e.g. 6.6-lp1 (repeatable)")] = None,
          all_builds: Annotated[bool, typer.Option("--all-builds", help="build for every shipped kernel "
                                                   "build")] = False,
          key: Annotated[Path | None, typer.Option(help="also sign it with this private key")] = None) -> None:
    """Compile a patch's C source with the guest kernel's flags into a bundle (unsigned unless --key).

    With --build/--all-builds: one bundle per kernel build (its defines, struct layouts and build id); a patch
    for a function that a build lacks (renamed or inlined away) is refused, naming the function and the build,
    and no bundle is written."""
    if sum((bool(build_id), bool(builds), all_builds)) > 1:
        fail(EXIT_USAGE, "give one of --build-id, --build, --all-builds")
    args = ["build", str(source), "--manifest", str(manifest), "--out", str(out_path)]
    args += ["--build-id", build_id] if build_id else []
    for release in builds or []:
        args += ["--build", release]
    args += ["--all-builds"] if all_builds else []
    args += ["--key", str(key)] if key else []
    _livepatchd(ctx, *args)


@patch_app.command("sign")
def sign(ctx: typer.Context,
         bundle: Annotated[Path, typer.Argument(help="the bundle file (P.lpb)")],
         key: Annotated[Path, typer.Option("--key", help="the Ed25519 private key (lpctl keys generate)")],
         out_path: Annotated[Path | None, typer.Option("--out", help="write here (default: in place)")] = None,
         ) -> None:
    """Sign a bundle with an Ed25519 private key (daemons trust the matching public key)."""
    opts: Options = ctx.obj
    try:
        signed = signing.sign(PatchBundle.load(bundle), signing.load_private_key(key))
        target = out_path or bundle
        try:
            signed.save(target)
        except OSError as exc:
            raise ArtifactError(f"cannot write {target}: {exc.strerror}", path=str(target)) from None
    except ArtifactError as exc:
        _artifact_failed(opts, "sign", exc)
    _print_offline(opts, {**summary(signed, target), "text": signed_line(signed, target)})


@patch_app.command("show")
def show(ctx: typer.Context, bundle: Annotated[Path, typer.Argument(help="the bundle file (P.lpb)")]) -> None:
    """What a bundle file holds: patch name, kernel build id, the functions it replaces and who signed it (no
    signature check: a daemon does that on load, with its trusted keys)."""
    opts: Options = ctx.obj
    try:
        b = PatchBundle.load(bundle)
    except ArtifactError as exc:
        _artifact_failed(opts, "show", exc)
    doc = summary(b, bundle)
    signer = f"signed by {short_key_id(doc['key_id'])}" if doc["key_id"] else "unsigned"
    _print_offline(opts, {**doc, "text": f"{bundle}: {b.name} for build {b.manifest.build_id[:16]}, {signer}, "
                          f"replaces {', '.join(doc['funcs'])}"})


def _print_offline(opts: Options, result: dict[str, Any]) -> None:
    """Print an offline command's result as ``livepatchd patch`` does: its line, or --json its document."""
    text = result.pop("text")
    sys.stdout.write((json.dumps({"ok": True, **result}) if opts.json else text) + "\n")


def _artifact_failed(opts: Options, command: str, exc: ArtifactError) -> NoReturn:
    if opts.json:
        sys.stdout.write(json.dumps({"ok": False, "error": exc.to_dict()}, default=repr) + "\n")
    fail(EXIT_FAILED, f"lpctl patch {command}: {exc.code}: {exc.message}")


# -- on a host --------------------------------------------------------------------------------------------------


@patch_app.command("load")
def load(ctx: typer.Context, bundle: Annotated[Path, typer.Argument(help="a signed bundle file")]) -> None:
    """Load a signed bundle (disabled). Refused, with nothing loaded, unless the daemon trusts its signer."""
    try:
        raw = bundle.read_bytes()
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot read {bundle}: {exc.strerror}")
    data: PatchLoadData = call_verb(ctx, lambda c: c.patch_load(raw))
    key = f"signed by {data.key_id[:16]}" if data.key_id else "unsigned"
    out().print(f"loaded [bold]{data.name}[/] ({key}; stack order {data.stack_order}; replaces "
                f"{', '.join(data.funcs) or 'no function'}{'; atomic replace' if data.replace else ''})")


def _describe(progress: TransitionProgress) -> str:
    blocked = ", ".join(f"{b.comm} (pid {b.pid}): {b.why}" for b in progress.blocked)
    return f"{progress.target}: {progress.tasks_switched}/{progress.tasks_total} tasks" + (
        f"; blocked: {blocked}" if blocked else "")


def _change(ctx: typer.Context, verb: str, name: str, wait: bool, wait_timeout: float) -> None:
    opts: Options = ctx.obj
    want = verb == "patch.enable"

    def change(c: LivepatchClient, **waiting: Any) -> Awaitable[PatchChangeData]:
        return c.patch_enable(name, **waiting) if want else c.patch_disable(name, **waiting)
    if wait and opts.json:  # one reply, exactly: the daemon waits
        client_timeout = max(opts.timeout, wait_timeout + 5.0)
        call_verb(ctx, lambda c: change(c, wait=True, timeout_s=wait_timeout), reply_timeout=client_timeout,
                  budget=client_timeout + opts.timeout,
                  json_exit=lambda d: EXIT_OK if d.completed and d.enabled == want else EXIT_FAILED)
        return
    data: PatchChangeData = call_verb(ctx, change)
    what = "enabling" if verb == "patch.enable" else "disabling"
    if data.reversed:
        out().print(f"{name}: transition reversed (now {'patching' if data.enabled else 'unpatching'})")
    if data.completed:
        out().print(f"{name}: {'enabled' if data.enabled else 'disabled'} (transition complete)")
        return
    assert data.transition is not None
    if not wait:
        out().print(f"{name}: {what}, transition started — {_describe(data.transition)}")
        out().print(f"[dim]lpctl patch transition {name} shows its progress[/]")
        return
    _progress_bar(opts, name, data.transition, want_enabled=verb == "patch.enable", timeout=wait_timeout)


def _progress_bar(opts: Options, name: str, first: TransitionProgress, *, want_enabled: bool,
                  timeout: float) -> None:
    """Poll patch.transition and show tasks switched / total until it ends (on stderr: stdout stays clean)."""
    async def work(c: LivepatchClient) -> tuple[PatchTransitionData | None, PatchInfoData]:
        deadline = time.monotonic() + timeout
        last: PatchTransitionData | None = None
        with Progress(TextColumn("[bold]{task.fields[patch]}[/] {task.fields[target]}"), BarColumn(bar_width=20),
                      MofNCompleteColumn(), TextColumn("tasks"), TimeElapsedColumn(),
                      TextColumn("{task.fields[blocked]}"), console=err(), transient=False) as bar:
            task = bar.add_task(name, total=first.tasks_total, completed=first.tasks_switched, patch=name,
                                target=first.target, blocked="")
            async for last in c.transition_progress(name, poll_s=0.1):
                p = last.progress
                if p is None:
                    bar.update(task, completed=bar.tasks[0].total, blocked="")
                    break
                blocked = f"{len(p.blocked)} blocked" if p.blocked else ""
                bar.update(task, total=p.tasks_total, completed=p.tasks_switched, target=p.target,
                           blocked=f"[yellow]{'stalled: ' if p.stalled else ''}{blocked}[/]" if blocked else "")
                if time.monotonic() >= deadline:
                    break
        return last, await c.patch_info(name)

    try:
        last, info = run(opts, work, budget=timeout + 2 * opts.timeout)
    except ReplyError as exc:  # the patch went away meanwhile
        fail(EXIT_FAILED, f"{exc.code}: {exc.message}")
    if last is not None and last.in_progress:
        fail(EXIT_FAILED, f"{name}: the transition is still in progress after {timeout} s ("
             f"{_describe(last.progress) if last.progress else 'no detail'})",
             f"lpctl patch transition {name} shows why; lpctl patch disable {name} reverses it; "
             f"lpctl patch force {name} --yes completes it without stack checks")
    if info.enabled != want_enabled:
        fail(EXIT_FAILED, f"{name}: the transition was reversed; the patch is "
             f"{'enabled' if info.enabled else 'disabled'}")
    out().print(f"{name}: {'enabled' if info.enabled else 'disabled'} (transition complete)")


@patch_app.command("enable")
def enable(ctx: typer.Context, name: Annotated[str, typer.Argument(help="a loaded patch")],
           wait: WaitOpt = False, wait_timeout: WaitTimeoutOpt = 60.0) -> None:
    """Enable a loaded patch: the patching transition starts (--wait: until it completes)."""
    _change(ctx, "patch.enable", name, wait, wait_timeout)


@patch_app.command("disable")
def disable(ctx: typer.Context, name: Annotated[str, typer.Argument(help="an enabled patch")],
            wait: WaitOpt = False, wait_timeout: WaitTimeoutOpt = 60.0) -> None:
    """Disable a patch (unpatching transition), or reverse its transition in progress."""
    _change(ctx, "patch.disable", name, wait, wait_timeout)


@patch_app.command("unload")
def unload(ctx: typer.Context, name: Annotated[str, typer.Argument(help="a disabled or replaced patch")]) -> None:
    """Unload a disabled (or replaced) patch's module."""
    data: PatchUnloadData = call_verb(ctx, lambda c: c.patch_unload(name))
    out().print(f"{data.name}: unloaded")


@patch_app.command("force")
def force(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the patch in transition")],
          yes: Annotated[bool, typer.Option("--yes", help="confirm: consistency is no longer guaranteed, and "
                                            "after a forced unpatching the module can never be unloaded")]
          = False) -> None:
    """Complete a stalled transition without stack checks (dangerous: pass --yes)."""
    if not yes:
        fail(EXIT_USAGE, f"forcing {name} switches every remaining task without checking its stack: consistency "
             "is no longer guaranteed, and a forced unpatching pins the patch's module for good",
             f"lpctl patch transition {name} shows what blocks it; lpctl patch disable {name} reverses it; "
             "pass --yes to force anyway")
    data: PatchChangeData = call_verb(ctx, lambda c: c.patch_force(name))
    pinned = "; its module can never be unloaded" if data.forced else ""
    out().print(f"{data.name}: transition forced; {'enabled' if data.enabled else 'disabled'}{pinned}")


@patch_app.command("list")
def list_(ctx: typer.Context) -> None:
    """Every loaded patch, in stack order, and the transition in progress."""
    data: PatchListData = call_verb(ctx, lambda c: c.patch_list())
    if not data.patches:
        hint = "" if data.trusted_keys else " (and it trusts no signing key: every load will be refused)"
        out().print(f"no live patches loaded{hint}")
        return
    table = Table("#", "patch", "enabled", "transition", "flags", "functions")
    for p in data.patches:
        flags = ", ".join(f for f, on in (("replace", p.replace), ("forced", p.forced), ("replaced", p.replaced))
                          if on)
        table.add_row(str(p.stack_order), p.name, "[green]yes[/]" if p.enabled else "no",
                      "[yellow]yes[/]" if p.transition else "", flags, ", ".join(p.funcs))
    out().print(table)
    if data.transition is not None:
        out().print(f"transition: {data.transition.patch} {_describe(data.transition)}")


@patch_app.command("info")
def info(ctx: typer.Context, name: Annotated[str, typer.Argument(help="a loaded patch")]) -> None:
    """One patch as /sys/kernel/livepatch shows it: flags, functions, states, signer."""
    d: PatchInfoData = call_verb(ctx, lambda c: c.patch_info(name))
    table = Table(show_header=False, box=None)
    desired = "not journaled" if d.desired_enabled is None else ("enabled" if d.desired_enabled else "loaded")
    for key, value in (("patch", d.name), ("enabled", d.enabled), ("transition", d.transition),
                       ("replace", d.replace), ("stack order", d.stack_order), ("forced", d.forced),
                       ("replaced", d.replaced), ("module", f"{d.module} at {d.module_base:#x}"),
                       ("signed by", f"key {d.key_id[:16]}" if d.key_id else "nobody"), ("kernel build id", d.build_id),
                       ("states", ", ".join(f"{s.id} v{s.version}" for s in d.states) or "none"),
                       ("at boot", desired)):
        table.add_row(f"[bold]{key}[/]", str(value))
    out().print(table)
    funcs = Table("object", "function", "replaced by", "patched")
    for o in d.objects:
        for f in o.funcs:
            funcs.add_row(o.name, f.sysfs_name, f.new_name if not f.nop else "(nop: the original)",
                          "yes" if f.patched else "no")
    out().print(funcs)
    if d.progress is not None:
        out().print(f"transition: {_describe(d.progress)}")


@patch_app.command("transition")
def transition(ctx: typer.Context,
               name: Annotated[str | None, typer.Argument(help="only this patch's transition")] = None,
               all_tasks: Annotated[bool, typer.Option("--all", help="list every task, not only pending ones")]
               = False) -> None:
    """The transition in progress: target, attempts, signals, and each task's patch state and blocker."""
    d: PatchTransitionData = call_verb(ctx, lambda c: c.patch_transition(name))
    p = d.progress
    if p is None:
        out().print(f"no transition in progress{f' for {name}' if name else ''}")
    else:
        out().print(f"{p.patch}: {'[yellow]stalled[/] ' if p.stalled else ''}{p.target} transition, "
                    f"{p.tasks_switched}/{p.tasks_total} tasks switched, {p.elapsed_s:.1f} s, {p.attempts} attempts, "
                    f"{p.signals_sent} signal rounds")
    tasks = [t for t in d.tasks if all_tasks or t.pending or t.blocked]
    if tasks:
        table = Table("pid", "cpu", "comm", "kind", "patch_state", "pending")
        for t in tasks:
            table.add_row(str(t.pid), str(t.cpu), t.comm, t.kind, t.patch_state, "yes" if t.pending else "")
        out().print(table)
    for t in d.tasks:
        if t.blocked:
            out().print(f"pid {t.pid} ({t.comm}, cpu {t.cpu}) blocks: {t.blocked}")


@patch_app.command("check")
def check(ctx: typer.Context, name: Annotated[str, typer.Argument(help="a loaded patch, not yet enabled")]) -> None:
    """Predict the transition's stalls before enabling: the tasks whose stacks would block it now, why, and
    whether a fake signal clears them (read-only). Exit 1 when some task would stall it."""
    d: PatchCheckData = call_verb(ctx, lambda c: c.patch_check(name),
                                  json_exit=lambda d: EXIT_FAILED if d.will_stall else EXIT_OK)
    if d.busy_with:
        out().print(f"[yellow]{d.busy_with} is in transition: enabling {name} is refused until it ends[/]")
    if not d.blockers:
        out().print(f"{name}: no task would block the transition ({d.tasks_scanned} tasks scanned; checked "
                    f"{', '.join(d.functions) or 'no function'})")
        return
    table = Table("pid", "cpu", "comm", "reason", "outcome", "in")
    for b in d.blockers:
        outcome = "[green]a signal clears it[/]" if b.outcome == "signal_clears" else "[red]stalls[/]"
        table.add_row(str(b.pid), str(b.cpu), b.comm, b.reason, outcome, b.function or "?")
    out().print(table)
    for b in d.blockers:
        out().print(f"pid {b.pid} ({b.comm}): {b.why}")
        for frame in b.stack:
            out().print(f"    {frame}")
    if d.will_stall:
        fail(EXIT_FAILED, f"{name}: the transition would stall on "
             f"{sum(b.outcome == 'stalls' for b in d.blockers)} task(s)",
             "enable it anyway and the stall policy acts; or wait until those tasks leave the function")
    out().print(f"{name}: {len(d.blockers)} task(s) would block the transition until a fake signal clears them")


@patch_app.command("effect")
def effect(ctx: typer.Context, name: Annotated[str, typer.Argument(help="an enabled patch")]) -> None:
    """Proof of effect: calls each replacement function took, and whether the originals ran since the
    transition completed (guest-side counters). Exit 1 unless verified (completed, every replacement ran, no
    original ran since)."""
    d: PatchEffectData = call_verb(ctx, lambda c: c.patch_effect(name),
                                   json_exit=lambda d: EXIT_OK if d.verified else EXIT_FAILED)
    table = Table("function", "replaced by", "calls", "original ran since", "active")
    for f in d.funcs:
        old = "(in transition)" if f.old_calls is None else (f"[red]{f.old_calls} calls[/]" if f.old_calls
                                                             else "no")
        table.add_row(f.sysfs_name, f.new_name, str(f.calls), old, "yes" if f.active else "no (a later patch)")
    out().print(table)
    if not d.completed:
        fail(EXIT_FAILED, f"{name}: its transition is still in progress", f"lpctl patch transition {name}")
    if d.old_ran:
        fail(EXIT_FAILED, f"{name}: an original function ran after the transition completed")
    if not d.verified:
        fail(EXIT_FAILED, f"{name}: applied, not verified: some replacement has not run yet",
             "call the patched functions (lpctl call / read), then ask again")
    out().print(f"{name}: [green]verified[/] ({d.calls} calls to the replacements; no original ran since the "
                "transition completed)")


def read(ctx: typer.Context,
         function: Annotated[str, typer.Argument(help="a reader fn(buf, size), e.g. proc_cmdline_read")],
         size: Annotated[int, typer.Option(min=1, max=65536, help="buffer size")] = 4096,
         cpu: Annotated[int, typer.Option(min=0, help="vCPU to run it on")] = 0) -> None:
    """Call a reader function (like proc_cmdline_read, /proc/cmdline) and print the text it wrote."""
    data: CallReadData = call_verb(ctx, lambda c: c.call_read(function, size=size, cpu=cpu))
    sys.stdout.write(data.text if data.text.endswith("\n") or not data.text else data.text + "\n")
