"""The ``livepatchd`` command."""

from __future__ import annotations

import argparse

from daemon.demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livepatchd", description="Live-patching daemon for an emulated arm64 "
                                     "kernel.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="boot the kernel and toggle every call site under load")
    demo.add_argument("--cpus", type=int, default=2, help="number of vCPUs (1-8, default 2)")
    demo.add_argument("--toggles", type=int, default=200, help="batches to apply (default 200)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(nr_cpus=args.cpus, toggles=args.toggles)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
