"""``livepatchd orchestrator``: the command line of the orchestrator service (parsed in ``daemon.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_STORE = "rollouts.sqlite3"


def add_parser(sub: Any) -> None:
    orch = sub.add_parser(
        "orchestrator", help="run the rollout orchestrator (an MQTT client of the hosts, durable in a database)",
        description="Serves rollout.* requests on livepatch/v1/_orchestrator/request/rollout/<verb> and drives the "
        "rollouts it holds until SIGTERM/SIGINT. Several workers may share one PostgreSQL database (--db); each "
        "host step is driven by exactly one of them.")
    orch.add_argument("--broker", default=os.environ.get("LIVEPATCHD_BROKER_URL", "mqtt://127.0.0.1:1883"),
                      help="the hosts' broker, mqtt://[user:pass@]host:port, or a cluster's nodes separated by "
                      "commas (default: LIVEPATCHD_BROKER_URL, else %(default)s); connect as the 'orchestrator' user")
    orch.add_argument("--db", default=os.environ.get("LIVEPATCHD_ORCHESTRATOR_DB"),
                      help="a SQLite path or sqlite:///path, or postgresql://... (default: "
                      f"LIVEPATCHD_ORCHESTRATOR_DB, else <state-dir>/{DEFAULT_STORE})")
    orch.add_argument("--state-dir", type=Path, default=Path(os.environ.get("LIVEPATCHD_STATE_DIR", "state")),
                      help="where the default SQLite database lives (default: LIVEPATCHD_STATE_DIR, else ./state)")
    orch.add_argument("--worker", help="this worker's name (default: random); unique among workers of one database")
    orch.add_argument("--poll", type=float, default=0.5, metavar="S",
                      help="seconds between polls of a host's transition (default %(default)s)")
    orch.add_argument("--lease", type=float, default=30.0, metavar="S",
                      help="how long a worker holds a host step or a rollout's lead before another worker may take "
                      "it over, e.g. after this one was killed (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    import structlog  # noqa: PLC0415

    from clients.rollout.service import Orchestrator  # noqa: PLC0415

    if not 0 < args.poll <= 60 or not 1 <= args.lease <= 3600:
        print("livepatchd orchestrator: --poll must be in (0, 60] seconds and --lease in [1, 3600]", file=sys.stderr)
        return 2
    db = args.db
    if not db:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        db = str(args.state_dir / DEFAULT_STORE)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        orch = Orchestrator(args.broker, db, worker=args.worker, poll_s=args.poll, lease_s=args.lease)
    except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable database: say which
        print(f"livepatchd orchestrator: cannot open the database {db.split('@')[-1]}: {exc}", file=sys.stderr)
        return 2
    print(f"orchestrator {orch.worker} on {args.broker}, database {db.split('@')[-1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(orch.serve())
    return 0
