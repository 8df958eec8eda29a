"""The daemon's settings (pydantic-settings): environment ``LIVEPATCHD_*``, then command-line overrides.

Validated once at startup and passed down; nothing reads the environment anywhere else.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from daemon.guest.build import DEFAULT_RELEASE, GUEST_BUILDS
from schemas.brokers import BrokerAddress, parse_broker_url, parse_broker_urls

__all__ = ["BrokerAddress", "Settings", "default_host_id", "default_state_dir", "parse_broker_url"]

_HOST_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def default_host_id() -> str:
    """The machine's host name, reduced to what one MQTT topic level may hold."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "livepatchd"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "livepatchd"


class Settings(BaseSettings):
    """Everything a daemon needs to know; one instance per daemon (a process may run many)."""

    model_config = SettingsConfigDict(env_prefix="LIVEPATCHD_", extra="forbid", validate_default=True)

    host_id: str = Field(default_factory=default_host_id, description="this host's MQTT identity (one topic level)")
    state_dir: Path = Field(default_factory=default_state_dir, description="journal and other state of this host")

    broker_url: str | None = Field(default=None, description="mqtt://host:port, or the nodes of one clustered "
                                   "broker comma-separated (tried in turn, the session resumed on whichever "
                                   "answers); none: an embedded broker on 127.0.0.1 on a free port")
    username: str | None = None
    password: SecretStr | None = None
    tls_ca_file: FilePath | None = None
    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    tls_insecure: bool = Field(default=False, description="skip the broker certificate's host name check")
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="auto: MQTT 5, falling back to 3.1.1 when the broker refuses it")
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(default=7 * 86400, ge=0, description="how long the broker keeps our session "
                                  "(queued requests) while we are away (MQTT 5)")
    heartbeat_s: float = Field(default=10.0, ge=0.1, le=3600, description="republish the retained online status "
                               "this often; clients call a host stale after 3 periods without one")
    status_expiry_s: int = Field(default=86400, ge=0, description="MQTT 5 message expiry of the online status: "
                                 "the broker forgets a host silent for this long (0: never)")
    reconnect_min_s: float = Field(default=0.1, gt=0)
    reconnect_max_s: float = Field(default=5.0, gt=0)

    max_payload_bytes: int = Field(default=65536, ge=256, le=64 << 20)
    max_concurrent_requests: int = Field(default=64, ge=1, le=10000, description="requests handled at once; "
                                         "more wait at the broker")
    request_timeout_s: float = Field(default=30.0, gt=0)
    call_timeout_s: float = Field(default=10.0, gt=0)
    allow_any_call: bool = Field(default=False, description="FOR LABS: let the call verbs run any kernel function "
                                 "(memset, ftrace's own...), not only those the image marks callable")
    shutdown_grace_s: float = Field(default=5.0, ge=0, description="on SIGTERM, time given to requests in flight")
    journal_keep: int = Field(default=10000, ge=100, description="answered requests kept for duplicate detection")
    journal_keep_s: float = Field(default=3600.0, ge=60, description="answered requests older than this are "
                                  "pruned (the dedup window in time; journal_keep bounds it in count)")
    journal_durable: bool = Field(default=False, description="fsync every journal commit (power-loss safe)")
    read_fast_path: bool = Field(default=True, description="a mutating request's fsync runs beside the event loop "
                                 "(group fsync), so read-only requests never wait for it; off: the fsync is part "
                                 "of its commit on the loop (the baseline of bench.mixed_load); durable either way")
    unsafe_skip_fsync: bool = Field(default=False, description="FOR BENCHMARKS ONLY: mutating requests and the "
                                    "desired state are not fsynced (what the durability contract costs: "
                                    "bench.patch_latency, bench.mqtt_latency); an OS crash can lose acknowledged "
                                    "changes")
    gil_switch_interval_ms: float = Field(default=0.2, gt=0, le=100, description="livepatchd serve's GIL switch "
                                          "interval: how long the event loop may wait for the GIL while a handler "
                                          "thread computes (CPython's default: 5)")

    trusted_keys_dir: Path | None = Field(default=None, description="a directory of Ed25519 public keys (PEM, "
                                          "*.pub or *.pem) whose signatures on patches are trusted")
    trusted_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="more trusted public key files (env: comma-separated paths or a JSON "
        "list); with no trusted key at all, every patch is refused")
    dev_signing_key: bool = Field(default=False, description="FOR DEMOS ONLY: generate a signing key pair in the "
                                  "host's state directory (dev-signing.key/.pub) and trust it")
    patch_restore_timeout_s: float = Field(default=30.0, gt=0, description="at boot, how long each re-enabled "
                                           "patch's transition may take before the daemon goes on")
    crash_loop_grace_s: float = Field(default=60.0, ge=0, description="a kernel panic within this long after a "
                                      "patch was enabled keeps that patch disabled at the next boot (0: off)")
    transition_stall_s: float = Field(default=1.0, gt=0, description="a transition still blocked after this "
                                      "long is reported stalled (event and state)")

    nr_cpus: int = Field(default=2, ge=1, le=8)
    tlb_mode: Literal["virtual", "cpu"] = Field(
        default="virtual", description="the vCPUs' TLB: virtual (Unicorn's virtual TLB, filled by native code with "
        "each region's permissions; guest stores several times cheaper) or cpu (Unicorn's emulated CPU TLB)")
    tcg_buffer_size_mb: int = Field(default=32, ge=1, le=1024, description="each vCPU engine's translation cache "
                                    "(a virtual reservation: resident memory grows only with the code translated)")
    kernel_build: str = Field(default=DEFAULT_RELEASE, description="the shipped guest kernel build to boot: "
                              + ", ".join(GUEST_BUILDS) + " (they differ in build id, function bodies and symbols)")
    kernel_release: str | None = Field(default=None, max_length=64, description="the kernel build's version string "
                                       "in the state (default: kernel_build's)")
    labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="attributes a fleet selects hosts by (zone, tier, role, ...), published "
        "in the state's components.labels (env: JSON object or k=v,k=v)")
    count_guest_instructions: bool = Field(default=False, description="exact guest instruction counts on /metrics "
                                           "(a block hook on every vCPU: the guest runs several times slower)")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus /metrics here "
                                     "(0: any free port); none: off")
    metrics_addr: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto", description="console: human-readable lines; json: one JSON object per line; auto: console "
        "on a terminal, JSON otherwise")

    @field_validator("kernel_build")
    @classmethod
    def _shipped_build(cls, value: str) -> str:
        if value not in GUEST_BUILDS:
            raise ValueError(f"unknown kernel build {value!r}; shipped builds: {', '.join(GUEST_BUILDS)}")
        return value

    @field_validator("host_id")
    @classmethod
    def _host_level(cls, value: str) -> str:
        if not _HOST_RE.match(value):
            raise ValueError("host_id must be 1-64 characters of A-Z a-z 0-9 _ -")
        return value

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [p.strip() for p in text.replace(os.pathsep, ",").split(",") if p.strip()]
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _label_map(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [p.strip() for p in text.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ValueError("labels: write k=v,k=v or a JSON object")
            return dict(p.split("=", 1) for p in pairs)
        return value

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            if not _LABEL_RE.match(k) or len(v) > 128:
                raise ValueError(f"label {k!r}: names are 1-64 characters of A-Z a-z 0-9 _ . -, values at most 128")
        return value

    @field_validator("broker_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_broker_urls(value)
        return value

    @property
    def journal_path(self) -> Path:
        return self.state_dir / self.host_id / "journal.sqlite3"

    @property
    def host_dir(self) -> Path:
        """This host's own state: the journal, the desired state, the demo signing key."""
        return self.state_dir / self.host_id

    @property
    def desired_path(self) -> Path:
        return self.host_dir / "desired.sqlite3"

    def trusted_key_paths(self) -> list[Path]:
        """Every configured public key file: ``trusted_keys``, then the directory's ``*.pub``/``*.pem`` sorted."""
        paths = list(self.trusted_keys)
        if self.trusted_keys_dir is not None:
            paths += sorted(p for p in self.trusted_keys_dir.iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
        return paths

    def brokers(self) -> tuple[BrokerAddress, ...] | None:
        """The configured broker's nodes with credentials merged (settings win over the URLs), or None: embedded.
        A CA file means TLS on every node."""
        if self.broker_url is None:
            return None
        password = self.password.get_secret_value() if self.password is not None else None
        return tuple(replace(node, tls=node.tls or self.tls_ca_file is not None,
                             username=self.username or node.username,
                             password=password if password is not None else node.password)
                     for node in parse_broker_urls(self.broker_url))

    def tls_context(self) -> ssl.SSLContext | None:
        nodes = self.brokers()
        if nodes is None or not any(node.tls for node in nodes):
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca_file) if self.tls_ca_file else None)
        if self.tls_cert_file is not None:
            ctx.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file) if self.tls_key_file else None)
        if self.tls_insecure:
            ctx.check_hostname = False
        return ctx
