"""The ftrace verbs: ops with filters, tracefs views, the function tracer and hijacks (redirects)."""

from __future__ import annotations

from daemon.ftrace.core import Ftrace
from daemon.kernel.kernel import Kernel
from daemon.service.core import Service


def register(service: Service, kernel: Kernel, ftrace: Ftrace) -> None:
    """Serve the ftrace verbs of ``ftrace`` on ``service``."""
