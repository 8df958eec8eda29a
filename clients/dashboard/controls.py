"""The operator's controls: the dashboard sends the orchestrator's requests (and ``patch.check``) with operator
credentials (``livepatchd dashboard --operator-broker mqtt://operator:…@host:port``). Without them the page gets
no controls and the server refuses every control request; with them, the broker's ACL still decides (an observer
account given as ``--operator-broker`` gets its requests dropped by the broker: the page reports a timeout)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

from clients.sdk import LivepatchClient, ReplyError, RolloutClient
from clients.sdk.errors import SdkError
from schemas.topics import LEVEL

ROLLOUT_VERBS = frozenset({"create", "dry_run", "rehearse", "start", "pause", "resume", "approve", "cancel",
                           "rollback"})


class ControlRefused(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class OperatorControls:
    """``client_id``: default, the URL's user name. The operator's account is a person's, on the listener that binds
    client ids to user names (deploy/mosquitto.conf, 1883): replies come on ``reply/<user name>`` there. The
    controls go one at a time, so two connections never share that id."""

    def __init__(self, broker_url: str, *, timeout: float = 10.0, client_id: str | None = None) -> None:
        self.broker_url, self.timeout = broker_url, timeout
        user = urlsplit(broker_url).username
        self.client_id = client_id or (unquote(user) if user else None)
        self._one_at_a_time = asyncio.Lock()

    def _client(self, host: str | None = None, timeout: float | None = None) -> LivepatchClient:
        if host is None:
            return RolloutClient(self.broker_url, protocol="3.1.1", timeout=timeout or self.timeout,
                                 client_id=self.client_id)
        return LivepatchClient(self.broker_url, host, protocol="3.1.1", timeout=timeout or self.timeout,
                               client_id=self.client_id)

    async def rollout(self, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        """One rollout control; answers the orchestrator's reply data, raises ControlRefused with its code."""
        if verb not in ROLLOUT_VERBS:
            raise ControlRefused("unknown_control", f"no control {verb!r}: {', '.join(sorted(ROLLOUT_VERBS))}")
        if verb == "rehearse":  # the spec against a simulated twin of its targets: a report with its timeline
            spec, faults, seed = body.get("spec"), body.get("faults", []), body.get("seed", 0)
            if not isinstance(spec, dict):
                raise ControlRefused("bad_request", "rehearse: 'spec' must be a JSON object (a RolloutSpec)")
            if not isinstance(faults, list) or not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ControlRefused("bad_request", "rehearse: 'faults' must be a list of faults and 'seed' an "
                                     "integer >= 0")
            return await self._send(None, "rollout.rehearse", {"spec": spec, "faults": faults, "seed": seed},
                                    timeout=max(self.timeout, 120.0))
        if verb in ("create", "dry_run"):
            spec = body.get("spec")
            if not isinstance(spec, dict):
                raise ControlRefused("bad_request", "create: 'spec' must be a JSON object (a RolloutSpec)")
            params: dict[str, Any] = {"spec": spec, "dry_run": verb == "dry_run"}
            verb = "create"
        else:
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise ControlRefused("bad_request", f"{verb}: 'name' (the rollout) is required")
            params = {"name": name}
            if verb == "approve" and isinstance(body.get("wave"), int):
                params["wave"] = body["wave"]
        return await self._send(None, f"rollout.{verb}", params)

    async def check(self, host: str, patch: str) -> dict[str, Any]:
        """``patch.check`` on one host: which tasks would block the loaded patch's transition."""
        if not LEVEL.match(host) or host.startswith("_"):
            raise ControlRefused("bad_request", "check: 'host' must be a host id")
        return await self._send(host, "patch.check", {"name": patch})

    async def transition(self, host: str) -> dict[str, Any]:
        """``patch.transition`` on one host: every task's patch state and what blocks it, now."""
        if not LEVEL.match(host) or host.startswith("_"):
            raise ControlRefused("bad_request", "transition: 'host' must be a host id")
        return await self._send(host, "patch.transition", {})

    async def _send(self, host: str | None, verb: str, params: dict[str, Any],
                    timeout: float | None = None) -> dict[str, Any]:
        try:
            async with self._one_at_a_time, self._client(host, timeout) as c:
                return await c.request(verb, params)
        except ReplyError as e:
            raise ControlRefused(e.code, e.message) from None
        except SdkError as e:
            raise ControlRefused("unavailable", f"{verb}: {e}", 503) from None
