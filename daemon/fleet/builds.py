"""The kernel builds a fleet host can run: version string -> committed guest image."""

from __future__ import annotations

from pathlib import Path

from daemon.guest.build import IMAGE_PATH

DEFAULT_RELEASE = "6.1-lp1"

BUILDS: dict[str, Path] = {DEFAULT_RELEASE: IMAGE_PATH}
"""Every shipped build, by release (``KernelState.release``)."""
