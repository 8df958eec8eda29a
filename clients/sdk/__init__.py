"""Async Python client of livepatchd's MQTT API::

    async with LivepatchClient("mqtt://127.0.0.1:1883", "host-1") as c:
        info = await c.info()
        result = await c.call("work_chain", 5)

    async with FleetClient("mqtt://127.0.0.1:1883") as fleet:
        eu = await fleet.hosts(HostFilter(labels={"zone": "eu"}, state="online"))
"""

from clients.sdk.client import LivepatchClient, RawReply, capture_replies, parse_broker_url
from clients.sdk.errors import BrokerUnreachable, ReplyError, RequestTimeout, SdkError, SubscriptionFailed
from clients.sdk.fleet import FleetClient, HostChange, HostFilter, HostPatch, HostRecord, parse_label
from clients.sdk.rollout_api import RolloutClient

__all__ = ["BrokerUnreachable", "FleetClient", "HostChange", "HostFilter", "HostPatch", "HostRecord",
           "LivepatchClient", "RawReply", "ReplyError", "RequestTimeout", "RolloutClient", "SdkError",
           "SubscriptionFailed", "capture_replies", "parse_broker_url", "parse_label"]
