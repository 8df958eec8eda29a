"""Discovery without retained wildcards: a broadcast request every host answers.

Retained ``status`` documents reach a wildcard subscription (``livepatch/v1/+/status``) on Mosquitto and NATS,
but never on RabbitMQ's MQTT plugin. So a client may also publish a ``DiscoverRequest`` on ``DISCOVER``
(QoS 0: a host that is away should not answer late); every online daemon answers with its current status on the
request's ``reply_to``, which must be ``livepatch/discover/v1/reply/<one level>`` (a daemon publishes nowhere
else for it).
"""

from __future__ import annotations

from pydantic import Field

from schemas._base import Inbound, RequestId
from schemas.topics import _check_level, publish_topic_problem

DISCOVER = "livepatch/discover/v1"
"""Outside ``livepatch/v1/<host>/…``, so that no host id can collide with it."""
DISCOVER_REPLY_PREFIX = f"{DISCOVER}/reply/"


def discover_reply(client_id: str) -> str:
    """A client's own discovery reply topic (an ACL can match it with ``%c``)."""
    return DISCOVER_REPLY_PREFIX + _check_level(client_id, "client id")


def valid_reply_to(topic: str) -> bool:
    """Whether a daemon may answer a discovery request there: ``…/discover/v1/reply/<one level>``, nothing else."""
    if not topic.startswith(DISCOVER_REPLY_PREFIX):
        return False
    try:
        _check_level(topic[len(DISCOVER_REPLY_PREFIX):], "client id")
    except ValueError:
        return False
    # a control or non-character would make Mosquitto drop the daemon's connection for one QoS 0 answer
    return publish_topic_problem(topic) is None


class DiscoverRequest(Inbound):
    """Published on ``livepatch/discover/v1``; each online host answers with its ``StatusDoc`` on ``reply_to``."""

    request_id: RequestId
    reply_to: str = Field(max_length=256, description="livepatch/discover/v1/reply/<client id>")
