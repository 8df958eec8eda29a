"""``livepatchd orchestrator``: the rollout engine as a service, with its control API over MQTT.

Topics (the host API's conventions, under the host id ``_orchestrator``, which no host may take)::

    livepatch/v1/_orchestrator/request/rollout/<verb>   requests (rollout.create, .start, .status, ...)
    livepatch/v1/_orchestrator/reply/<client id>         replies (or the MQTT 5 response topic / ``reply_to``)
    livepatch/v1/_orchestrator/rollout/<name>            retained RolloutDoc, republished on every change
    livepatch/v1/_orchestrator/events                    every execution change and rollout event
    livepatch/v1/_orchestrator/service                   retained {"state": "online"|"offline", "worker": ...}

The service document is published ``online`` at start and after every reconnect, ``offline`` at a clean stop, and
is the connection's MQTT last will: a worker that dies (kill -9, a crash, a cut network) is said ``offline`` by
the broker. Several workers share the one document: a worker that sees another one's ``offline`` while it serves
publishes its own ``online`` again (the service is still up).

A request's id is recorded in the store with its reply before the reply goes out: a request sent again (the
client's retry after a reconnect, or a second worker receiving it too) is answered from there and never acted
on twice. Several workers may serve one PostgreSQL store: each request is handled by the worker that records
its id first; each rollout's decisions by the worker holding its lead lease; each host step by the worker that
claimed it (``clients.rollout.store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from clients.rollout import api
from clients.rollout.clock import RealClock
from clients.rollout.engine import FINAL, Engine
from clients.rollout.mqtt_driver import MqttDriver
from clients.rollout.plan import PlanError
from clients.rollout.store import Store
from clients.sdk.connection import Connection
from clients.sdk.errors import BrokerUnreachable
from schemas import Reply
from schemas.brokers import parse_broker_urls
from schemas.envelope import MAX_DEPTH, peek_oversized, too_deep
from schemas.topics import (
    LEVEL,
    ORCHESTRATOR_BASE,
    ORCHESTRATOR_EVENTS,
    ORCHESTRATOR_SERVICE,
    reply_destination_problem,
    rollout_topic,
)

log = structlog.get_logger(__name__)

BASE = ORCHESTRATOR_BASE
REQUESTS = f"{BASE}/request/#"
EVENTS = ORCHESTRATOR_EVENTS
SERVICE = ORCHESTRATOR_SERVICE
MAX_REQUEST_BYTES = 4 << 20


class Orchestrator:
    def __init__(self, broker: str, store_url: str, *, worker: str | None = None, username: str | None = None,
                 password: str | None = None, poll_s: float = 0.5, batch: int = 256, lease_s: float = 30.0) -> None:
        self.worker = worker or f"w-{uuid.uuid4().hex[:8]}"
        self.store = Store(store_url)
        self.driver = MqttDriver(broker, client_id=f"lporch-{self.worker}-hosts", username=username,
                                 password=password)
        nodes = tuple(replace(n, username=username or n.username, password=password or n.password)
                      for n in parse_broker_urls(broker))
        self._conn = Connection(nodes, client_id=f"lporch-{self.worker}", tls_context=None, protocol="auto",
                                timeout=10.0, on_message=self._on_message, on_reconnect=self._republish,
                                will=aiomqtt.Will(SERVICE, self._service_doc("offline"), qos=1, retain=True))
        self.engine = Engine(self.store, self.driver, RealClock(), worker=self.worker, poll_s=poll_s, batch=batch,
                             lease_s=lease_s)
        self.engine.listeners.append(self._changed)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outbox: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
        self.handled = 0
        self._serving = False

    # -- publishing --------------------------------------------------------------------------------------------

    def _changed(self, kind: str, doc: dict[str, Any]) -> None:
        if kind == "rollout":
            self._outbox.put_nowait((rollout_topic(doc["name"]), json.dumps(doc, sort_keys=True), True))
        self._outbox.put_nowait((EVENTS, json.dumps({"kind": kind, "worker": self.worker, **doc}, sort_keys=True),
                                 False))

    async def _publisher(self) -> None:
        while True:
            topic, payload, retain = await self._outbox.get()
            with contextlib.suppress(BrokerUnreachable):
                await self._conn.publish(topic, payload, retain=retain)

    def _service_doc(self, state: str) -> str:
        return json.dumps({"state": state, "worker": self.worker})

    async def _republish(self) -> None:
        """The retained documents as they are now: at start, and after every reconnect (a broker restarted
        without persistence has lost them)."""
        self._outbox.put_nowait((SERVICE, self._service_doc("online"), True))
        for name in self.store.names():
            self._outbox.put_nowait((rollout_topic(name), self.engine.doc(name).model_dump_json(), True))

    # -- requests ----------------------------------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        if message.topic.value == SERVICE:
            self._on_service(message.payload)
            return
        task = asyncio.get_running_loop().create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_service(self, payload: Any) -> None:
        """Another worker said offline (its will, or its clean stop) while this one serves: say online again."""
        try:
            doc = json.loads(payload) if isinstance(payload, bytes) and payload else {}
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and doc.get("state") == "online" and doc.get("worker") == self.worker:
            return
        if self._serving and (not isinstance(doc, dict) or doc.get("worker") != self.worker):
            self._outbox.put_nowait((SERVICE, self._service_doc("online"), True))

    async def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        parts = topic[len(BASE) + len("/request/"):].split("/")
        verb = ".".join(parts)
        props = message.properties
        response = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        rid: str | None = None
        reply_to = response
        try:
            if len(payload) > MAX_REQUEST_BYTES or too_deep(payload):  # too deep: before the decoder recurses
                rid, peeked = peek_oversized(payload)  # the id and reply topic, to answer the refusal with
                reply_to = reply_to or peeked
                if len(payload) > MAX_REQUEST_BYTES:
                    raise PlanError("request_too_large", f"a request is at most {MAX_REQUEST_BYTES} bytes")
                raise PlanError("bad_request", f"the request nests deeper than {MAX_DEPTH} levels")
            try:
                body = json.loads(payload)
            except ValueError:
                raise PlanError("bad_request", "the request is not JSON") from None
            if not isinstance(body, dict):
                raise PlanError("bad_request", "the request must be a JSON object")
            rid = body.get("request_id")
            if not isinstance(rid, str) or not 0 < len(rid) <= 128:
                rid = None
                raise PlanError("bad_request", "request_id: a string of 1 to 128 characters is required")
            reply_to = reply_to or body.get("reply_to")
            if isinstance(reply_to, str) and (problem := reply_destination_problem(reply_to)) is not None:
                reply_to = None
                raise PlanError(f"{problem[0]}_reply_topic", f"reply_to {problem[1]}")
            if not all(LEVEL.match(p) for p in parts) or verb not in api.VERBS:
                raise PlanError("unknown_verb", f"no verb {verb!r} here; the orchestrator serves: "
                                f"{', '.join(sorted(api.VERBS))}")
            claimed, stored = self._claim(rid, verb)
            if not claimed:
                if stored is not None:
                    await self._send(reply_to, stored, correlation)
                return  # another worker has it (and will answer)
            reply = await self._run(verb, body, rid)
        except PlanError as exc:
            reply = Reply.failure(rid, exc.code, exc.message, exc.details)
            text = reply.model_dump_json()
            if rid is not None:
                self._record(rid, text)
            await self._send(reply_to or f"{BASE}/reply", text, correlation)
            return
        text = reply.model_dump_json()
        self._record(rid, text)
        await self._send(reply_to, text, correlation)

    async def _run(self, verb: str, body: dict[str, Any], rid: str) -> Reply:
        handler: Callable[[Engine, dict[str, Any]], Awaitable[dict[str, Any]]] = api.VERBS[verb]
        try:
            data = await handler(self.engine, body)
        except ValidationError as exc:
            errs = [{"loc": ".".join(str(x) for x in e["loc"]), "msg": e["msg"]} for e in exc.errors()[:20]]
            first = errs[0] if errs else {"loc": "", "msg": "invalid"}
            return Reply.failure(rid, "bad_request", f"{verb}: {first['loc'] or 'request'}: {first['msg']}",
                                 {"errors": errs})
        except PlanError as exc:
            return Reply.failure(rid, exc.code, exc.message, exc.details)
        self._wake.set()
        return Reply.success(rid, data)

    def _claim(self, rid: str, verb: str) -> tuple[bool, str | None]:
        """(True, None): this worker runs the request now; else (False, the stored reply or None while another
        worker — or an earlier copy — is still on it)."""
        with self.store.tx() as t:
            won = t.run("INSERT INTO requests (request_id, verb, worker, reply, at) VALUES (?,?,?,NULL,?) "
                        "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                        (rid, verb, self.worker, self.engine.clock.now()))
            if won:
                return True, None
            got = t.run("SELECT reply FROM requests WHERE request_id = ?", (rid,))
            return False, got[0][0] if got else None

    def _record(self, rid: str, text: str) -> None:
        with self.store.tx() as t:
            t.run("INSERT INTO requests (request_id, verb, worker, reply, at) VALUES (?,?,?,?,?) "
                  "ON CONFLICT (request_id) DO UPDATE SET reply = excluded.reply",
                  (rid, "", self.worker, text, self.engine.clock.now()))

    async def _send(self, reply_to: str | None, text: str, correlation: bytes | None) -> None:
        if not isinstance(reply_to, str) or reply_destination_problem(reply_to) is not None:
            log.warning("reply_dropped", reply_to=str(reply_to)[:200], why="no valid reply destination")
            return
        props: Any = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        with contextlib.suppress(Exception):
            await self._conn.publish(reply_to, text, props)

    # -- the loop ----------------------------------------------------------------------------------------------

    async def _drive(self) -> None:
        while True:
            wakes: list[float] = []
            for name in self.store.names():
                row = self.store.rollout(name)
                if row is None or (row.state in FINAL and not self.engine.busy(name)) or row.state == "CREATED":
                    continue
                try:
                    wake = await self.engine.tick(name)
                except Exception:
                    log.exception("tick_failed", rollout=name)
                    wake = self.engine.clock.now() + 5.0
                if wake is not None:
                    wakes.append(wake)
            delay = max(0.0, min(wakes) - self.engine.clock.now()) if wakes else 5.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, 5.0)):  # another worker may have changed the store
                    await self._wake.wait()

    async def serve(self, ready: Callable[[], None] | None = None, stop: asyncio.Event | None = None) -> None:
        await self.driver.open()
        await self._conn.open()
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        publisher = loop.create_task(self._publisher())
        await self._conn.subscribe(REQUESTS)
        self._serving = True
        await self._republish()
        await self._conn.subscribe(SERVICE)
        driver = loop.create_task(self._drive())
        log.info("orchestrator_ready", worker=self.worker, store=self.store.url.split("@")[-1])
        if ready is not None:
            ready()
        try:
            await stop.wait()
        finally:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver
            self._serving = False
            for t in list(self._tasks):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(t, 2.0)
            with contextlib.suppress(BrokerUnreachable, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._conn.publish(SERVICE, self._service_doc("offline"), retain=True)
            publisher.cancel()
            await self._conn.close()
            await self.driver.close()
            self.store.close()
