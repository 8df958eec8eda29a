"""Shared fixtures: a real emulated kernel booted from the committed image."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.kernel.kernel import Kernel, KernelConfig


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    """A freshly booted 2-vCPU kernel, shut down after the test."""
    with Kernel(KernelConfig(nr_cpus=2)) as k:
        yield k
        k.machine.check()


from mqtt_fixtures import lpd, mosquitto  # noqa: E402  (the service tests' broker and daemon)

__all__ = ["lpd", "mosquitto"]
