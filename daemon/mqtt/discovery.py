"""The daemon's side of discovery (``schemas.discovery``): answer a broadcast request with the current status.

Kept out of the request path: a discovery request is not a verb (no journal, no reply envelope), it is QoS 0,
and its only effect is one QoS 0 publish on the asker's own ``discover/reply/<client id>`` topic; a request
naming any other reply topic is ignored, so discovery cannot be used to make a daemon publish elsewhere.
"""

from __future__ import annotations

import aiomqtt
import structlog
from pydantic import ValidationError

from schemas.discovery import DiscoverRequest, valid_reply_to

log = structlog.get_logger(__name__)


async def answer(client: aiomqtt.Client, payload: bytes, status: bytes) -> bool:
    """Publish ``status`` where the request asks, if it may; whether an answer was sent."""
    try:
        request = DiscoverRequest.model_validate_json(payload)
    except ValidationError as exc:
        log.debug("discover_ignored", why="not a discover request", errors=exc.error_count())
        return False
    if not valid_reply_to(request.reply_to):
        log.info("discover_ignored", why="reply_to is not a discovery reply topic", reply_to=request.reply_to[:80])
        return False
    try:
        await client.publish(request.reply_to, status, qos=0)
    except aiomqtt.MqttError as exc:
        log.debug("discover_unanswered", error=str(exc))
        return False
    return True
