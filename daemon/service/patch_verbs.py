"""The live-patch verbs: load signed bundles, enable, disable, unload, list, info, force, transitions."""

from __future__ import annotations

from daemon.kernel.kernel import Kernel
from daemon.livepatch.core import Livepatch
from daemon.service.core import Service


def register(service: Service, kernel: Kernel, livepatch: Livepatch) -> None:
    """Serve the live-patch verbs of ``livepatch`` on ``service``."""
