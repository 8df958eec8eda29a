"""Shared fixtures: a real emulated kernel booted from the committed image."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from daemon.ftrace.core import Ftrace
from daemon.guest import abi
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


@pytest.fixture
def ftrace(kernel: Kernel) -> Ftrace:
    """ftrace on a fresh kernel."""
    return Ftrace(kernel)


@pytest.fixture
def loaded(ftrace: Ftrace) -> Iterator[Ftrace]:
    """``ftrace`` with the mixed workload running on every vCPU."""
    k = ftrace.kernel
    k.set_load(abi.LOADGEN_MIX)
    time.sleep(0.05)
    yield ftrace
    k.set_load(abi.LOADGEN_OFF)


from mqtt_fixtures import lpd, mosquitto  # noqa: E402  (the service tests' broker and daemon)

__all__ = ["lpd", "mosquitto"]
