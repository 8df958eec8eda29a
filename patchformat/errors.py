"""The root of livepatchd's exception tree, and the refusals of the artifact format.

Every error livepatchd reports carries a stable ``code`` (a short snake_case string that clients may match on)
and a message a person can act on. The root is here, in the lowest package, because both the daemon and lpctl
raise the artifact refusals; :mod:`daemon.errors` re-exports all of these and holds the rest of the tree.
"""

from __future__ import annotations

from typing import Any


class LivepatchdError(Exception):
    """Base of every error raised on purpose by livepatchd."""

    code: str = "internal"
    errno: int = 0

    def __init__(self, message: str, /, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """The error as the ``error`` member of a reply."""
        return {"code": self.code, "message": self.message, "details": self.details}


class ArtifactError(LivepatchdError):
    code = "patch_artifact_error"
    errno = -22  # -EINVAL


class BundleFormatError(ArtifactError):
    code = "patch_bundle_malformed"


class ManifestError(ArtifactError):
    code = "patch_manifest_invalid"


class KeyFileError(ArtifactError):
    code = "patch_key_invalid"


class SignatureMissing(ArtifactError):
    code = "patch_signature_missing"
    errno = -126  # -ENOKEY


class UntrustedKey(ArtifactError):
    code = "patch_signature_untrusted"
    errno = -126  # -ENOKEY


class BadSignature(ArtifactError):
    code = "patch_signature_invalid"
    errno = -129  # -EKEYREJECTED


class ObjectTampered(ArtifactError):
    code = "patch_object_tampered"
    errno = -129  # -EKEYREJECTED


class ManifestTampered(ArtifactError):
    code = "patch_manifest_tampered"
    errno = -129  # -EKEYREJECTED
