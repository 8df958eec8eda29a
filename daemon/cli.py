"""The ``livepatchd`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from clients.rollout import command as orchestrator_command
from daemon.settings import default_state_dir
from daemon.stress_patching import run_stress_patching


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livepatchd", description="Live-patching daemon for an emulated arm64 "
                                     "kernel.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole story: a daemon on an embedded broker, a signed patch loaded, "
                          "enabled, observed and removed with lpctl")
    demo.add_argument("--cpus", type=int, default=2, help="number of vCPUs (1-8, default 2)")
    demo.add_argument("--dashboard", default="127.0.0.1:0", metavar="ADDRESS:PORT",
                      help="serve the fleet dashboard here while the story runs; its URL is printed (default "
                      "%(default)s: a free port)")
    demo.add_argument("--no-dashboard", dest="dashboard", action="store_const", const=None,
                      help="no dashboard")
    demo.add_argument("--keep", action="store_true", help="keep the daemon and the dashboard running after the "
                      "story, until Ctrl-C")
    stress = sub.add_parser("stress-patching", help="boot the kernel and toggle every call site under load")
    stress.add_argument("--cpus", type=int, default=2, help="number of vCPUs (1-8, default 2)")
    stress.add_argument("--toggles", type=int, default=200, help="batches to apply (default 200)")
    serve = sub.add_parser("serve", help="run the daemon: MQTT API on a broker (embedded when none is given)",
                           description="Settings come from LIVEPATCHD_* environment variables; these options "
                           "override them.")
    serve.add_argument("--broker", dest="broker_url", action="append",
                       help="mqtt://[user:pass@]host:port or mqtts://...; the nodes of a cluster: repeat the option "
                       "or separate URLs with commas; default: an embedded broker on 127.0.0.1 on a free port")
    serve.add_argument("--host", dest="host_id", help="this host's id (default: the machine's host name)")
    serve.add_argument("--state-dir", type=Path, metavar="DIR", help="where each host keeps its journal and desired "
                       f"state, in DIR/<host>/ (default: LIVEPATCHD_STATE_DIR, else {default_state_dir()})")
    serve.add_argument("--cpus", dest="nr_cpus", type=int, metavar="N", help="number of vCPUs, 1-8 (default: "
                       "LIVEPATCHD_NR_CPUS, else 2)")
    serve.add_argument("--kernel-build", dest="kernel_build", metavar="RELEASE", help="the shipped guest kernel "
                       "build to boot: 6.1-lp1, 6.1-lp2 or 6.6-lp1 (default: LIVEPATCHD_KERNEL_BUILD, else 6.1-lp1)")
    serve.add_argument("--tlb-mode", dest="tlb_mode", choices=["virtual", "cpu"],
                       help="the vCPUs' TLB: virtual (Unicorn's virtual TLB, filled with each region's permissions: "
                       "guest stores several times cheaper) or cpu (Unicorn's emulated CPU TLB, the reference to "
                       "compare with) (default: LIVEPATCHD_TLB_MODE, else virtual)")
    serve.add_argument("--protocol", dest="mqtt_protocol", choices=["auto", "5", "3.1.1"],
                       help="MQTT version to speak to --broker: auto tries 5 and falls back to 3.1.1 when the broker "
                       "refuses it (default: LIVEPATCHD_MQTT_PROTOCOL, else auto; the embedded broker speaks 3.1.1)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free one)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="the least severe log events written (default: LIVEPATCHD_LOG_LEVEL, else info)")
    serve.add_argument("--log-format", choices=["auto", "console", "json"],
                       help="console: human-readable lines; json: one JSON object per line; auto: console on a "
                       "terminal, JSON otherwise (default: LIVEPATCHD_LOG_FORMAT, else auto)")
    serve.add_argument("--tls-ca", dest="tls_ca_file", type=Path, help="CA certificate(s) to verify the broker "
                       "with (PEM); implies TLS")
    serve.add_argument("--tls-cert", dest="tls_cert_file", type=Path, help="client certificate (PEM), for brokers "
                       "that require one")
    serve.add_argument("--tls-key", dest="tls_key_file", type=Path, help="its private key (PEM), when not in the "
                       "certificate file")
    serve.add_argument("--trusted-keys-dir", type=Path, help="trust the Ed25519 public keys (*.pub, *.pem) in this "
                       "directory to sign patches")
    serve.add_argument("--trusted-key", dest="trusted_keys", type=Path, action="append",
                       help="trust this public key file too (repeatable)")
    serve.add_argument("--dev-signing-key", action="store_true", default=None,
                       help="FOR DEMOS ONLY: generate a signing key pair in the host's state directory "
                       "(<state-dir>/<host>/dev-signing.key and .pub) and trust it; anyone who can read that file "
                       "can sign patches this daemon will load")
    serve.add_argument("--allow-any-call", dest="allow_any_call", action="store_true", default=None,
                       help="FOR LABS ONLY: the call verbs may run any kernel function, not only the ones the image "
                       "marks callable (readers, syscalls, test helpers); a call of memset can overwrite kernel "
                       "memory (default: LIVEPATCHD_ALLOW_ANY_CALL, else off)")
    _fleet_parser(sub)
    dash = sub.add_parser("dashboard", help="serve the live fleet dashboard (a web page fed from MQTT)")
    dash.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                      help="broker to follow, mqtt://[user:pass@]host:port (default %(default)s); connect as an "
                      "observer")
    dash.add_argument("--listen", default="127.0.0.1:8088", help="address:port to serve on (default %(default)s)")
    dash.add_argument("--operator-broker", default=None,
                      help="operator credentials, mqtt://operator:pass@host:port: the page then offers the rollout "
                      "controls (create, start, pause, resume, approve, cancel, roll back) and patch.check; without "
                      "it the page is read-only")
    _patch_parser(sub)
    _state_parser(sub)
    orchestrator_command.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "orchestrator":
        return orchestrator_command.run(args)
    if args.command == "dashboard":
        return _dashboard(args.broker, args.listen, args.operator_broker)
    if args.command == "demo":
        from daemon.demo import run_demo  # noqa: PLC0415  (imports the whole service)

        return run_demo(nr_cpus=args.cpus, dashboard=args.dashboard, keep=args.keep)
    if args.command == "stress-patching":
        return run_stress_patching(nr_cpus=args.cpus, toggles=args.toggles)
    if args.command == "serve":
        return _serve(args)
    if args.command == "fleet":
        return _fleet(args)
    if args.command == "patch":
        return _patch(args)
    if args.command == "state":
        return _state(args)
    return 2


def _dashboard(broker: str, listen: str, operator_broker: str | None = None) -> int:
    from clients.dashboard import FleetFeed  # noqa: PLC0415  (web server libraries only for this command)
    from clients.dashboard.app import serve  # noqa: PLC0415
    from clients.dashboard.controls import OperatorControls  # noqa: PLC0415

    address, _, port = listen.rpartition(":")
    if not address or not port.isdigit():
        print(f"livepatchd dashboard: --listen {listen!r} is not address:port", file=sys.stderr)
        return 2
    controls = OperatorControls(operator_broker) if operator_broker else None
    print(f"dashboard on http://{address}:{port}/ following {_no_password(broker)}"
          + (" (operator controls on)" if controls else " (read-only)"), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(FleetFeed(broker), address, int(port), controls))
    return 0


def _no_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, where = rest.rpartition("@")
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{where}" if at and ":" in creds else url


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError  # noqa: PLC0415  (the demo needs neither)

    from daemon.app import serve  # noqa: PLC0415
    from daemon.settings import Settings  # noqa: PLC0415

    keys = ("broker_url", "host_id", "state_dir", "nr_cpus", "mqtt_protocol", "metrics_port", "log_level",
            "log_format", "tls_ca_file", "tls_cert_file", "tls_key_file", "trusted_keys_dir", "trusted_keys",
            "dev_signing_key", "allow_any_call", "kernel_build", "tlb_mode")
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if "broker_url" in overrides:
        overrides["broker_url"] = ",".join(overrides["broker_url"])
    try:
        settings = Settings(**overrides)
        settings.tls_context()  # unreadable or malformed certificate files: say so now, not at the first connect
    except ValidationError as exc:
        print(f"livepatchd serve: invalid settings:\n{exc}")
        return 2
    except OSError as exc:  # ssl.SSLError included
        print(f"livepatchd serve: cannot load the TLS files: {exc}")
        return 2
    return serve(settings)


# -- livepatchd fleet --------------------------------------------------------------------------------------------


def _fleet_parser(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="run a fleet of simulated hosts (each a full daemon with its own kernel, "
                           "MQTT identity and state dir) in a few worker processes",
                           description="Runs until SIGTERM/SIGINT. 'livepatchd fleet scale N --state-dir D' grows "
                           "or shrinks a running fleet. Settings come from LIVEPATCHD_* variables as for serve; "
                           "each host's state is <state-dir>/<host>/.")
    fleet.add_argument("--hosts", type=int, help="how many hosts (default: the spec's, else 20)")
    fleet.add_argument("--first", type=int, default=0, help="the number of the first host id (default 0): a fleet "
                       "split over several runners on one broker gives each its own range, e.g. --first 500 "
                       "--hosts 500 for sim-0500..sim-0999")
    fleet.add_argument("--spec", type=Path, help="a fleet spec (YAML or JSON; schema: schemas/json/FleetSpec.json)")
    fleet.add_argument("--seed", type=int, help="override the spec's seed")
    fleet.add_argument("--workers", type=int, help="worker processes (default: one per core; 0: this process)")
    fleet.add_argument("--broker", dest="broker_url", help="mqtt://[user:pass@]host:port; default: an embedded "
                       "broker on 127.0.0.1 (enough for small fleets, see the README)")
    fleet.add_argument("--state-dir", type=Path, help="where every host's state dir goes")
    fleet.add_argument("--protocol", dest="mqtt_protocol", choices=["auto", "5", "3.1.1"])
    fleet.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    fleet.add_argument("--trusted-keys-dir", type=Path, help="every host trusts the public keys in this directory")
    fleet.add_argument("--trusted-key", dest="trusted_keys", type=Path, action="append",
                       help="every host trusts this public key file too (repeatable)")
    fleet.add_argument("--dashboard", default="127.0.0.1:0", metavar="ADDRESS:PORT",
                       help="serve the fleet dashboard here; its URL is printed once the fleet's broker is up "
                       "(default %(default)s: a free port)")
    fleet.add_argument("--no-dashboard", dest="dashboard", action="store_const", const=None, help="no dashboard")
    fleet.add_argument("--dashboard-broker", metavar="URL", help="the broker URL the dashboard follows, with an "
                       "observer's credentials (default: the fleet's --broker; a daemon account reads no host "
                       "documents under deploy/livepatchd.acl)")
    action = fleet.add_subparsers(dest="fleet_command")
    scale = action.add_parser("scale", help="grow or shrink the fleet running on --state-dir")
    scale.add_argument("size", type=int, help="the number of hosts to have")
    scale.add_argument("--state-dir", dest="scale_state_dir", type=Path, help="the running fleet's --state-dir")


def _fleet(args: argparse.Namespace) -> int:
    from pydantic import ValidationError  # noqa: PLC0415

    from daemon.errors import LivepatchdError  # noqa: PLC0415
    from daemon.fleet import plan, runner  # noqa: PLC0415
    from daemon.settings import Settings  # noqa: PLC0415

    if args.fleet_command == "scale":
        if args.size < 0:
            print(f"livepatchd fleet scale: the size must be 0 or more, not {args.size}", file=sys.stderr)
            return 2
        state_dir = args.scale_state_dir or args.state_dir or Settings().state_dir
        runner.request_size(state_dir, args.size)
        print(f"asked the fleet on {state_dir} for {args.size} hosts")
        return 0
    keys = ("broker_url", "state_dir", "mqtt_protocol", "log_level", "trusted_keys_dir", "trusted_keys")
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        spec = plan.load_spec(args.spec) if args.spec is not None else plan.parse_spec({})
        if args.seed is not None:
            spec = plan.parse_spec({**spec.model_dump(mode="json"), "seed": args.seed})
        if args.hosts is not None and args.hosts < 0:
            raise plan.FleetSpecError(f"--hosts must be 0 or more, not {args.hosts}", field="hosts")
        if args.first < 0:
            raise plan.FleetSpecError(f"--first must be 0 or more, not {args.first}", field="first")
        if args.workers is not None and args.workers < 0:
            raise plan.FleetSpecError(f"--workers must be 0 or more, not {args.workers}", field="workers")
        Settings(**overrides)
    except LivepatchdError as exc:
        print(f"livepatchd fleet: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"livepatchd fleet: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    json_overrides = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) else v)
                      for k, v in overrides.items()}
    if args.dashboard is not None:
        from clients.dashboard.background import DashboardError, parse_listen  # noqa: PLC0415

        try:
            parse_listen(args.dashboard)
        except DashboardError as exc:
            print(f"livepatchd fleet: --dashboard: {exc}", file=sys.stderr)
            return 2
    return runner.run_fleet(spec, json_overrides, workers=args.workers, hosts=args.hosts, first=args.first,
                            dashboard=args.dashboard, dashboard_broker=args.dashboard_broker)


# -- livepatchd state check|repair -------------------------------------------------------------------------------


def _state_parser(sub: Any) -> None:
    state = sub.add_parser("state", help="check or repair a host's state directory (journal, desired state); "
                           "run it with the daemon stopped",
                           description="check: exit 0 when the journal and the desired state are whole and agree, "
                           "1 (with one line per problem) otherwise; the daemon refuses to start in that case "
                           "(exit 3). repair: keep what can be kept (a damaged WAL's commits before the damage, "
                           "the readable rows of a damaged database; damaged files are moved aside as "
                           "*.damaged-<time>), then make both agree so the daemon starts.")
    state.add_argument("action", choices=["check", "repair"])
    state.add_argument("--state-dir", type=Path, help="the daemon's --state-dir (default: LIVEPATCHD_STATE_DIR "
                       "or the built-in default)")
    state.add_argument("--host", dest="host_id", help="the host id (default: the machine's host name)")


def _state(args: argparse.Namespace) -> int:
    from daemon.service.store import integrity  # noqa: PLC0415
    from daemon.settings import Settings  # noqa: PLC0415

    overrides = {k: getattr(args, k) for k in ("state_dir", "host_id") if getattr(args, k) is not None}
    s = Settings(**overrides)
    if args.action == "check":
        problems = integrity.check(s.journal_path, s.desired_path)
        for p in problems:
            print(f"damaged: {p}")
        if not problems:
            print(f"ok: {s.host_dir}")
        return 1 if problems else 0
    for line in integrity.repair(s.journal_path, s.desired_path) or [f"nothing to repair: {s.host_dir}"]:
        print(line)
    left = integrity.check(s.journal_path, s.desired_path)
    for p in left:
        print(f"still damaged: {p}")
    return 1 if left else 0


# -- livepatchd patch build|sign|verify|examples ------------------------------------------------------------------


def _patch_parser(sub: Any) -> None:
    patch = sub.add_parser("patch", help="build, sign and verify live-patch bundles (offline: no daemon needed)",
                           description="Live-patch bundles: the C source compiled with the guest kernel's flags, its "
                           "manifest, and an Ed25519 signature. Errors print '<code>: <message>' and exit 1.")
    patch.add_argument("--json", action="store_true", help="print the result as one JSON object")
    cmd = patch.add_subparsers(dest="patch_command", required=True)
    build = cmd.add_parser("build", help="compile SOURCE.c into an (unsigned) bundle")
    build.add_argument("source", type=Path, help="the patch's C source")
    build.add_argument("--manifest", type=Path, required=True, help="its manifest (JSON); a missing build_id is "
                       "filled in with the committed kernel image's")
    build.add_argument("--out", type=Path, required=True, help="the bundle file to write; with --build or "
                       "--all-builds one per build, named after it (P.lpb -> P-6.6-lp1.lpb; a directory: "
                       "DIR/<name>-<release>.lpb)")
    target = build.add_mutually_exclusive_group()
    target.add_argument("--build-id", help="target this kernel build id instead")
    target.add_argument("--build", dest="releases", action="append", metavar="RELEASE",
                        help="build for this shipped kernel build (repeatable): its defines, its build id, and its "
                        "symbols checked first (a function missing from the build is refused)")
    target.add_argument("--all-builds", action="store_true", help="build for every shipped kernel build")
    build.add_argument("--key", type=Path, help="also sign it with this private key (PKCS#8 PEM)")
    sign = cmd.add_parser("sign", help="sign a bundle with an Ed25519 private key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the private key (PKCS#8 PEM)")
    sign.add_argument("--out", type=Path, help="write the signed bundle here (default: in place)")
    verify = cmd.add_parser("verify", help="run the daemon's admission checks on a bundle")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--trusted", type=Path, action="append", required=True,
                        help="a trusted public key file (repeatable)")
    verify.add_argument("--no-target", action="store_true", help="skip the checks against the committed kernel "
                        "image (build id, functions)")
    verify.add_argument("--build", dest="release", metavar="RELEASE", help="check against this shipped kernel "
                        "build (default: 6.1-lp1)")
    examples = cmd.add_parser("examples", help="build the example patches into bundles")
    examples.add_argument("names", nargs="*", help="which ones (default: all; --list shows them)")
    examples.add_argument("--out", type=Path, help="directory for <name>.lpb files")
    examples.add_argument("--key", type=Path, help="sign them with this private key (PKCS#8 PEM)")
    examples.add_argument("--list", action="store_true", help="only list the examples")
    examples.add_argument("--build", dest="releases", action="append", metavar="RELEASE",
                          help="build them for this shipped kernel build (repeatable): <name>-<release>.lpb; with "
                          "no NAMES, an example for a function the build lacks is skipped (named in the output)")


def _patch(args: argparse.Namespace) -> int:
    from daemon.errors import LivepatchdError  # noqa: PLC0415  (the other commands need none of this)

    try:
        result = _patch_command(args)
    except LivepatchdError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": exc.to_dict()}, default=repr))
        print(f"livepatchd patch {args.patch_command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    text = result.pop("text")
    print(json.dumps({"ok": True, **result}) if args.json else text)
    return 0


def _patch_command(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile  # noqa: PLC0415

    from daemon.errors import ArtifactError, ManifestError  # noqa: PLC0415
    from daemon.guest.build import DEFAULT_RELEASE, GUEST_BUILDS, IMAGE_PATH  # noqa: PLC0415
    from daemon.kernel.kernel import load_image  # noqa: PLC0415
    from daemon.livepatch import artifact, examples  # noqa: PLC0415
    from patchformat import signing  # noqa: PLC0415
    from patchformat.bundle import PatchBundle  # noqa: PLC0415
    from patchformat.manifest import Manifest  # noqa: PLC0415
    from patchformat.summary import signed_line, summary  # noqa: PLC0415

    describe = summary  # the document lpctl prints for a bundle too

    def committed_build_id() -> str:
        return load_image(IMAGE_PATH)[0].build_id

    def read_text(path: Path, what: str) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise ArtifactError(f"cannot read {what} {path}: {exc.strerror}", path=str(path)) from None

    def build_per_release(source: str, template: dict[str, Any], releases: list[str]) -> dict[str, Any]:
        unknown = [r for r in releases if r not in GUEST_BUILDS]
        if unknown:
            raise ArtifactError(f"unknown kernel build {', '.join(unknown)}; shipped builds: "
                                f"{', '.join(GUEST_BUILDS)}", releases=unknown)
        releases = list(dict.fromkeys(releases))
        manifest = Manifest.from_dict({**template, "build_id": committed_build_id()})
        bundles = []
        includes = (artifact.PATCHES_DIR, args.source.resolve().parent)
        with tempfile.TemporaryDirectory(prefix="lpd-build-") as work:  # every build first: all or nothing
            for release in releases:
                image, kallsyms = load_image(GUEST_BUILDS[release].image)
                bundle = artifact.build_for(source, manifest, Path(work), release=release, image=image,
                                            kallsyms=kallsyms, include_dirs=includes)
                if args.key is not None:
                    bundle = signing.sign(bundle, signing.load_private_key(args.key))
                bundles.append((release, bundle))
        written, lines = [], []
        for release, bundle in bundles:
            if args.out.is_dir() or str(args.out).endswith("/"):
                path = args.out / f"{bundle.name}-{release}.lpb"
            else:
                path = args.out.with_name(f"{args.out.stem}-{release}{args.out.suffix or '.lpb'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(bundle, path)
            written.append({**describe(bundle, path), "release": release})
            signed = f", signed by {bundle.signature.key_id[:16]}" if bundle.signature else " (unsigned)"
            lines.append(f"{path}: {bundle.name} for {release} (build {bundle.manifest.build_id[:16]}){signed}, "
                         f"object {len(bundle.object)} bytes")
        return {"bundles": written, "text": "\n".join(lines)}

    def per_release_examples(wanted: list[str], private: Any, *, explicit: bool) -> dict[str, Any]:
        from daemon.errors import OldFuncNotFound  # noqa: PLC0415

        unknown = [r for r in args.releases if r not in GUEST_BUILDS]
        if unknown:
            raise ArtifactError(f"unknown kernel build {', '.join(unknown)}; shipped builds: "
                                f"{', '.join(GUEST_BUILDS)}", releases=unknown)
        built, skipped = [], []
        with tempfile.TemporaryDirectory(prefix="lpd-examples-") as work:
            for release in dict.fromkeys(args.releases):
                for name in wanted:
                    try:
                        bundle = examples.build_example_for(name, Path(work) / release, release)
                    except OldFuncNotFound as exc:
                        if explicit:
                            raise
                        skipped.append({"name": name, "release": release, "reason": exc.message})
                        continue
                    built.append((name, release, signing.sign(bundle, private) if private is not None else bundle))
        written = []
        for name, release, bundle in built:
            path = args.out / f"{name}-{release}.lpb"
            _write(bundle, path)
            written.append({**describe(bundle, path), "release": release})
        lines = [f"{w['bundle']}: {w['name']} for {w['release']}" + (f", signed by {w['key_id'][:16]}"
                                                                    if w["key_id"] else "") for w in written]
        lines += [f"skipped {k['name']} for {k['release']}: {k['reason']}" for k in skipped]
        return {"bundles": written, "skipped": skipped, "text": "\n".join(lines)}

    if args.patch_command == "build":
        try:
            template = json.loads(read_text(args.manifest, "manifest"))
        except ValueError as exc:
            raise ManifestError(f"manifest {args.manifest} is not JSON: {exc}", path=str(args.manifest)) from None
        if not isinstance(template, dict):
            raise ManifestError(f"manifest {args.manifest} is not a JSON object", path=str(args.manifest))
        source = read_text(args.source, "source")
        if args.releases or args.all_builds:
            return build_per_release(source, template, list(GUEST_BUILDS) if args.all_builds else args.releases)
        build_id = args.build_id or template.get("build_id") or committed_build_id()
        manifest = Manifest.from_dict({**template, "build_id": build_id})
        with tempfile.TemporaryDirectory(prefix="lpd-build-") as work:
            bundle = artifact.build_patch(source, manifest, Path(work),
                                          include_dirs=(artifact.PATCHES_DIR, args.source.resolve().parent))
        if args.key is not None:
            bundle = signing.sign(bundle, signing.load_private_key(args.key))
        _write(bundle, args.out)
        signed = f", signed by {bundle.signature.key_id[:16]}" if bundle.signature else " (unsigned)"
        return {**describe(bundle, args.out), "text": f"{args.out}: {bundle.name} for build "
                f"{build_id[:16]}{signed}, object {len(bundle.object)} bytes"}
    if args.patch_command == "sign":
        bundle = signing.sign(PatchBundle.load(args.bundle), signing.load_private_key(args.key))
        out = args.out or args.bundle
        _write(bundle, out)
        return {**describe(bundle, out), "text": signed_line(bundle, out)}
    if args.patch_command == "verify":
        bundle = PatchBundle.load(args.bundle)
        trusted = [signing.load_public_key(p) for p in args.trusted]
        if args.no_target:
            key = signing.verify(bundle, trusted)
            artifact.check_object(bundle.manifest, bundle.object)
        else:
            release = args.release or DEFAULT_RELEASE
            if release not in GUEST_BUILDS:
                raise ArtifactError(f"unknown kernel build {release!r}; shipped builds: {', '.join(GUEST_BUILDS)}")
            image, kallsyms = load_image(GUEST_BUILDS[release].image)
            key = artifact.admit(bundle, trusted, image, kallsyms)
        return {**describe(bundle, args.bundle), "text": f"{args.bundle}: {bundle.name} OK, signed by {key[:16]}"
                + ("" if args.no_target else f", for kernel build {release} ({bundle.manifest.build_id[:16]})")}
    # examples
    names = examples.example_names()
    if args.list:
        from daemon.livepatch.artifact import PATCHES_DIR  # noqa: PLC0415

        return {"examples": names, "directory": str(PATCHES_DIR),
                "text": "\n".join(f"{n:<26} {PATCHES_DIR / n}.c (+ .manifest.json)" for n in names)}
    unknown = [n for n in args.names if n not in names]
    if unknown:
        raise ArtifactError(f"no example named {', '.join(unknown)} (there are: {', '.join(names)})")
    if args.out is None:
        raise ArtifactError("give --out DIR for the bundles (or --list)")
    private = signing.load_private_key(args.key) if args.key is not None else None
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.releases:
        return per_release_examples(args.names or names, private, explicit=bool(args.names))
    with tempfile.TemporaryDirectory(prefix="lpd-examples-") as work:
        build_id = committed_build_id()
        for name in args.names or names:
            bundle = examples.build_example(name, Path(work), build_id)
            if private is not None:
                bundle = signing.sign(bundle, private)
            path = args.out / f"{name}.lpb"
            _write(bundle, path)
            written.append(describe(bundle, path))
    return {"bundles": written, "text": "\n".join(f"{w['bundle']}: {w['name']}"
                                                 + (f", signed by {w['key_id'][:16]}" if w["key_id"] else "")
                                                 for w in written)}


def _write(bundle: Any, path: Path) -> None:
    from daemon.errors import ArtifactError  # noqa: PLC0415

    try:
        bundle.save(path)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror}", path=str(path)) from None


if __name__ == "__main__":
    raise SystemExit(main())
