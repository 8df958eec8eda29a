"""The kprobe subsystem of the service: kprobes (:class:`KprobeSubsystem`), and kretprobes and fprobes
(:class:`RetprobeSubsystem`), registered through the API on one kernel."""

from daemon.service.kprobes.retprobes import RetprobeSubsystem
from daemon.service.kprobes.subsystem import KprobeSubsystem

__all__ = ["KprobeSubsystem", "RetprobeSubsystem"]
