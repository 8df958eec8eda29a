"""``MqttDriver``: the engine's seam to real host daemons, over one MQTT connection for the whole fleet.

The fleet is read from the hosts' retained ``state`` and ``status`` documents (kept current by the subscription,
so ``fleet()`` asks no host; a state document is parsed when the planner reads it — a fleet republishes its
states at every patch step of every host, and the planner reads them only at create, dry run and joins).
A request goes to ``livepatch/v1/<host>/request/<verb>`` with the driver's own reply topic
(``livepatch/v1/<host>/reply/<client id>``, the MQTT 5 response topic or the payload's ``reply_to``); the reply
is matched by request id. After a reconnect the requests still waiting are published again with their ids: a
daemon answers a repeat from its journal, it never acts twice. The connection speaks MQTT 3.1.1 unless told
otherwise: the fleet's traffic is thousands of small publishes, and MQTT 5's properties cost a decode per
message for nothing the driver needs (``reply_to`` says where to answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from clients.rollout.driver import TIMEOUT, Outcome, TransitionView
from clients.rollout.plan import HostInfo
from clients.sdk.connection import Connection
from clients.sdk.errors import BrokerUnreachable
from schemas import Reply
from schemas.brokers import parse_broker_urls
from schemas.topics import ALL_STATE, ALL_STATUS, ROOT, Topics, host_of

log = structlog.get_logger(__name__)

READ_TIMEOUT_S = 10.0


def _props(reply_topic: str, rid: str) -> Any:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply_topic
    props.CorrelationData = rid.encode()
    return props


class StateDocs(Mapping[str, dict[str, Any]]):
    """The hosts' retained state documents as received, parsed on first read. One that is not a state document
    of its host (what the planner could not read) is logged and skipped; the host's last good one stays."""

    def __init__(self) -> None:
        self._raw: dict[str, bytes] = {}
        self._good: dict[str, dict[str, Any]] = {}

    def put(self, host: str, payload: bytes) -> None:
        self._raw[host] = payload

    def drop(self, host: str) -> None:
        self._raw.pop(host, None)
        self._good.pop(host, None)

    def __getitem__(self, host: str) -> dict[str, Any]:
        raw = self._raw.pop(host, None)
        if raw is not None:
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict) or doc.get("host") != host:
                    raise ValueError("not a state document of this host")
                HostInfo.from_state(doc)  # refuse what the planner could not read
                self._good[host] = doc
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("skipped_foreign_document", topic=Topics(host).state, size=len(raw))
        return self._good[host]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(h for h in self._raw.keys() | self._good.keys() if h in self))

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str) or (host not in self._raw and host not in self._good):
            return False
        try:
            self[host]
        except KeyError:
            return False
        return True

    def __len__(self) -> int:  # what iterating gives: a document the planner cannot read is not counted
        return sum(1 for _ in self)


class MqttDriver:
    def __init__(self, broker: str, *, client_id: str | None = None, username: str | None = None,
                 password: str | None = None, protocol: str = "3.1.1") -> None:
        nodes = tuple(replace(n, username=username or n.username, password=password or n.password)
                      for n in parse_broker_urls(broker))
        self.client_id = client_id or f"lporch-{uuid.uuid4().hex[:12]}"
        self._conn = Connection(nodes, client_id=self.client_id, tls_context=None, protocol=protocol,  # type: ignore[arg-type]
                                timeout=10.0, on_message=self._on_message, on_reconnect=self._resend,
                                pending_warning=100_000)  # a wave's batch keeps hundreds of requests in flight
        self._states = StateDocs()
        self._topics: dict[str, Topics] = {}
        self._online: dict[str, bool] = {}
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._sent: dict[str, tuple[str, str, Any]] = {}
        self.requests = 0
        self.verbs: Counter[str] = Counter()  # requests sent, by verb

    async def open(self) -> None:
        await self._conn.open()
        # Replies at QoS 0: the session is clean (a reply in flight at a disconnect is lost at QoS 1 too, and the
        # request is re-sent with its id), and QoS 1 would add a PUBACK per reply and Mosquitto's in-flight window
        # (20 by default) in front of the hundreds of replies a wave's batch brings at once
        await self._conn.subscribe(f"{ROOT}/+/reply/{self.client_id}", qos=0)
        # QoS 0: Mosquitto hands a QoS 1 wildcard subscriber at most ~1,020 retained messages (its in-flight and
        # queue limits), fewer than a 1,000-host fleet's statuses and states
        await self._conn.subscribe(ALL_STATUS, qos=0)
        await self._conn.subscribe(ALL_STATE, qos=0)

    async def close(self) -> None:
        await self._conn.close()

    # -- incoming ----------------------------------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        host = host_of(topic)
        if host is None or host.startswith("_"):  # the orchestrator's own namespace is not a host
            return
        kind = topic[len(ROOT) + len(host) + 2:]
        try:
            if kind == "state":
                self._on_state(host, payload)
            elif kind == "status":
                doc = json.loads(payload) if payload else {}
                self._online[host] = doc.get("state") == "online"
            elif kind.startswith("reply/"):
                reply = Reply.model_validate_json(payload)
                fut = self._pending.get(reply.request_id or "")
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except (ValueError, ValidationError, AttributeError):
            log.warning("skipped_foreign_document", topic=topic, size=len(payload))

    def _on_state(self, host: str, payload: bytes) -> None:
        if not payload:
            self._states.drop(host)
        else:
            self._states.put(host, payload)

    async def _resend(self) -> None:
        for topic, payload, props in list(self._sent.values()):
            with contextlib.suppress(BrokerUnreachable):
                await self._conn.publish(topic, payload, props)

    # -- requests ----------------------------------------------------------------------------------------------

    async def request(self, host: str, verb: str, params: dict[str, Any], *, request_id: str | None = None,
                      timeout_s: float = READ_TIMEOUT_S) -> Outcome:
        rid = request_id or uuid.uuid4().hex
        topics = self._topics.get(host)
        if topics is None:
            topics = self._topics[host] = Topics(host)
        reply_topic = topics.reply(self.client_id)
        body: dict[str, Any] = {"request_id": rid}
        props: Any = None
        if self._conn.protocol == aiomqtt.ProtocolVersion.V5:
            props = _props(reply_topic, rid)
        else:
            body["reply_to"] = reply_topic
        body.update(params)
        topic, payload = topics.request(verb), json.dumps(body)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.requests += 1
        self.verbs[verb] += 1
        try:
            async with asyncio.timeout(timeout_s):
                await self._conn.publish(topic, payload, props)
                self._sent[rid] = (topic, payload, props)
                reply = await fut
        except TimeoutError:
            return Outcome(ok=False, code=TIMEOUT, message=f"no reply to {verb} from {host} within {timeout_s:g} s")
        finally:
            self._pending.pop(rid, None)
            self._sent.pop(rid, None)
        if reply.ok:
            return Outcome(ok=True, data=reply.data or {})
        err = reply.error
        return Outcome(ok=False, code=err.code if err else "internal", message=err.message if err else None,
                       data=err.details if err else {})

    # -- the HostDriver calls ----------------------------------------------------------------------------------

    async def fleet(self) -> dict[str, HostInfo]:
        return {h: HostInfo.from_state(self._states[h], online=self._online.get(h, True)) for h in self._states}

    async def load(self, host: str, bundle_b64: str, request_id: str, timeout_s: float) -> Outcome:
        return await self.request(host, "patch.load", {"bundle": bundle_b64}, request_id=request_id,
                                  timeout_s=timeout_s)

    async def enable(self, host: str, patch: str, request_id: str, timeout_s: float) -> Outcome:
        return await self.request(host, "patch.enable", {"name": patch}, request_id=request_id, timeout_s=timeout_s)

    async def transition(self, host: str, patch: str) -> TransitionView | Outcome:
        info = await self.request(host, "patch.info", {"name": patch})
        if not info.ok:
            return info
        enabled = bool(info.data.get("enabled"))
        progress = info.data.get("progress") or {}
        if not info.data.get("transition"):
            return TransitionView(completed=True, enabled=enabled)
        blocked = [{"pid": b.get("pid"), "comm": b.get("comm"), "why": b.get("why") or b.get("reason")}
                   for b in progress.get("blocked") or []]
        return TransitionView(completed=False, enabled=enabled, blocked=blocked,
                              signals_sent=int(progress.get("signals_sent") or 0))

    async def disable(self, host: str, patch: str, request_id: str) -> Outcome:
        return await self.request(host, "patch.disable", {"name": patch}, request_id=request_id)

    async def unload(self, host: str, patch: str, request_id: str) -> Outcome:
        return await self.request(host, "patch.unload", {"name": patch}, request_id=request_id)

    async def force(self, host: str, patch: str, request_id: str) -> Outcome:
        return await self.request(host, "patch.force", {"name": patch}, request_id=request_id)

    async def check(self, host: str, patch: str) -> Outcome:
        return self._prediction(await self.request(host, "patch.check", {"name": patch}))

    async def predict(self, host: str, functions: list[tuple[str, int]]) -> Outcome:
        body = {"functions": [{"name": n, "sympos": p} for n, p in functions]}
        return self._prediction(await self.request(host, "patch.check", body))

    @staticmethod
    def _prediction(out: Outcome) -> Outcome:
        if not out.ok:
            return out
        tasks = [{k: b.get(k) for k in ("pid", "comm", "cpu", "reason", "outcome", "why", "function", "stack")}
                 for b in out.data.get("blockers") or []]
        return Outcome(ok=True, data={"would_stall": bool(out.data.get("will_stall")), "tasks": tasks})

    async def effect(self, host: str, patch: str) -> Outcome:
        return await self.request(host, "patch.effect", {"name": patch})

    async def patches(self, host: str) -> Outcome:
        return await self.request(host, "patch.list", {})
