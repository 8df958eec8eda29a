"""Async Python client of livepatchd's MQTT API::

    async with LivepatchClient("mqtt://127.0.0.1:1883", "host-1") as c:
        info = await c.info()
        result = await c.call("work_chain", 5)
"""

from clients.sdk.client import LivepatchClient, RawReply, capture_replies, parse_broker_url
from clients.sdk.errors import BrokerUnreachable, ReplyError, RequestTimeout, SdkError, SubscriptionFailed
from clients.sdk.rollout_api import RolloutClient

__all__ = ["BrokerUnreachable", "LivepatchClient", "RawReply", "ReplyError", "RequestTimeout", "RolloutClient",
           "SdkError", "SubscriptionFailed", "capture_replies", "parse_broker_url"]
