"""The ftrace subsystem of the service: ops, hijacks, the tracers and the function profiler, served for one
kernel's ftrace by :class:`FtraceSubsystem` (``subsystem.py`` tells how its parts fit)."""

from daemon.service.ftrace.subsystem import FtraceSubsystem, RestoreReport

__all__ = ["FtraceSubsystem", "RestoreReport"]
