"""The live-patch subsystem of the service, served for one :class:`~daemon.livepatch.core.Livepatch` by
:class:`LivepatchSubsystem` (``subsystem.py`` tells how its parts fit)."""

from daemon.service.livepatch.desired import KIND, RestoreReport
from daemon.service.livepatch.subsystem import LivepatchSubsystem, decode_bundle
from daemon.service.livepatch.trust import NoTrustedKeys, dev_signing_key, trusted_keys

__all__ = ["KIND", "LivepatchSubsystem", "NoTrustedKeys", "RestoreReport", "decode_bundle", "dev_signing_key",
           "trusted_keys"]
