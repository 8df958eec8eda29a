"""The kernel builds a fleet host can run: version string -> committed guest image (``daemon.guest.build``)."""

from __future__ import annotations

from pathlib import Path

from daemon.guest.build import DEFAULT_RELEASE, GUEST_BUILDS

__all__ = ["BUILDS", "DEFAULT_RELEASE"]

BUILDS: dict[str, Path] = {release: b.image for release, b in GUEST_BUILDS.items()}
"""Every shipped build, by release (``KernelState.release``)."""
