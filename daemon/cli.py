"""The ``livepatchd`` command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from daemon.demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livepatchd", description="Live-patching daemon for an emulated arm64 "
                                     "kernel.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="boot the kernel and toggle every call site under load")
    demo.add_argument("--cpus", type=int, default=2, help="number of vCPUs (1-8, default 2)")
    demo.add_argument("--toggles", type=int, default=200, help="batches to apply (default 200)")
    serve = sub.add_parser("serve", help="run the daemon: MQTT API on a broker (embedded when none is given)",
                           description="Settings come from LIVEPATCHD_* environment variables; these options "
                           "override them.")
    serve.add_argument("--broker", dest="broker_url", help="mqtt://[user:pass@]host:port or mqtts://...; default: "
                       "an embedded broker on 127.0.0.1 on a free port")
    serve.add_argument("--host", dest="host_id", help="this host's id (default: the machine's host name)")
    serve.add_argument("--state-dir", type=Path, help="where the journal lives")
    serve.add_argument("--cpus", dest="nr_cpus", type=int, help="number of vCPUs (1-8)")
    serve.add_argument("--protocol", dest="mqtt_protocol", choices=["auto", "5", "3.1.1"])
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free one)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(nr_cpus=args.cpus, toggles=args.toggles)
    if args.command == "serve":
        return _serve(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError  # noqa: PLC0415  (the demo needs neither)

    from daemon.app import serve  # noqa: PLC0415
    from daemon.settings import Settings  # noqa: PLC0415

    keys = ("broker_url", "host_id", "state_dir", "nr_cpus", "mqtt_protocol", "metrics_port", "log_level")
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"livepatchd serve: invalid settings:\n{exc}")
        return 2
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
