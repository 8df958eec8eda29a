"""The kprobe subsystem of the service: probes registered through the API, served for one kernel by
:class:`KprobeSubsystem`."""

from daemon.service.kprobes.subsystem import KprobeSubsystem

__all__ = ["KprobeSubsystem"]
