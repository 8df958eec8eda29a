"""Shared fixtures: a real emulated kernel booted from the committed image."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.kernel.kernel import Kernel, KernelConfig


def booted(nr_cpus: int = 2) -> Iterator[Kernel]:
    with Kernel(KernelConfig(nr_cpus=nr_cpus)) as k:
        yield k
        k.machine.check()


@pytest.fixture(scope="module")
def module_kernel() -> Iterator[Kernel]:
    """One booted 2-vCPU kernel shared by a test file whose tests undo what they do."""
    yield from booted()


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    """A freshly booted 2-vCPU kernel, shut down after the test."""
    yield from booted()


from mqtt_fixtures import lpd, mosquitto  # noqa: E402  (the service tests' broker and daemon)

__all__ = ["lpd", "mosquitto"]
