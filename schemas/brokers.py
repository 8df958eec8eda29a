"""How a broker is named and reached: the rules the daemon, the SDK and lpctl share.

* A broker is one or more nodes: ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS), several of them
  comma-separated or given as a list (a comma inside a password is written ``%2C``). Every node is the same
  broker (a cluster): a client connects to one at a time and resumes its session on whichever answers.
* ``Rotation``: which node to try next and how long to wait first. A failed node is left for the next one at
  once; only a whole round of failures backs off (doubling, up to a ceiling), so a dead node costs one attempt,
  not a backoff, and a dead cluster is not hammered.
* ``Negotiation``: the MQTT version per node for ``protocol="auto"``. MQTT 5 first; 3.1.1 at once when the node
  refuses 5 in its CONNACK, or closes the connection or stays silent before any CONNACK (RabbitMQ < 3.13 drops a
  v5 CONNECT without answering). A 3.1.1 retry that fails as well says the node is down, not that it lacks 5:
  the next attempt tries 5 again, so the choice always converges on what the node speaks. A CONNACK refusal of
  5 is taken for every node (one broker, one software); a silence only for the node that was silent.

Pure logic, no I/O: both ends apply it to their own MQTT client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

ProtocolSetting = Literal["auto", "5", "3.1.1"]
Protocol = Literal["5", "3.1.1"]
_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}


@dataclass(frozen=True)
class BrokerAddress:
    """One broker node, parsed from its URL."""

    hostname: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def url(self) -> str:
        """The URL without credentials (what logs and ``info`` show)."""
        return f"mqtt{'s' if self.tls else ''}://{self.where}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` (default port 1883) or ``mqtts://…`` (TLS, default 8883); a bare
    ``host[:port]`` means ``mqtt://``."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"mqtt://{text}")
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = _SCHEMES[parts.scheme]
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: only mqtt://[user:password@]host:port is understood")
    return BrokerAddress(parts.hostname, port, tls, unquote(parts.username) if parts.username else None,
                         unquote(parts.password) if parts.password else None)


def parse_broker_urls(value: str | Sequence[str]) -> tuple[BrokerAddress, ...]:
    """The nodes of one broker: a comma-separated string, a list of URLs, or a list of comma-separated strings.
    Empty entries, and one node named twice, are errors (a typo, not a second chance)."""
    items = [value] if isinstance(value, str) else list(value)
    urls = [part.strip() for item in items for part in item.split(",")]
    if not urls or any(not u for u in urls):
        raise ValueError(f"broker list {','.join(items)!r}: an empty entry (URLs are separated by single commas)")
    nodes = tuple(parse_broker_url(u) for u in urls)
    seen: set[str] = set()
    for node in nodes:
        if node.where in seen:
            raise ValueError(f"broker list names {node.where} twice")
        seen.add(node.where)
    return nodes


class Rotation:
    """Which node to try, and the wait before trying it."""

    def __init__(self, nodes: int, min_s: float, max_s: float) -> None:
        if nodes < 1:
            raise ValueError("a broker needs at least one node")
        self.nodes = nodes
        self.min_s, self.max_s = min_s, max_s
        self.index = 0
        self._delay = min_s
        self._failed_in_round = 0

    def connected(self) -> None:
        self._delay = self.min_s
        self._failed_in_round = 0

    def failed(self) -> float:
        """The current node failed (could not connect, or the connection was lost): move to the next one and
        return how long to wait before trying it. Within a round the next node is tried at once; after a round
        in which every node failed, the wait doubles (from ``min_s`` up to ``max_s``)."""
        self.index = (self.index + 1) % self.nodes
        self._failed_in_round += 1
        if self._failed_in_round < self.nodes:
            return 0.0
        self._failed_in_round = 0
        delay = self._delay
        self._delay = min(self._delay * 2, self.max_s)
        return delay


class Negotiation:
    """The MQTT version to speak to each node (see the module's docstring for ``auto``)."""

    def __init__(self, setting: ProtocolSetting, nodes: int) -> None:
        self.setting = setting
        first: Protocol = "3.1.1" if setting == "3.1.1" else "5"
        self._protocol: list[Protocol] = [first] * nodes
        self._tentative = [False] * nodes

    def protocol(self, node: int) -> Protocol:
        return self._protocol[node]

    def fall_back(self, node: int, *, refused: bool) -> bool:
        """A v5 attempt on ``node`` ended before a successful CONNACK: ``refused`` when the CONNACK said the
        version is not supported, else the connection closed or timed out first. True: retry now with 3.1.1."""
        if self.setting != "auto" or self._protocol[node] != "5":
            return False
        if refused:  # a definite answer: the nodes of one broker run the same software
            for other, tentative in enumerate(self._tentative):
                if self._protocol[other] == "5" or tentative:
                    self._protocol[other], self._tentative[other] = "3.1.1", False
            return True
        self._protocol[node] = "3.1.1"
        self._tentative[node] = True
        return True

    def answered(self, node: int) -> None:
        """``node`` sent a CONNACK in the version it was offered (accepted or refused for another reason, such as
        credentials): it speaks that version."""
        self._tentative[node] = False

    def failed(self, node: int) -> None:
        """Any other failure on ``node``: a tentative 3.1.1 (after a silent v5 attempt) is given up."""
        if self._tentative[node]:
            self._protocol[node] = "5"
            self._tentative[node] = False
