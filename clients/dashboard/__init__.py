"""The fleet dashboard: a small ASGI app that follows the hosts' retained documents and events over MQTT and
pushes them, batched, to the browser over Server-Sent Events (``livepatchd dashboard``)."""

from clients.dashboard.app import create_app
from clients.dashboard.feed import FleetFeed

__all__ = ["FleetFeed", "create_app"]
