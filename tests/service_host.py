"""A booted kernel and a Service over a state directory, with no broker: the harness the subsystem tests share.

Each test file's ``Host`` builds on it and serves the subsystems it tests."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.service import Journal, Service, kernel_identity
from daemon.service.store.desired import DesiredState
from schemas import Reply


class ServiceHost:
    def __init__(self, tmp: Path) -> None:
        self.kernel = Kernel(KernelConfig(nr_cpus=2)).boot()
        self.journal = Journal(tmp / "journal.sqlite3")
        self.desired = DesiredState(tmp / "desired.sqlite3")
        self.service = Service(host="h", boot_seq=self.journal.next_boot_seq(), journal=self.journal,
                               kernel=kernel_identity(build_id="b", release="", nr_cpus=2, booted_at=time.time()),
                               desired=self.desired)
        self.n = 0

    def request(self, verb: str, **params: Any) -> Reply:
        self.n += 1
        body = json.dumps({"request_id": f"b{self.service.boot_seq}-{self.n}", **params}).encode()
        return asyncio.run(self.service.handle(verb, body)).reply

    def ok(self, verb: str, **params: Any) -> dict[str, Any]:
        reply = self.request(verb, **params)
        assert reply.ok, reply.error
        assert reply.data is not None
        return reply.data

    def code(self, verb: str, **params: Any) -> str:
        reply = self.request(verb, **params)
        assert reply.error is not None, reply
        return reply.error.code

    def close(self) -> None:
        self.kernel.shutdown()
        self.journal.close()
        self.desired.close()
