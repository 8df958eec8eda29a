"""The project's exception tree.

Every error the daemon reports carries a stable ``code`` (a short snake_case string that clients may match on)
and a message a person can act on. Layers subclass the branch that fits; the tree is::

    LivepatchdError
      GuestError            the emulated machine or its image misbehaved
        GuestFault            a vCPU faulted (unmapped access, bad instruction)
        GuestPanic            guest code called panic() or hit BUG()
        GuestCallTimeout      a host job did not return in time (it keeps running on its worker)
        ImageError            the kernel image is missing, malformed or inconsistent
        NativeBuildError      the emulator's native TLB fill callback cannot be built or loaded
      PatchError            a text-patching request was refused (nothing was written)
        PatchReadFault        the site could not be read            (Linux: -EFAULT)
        PatchMismatch         the site did not hold the expected insn (Linux: -EINVAL)
        PatchWriteFault       the site may not be written           (Linux: -EPERM)
        PatchMisaligned       the address is not 4-byte aligned     (Linux: -EINVAL)
      InsnError             an instruction cannot be encoded (e.g. a branch out of range)
      SymbolError           a symbol is unknown or ambiguous
      FtraceError           an ftrace request was refused (nothing changed)
        FilterNoMatch         a filter pattern selects no traceable function
        FtraceBusy            the function already has an IPMODIFY (or direct) owner (Linux: -EBUSY)
        OpsStateError         registering a registered ops, unregistering an unknown one
        BadDirectCall         a direct trampoline that is not in kernel or module text
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

# The root of the tree and the artifact-format refusals live with the artifact format, which lpctl uses too;
# they are re-exported here so that every layer keeps importing its errors from one place.
from patchformat.errors import (
    ArtifactError,
    BadSignature,
    BundleFormatError,
    KeyFileError,
    LivepatchdError,
    ManifestError,
    ManifestTampered,
    ObjectTampered,
    SignatureMissing,
    UntrustedKey,
)

__all__ = [
    "ArtifactError",
    "BadSignature",
    "BundleFormatError",
    "KeyFileError",
    "LivepatchdError",
    "ManifestError",
    "ManifestTampered",
    "ObjectTampered",
    "SignatureMissing",
    "UntrustedKey",
]


class GuestError(LivepatchdError):
    code = "guest_error"


class GuestFault(GuestError):
    code = "guest_fault"


class GuestPanic(GuestError):
    code = "guest_panic"


class GuestCallTimeout(GuestError):
    """A function called on a worker did not return within the caller's timeout. The guest cannot be made to
    drop it (no kernel can kill a kernel thread mid-function): it keeps its worker until it returns, and
    ``job`` resolves then, so the caller can report the late result."""

    code = "timeout"
    errno = -110  # -ETIMEDOUT

    def __init__(self, message: str, /, job: Future[int], **details: Any) -> None:
        super().__init__(message, **details)
        self.job = job


class ImageError(GuestError):
    code = "image_error"


class NativeBuildError(GuestError):
    code = "native_build_error"


class PatchError(LivepatchdError):
    code = "patch_error"


class PatchReadFault(PatchError):
    code = "text_read_fault"
    errno = -14  # -EFAULT


class PatchMismatch(PatchError):
    code = "text_mismatch"
    errno = -22  # -EINVAL


class PatchWriteFault(PatchError):
    code = "text_write_fault"
    errno = -1  # -EPERM


class PatchMisaligned(PatchError):
    code = "text_misaligned"
    errno = -22  # -EINVAL


class InsnError(LivepatchdError):
    code = "insn_error"


class BranchOutOfRange(InsnError):
    code = "branch_out_of_range"
    errno = -22  # -EINVAL, as ftrace_find_callable_addr's failure


class SymbolError(LivepatchdError):
    code = "unknown_symbol"


class AmbiguousSymbol(SymbolError):
    code = "ambiguous_symbol"


class FtraceError(LivepatchdError):
    code = "ftrace_error"
    errno = -22  # -EINVAL


class FilterNoMatch(FtraceError):
    code = "ftrace_filter_no_match"


class FtraceBusy(FtraceError):
    code = "ftrace_busy"
    errno = -16  # -EBUSY


class OpsStateError(FtraceError):
    code = "ftrace_ops_state"


class BadDirectCall(FtraceError):
    code = "ftrace_bad_direct_call"


# -- livepatch --
#
#   ModuleError             a relocatable object was refused by the module loader (nothing was mapped)
#     ModuleFormatError       not an AArch64 ET_REL ELF, or malformed (Linux: -ENOEXEC)
#     UnresolvedSymbol        an undefined symbol is neither in kallsyms nor in the object (Linux: -ENOENT)
#     UnsupportedRelocation   a relocation type the loader does not implement (Linux: -ENOEXEC)
#     RelocationOverflow      a relocated value does not fit its field (Linux: -ENOEXEC)
#     ModuleNoSpace           the module area cannot hold the object (Linux: -ENOMEM)
#     ModuleExists            a module of that name is already loaded (Linux: -EEXIST)
#     ModuleNotLoaded         unloading a module that is not (or no longer) loaded (Linux: -ENOENT)
#   ArtifactError           a patch artifact (bundle, manifest, key) was refused before anything was loaded
#     BundleFormatError       the bundle file is not a valid bundle
#     ManifestError           the manifest is not valid (schema, duplicates)
#     KeyFileError            a key file is not an Ed25519 PEM key of the expected kind
#     PatchBuildError         the guest toolchain failed to compile the patch source
#     SignatureMissing        the bundle carries no signature (Linux: -ENOKEY)
#     UntrustedKey            signed by a key that is not trusted (Linux: -ENOKEY)
#     BadSignature            the signature does not verify under the named key (Linux: -EKEYREJECTED)
#     ObjectTampered          the object is not the one that was signed (Linux: -EKEYREJECTED)
#     ManifestTampered        the manifest is not the one that was signed (Linux: -EKEYREJECTED)
#     BuildIdMismatch         the patch targets another kernel build (Linux: -EINVAL)
#     PatchFuncMissing        the object does not define a function the manifest names (Linux: -ENOENT)
#     OldFuncNotFound         an old function is not in kallsyms / no such sympos (Linux: -ENOENT)
#     OldFuncAmbiguous        an old function name is duplicated and no sympos says which (Linux: -EINVAL)
#     OldFuncNotTraceable     an old function has no patchable-entry record (Linux: -EINVAL)


class ModuleError(LivepatchdError):
    code = "module_error"
    errno = -8  # -ENOEXEC


class ModuleFormatError(ModuleError):
    code = "module_bad_elf"


class UnresolvedSymbol(ModuleError):
    code = "module_unresolved_symbol"
    errno = -2  # -ENOENT


class UnsupportedRelocation(ModuleError):
    code = "module_unsupported_relocation"


class RelocationOverflow(ModuleError):
    code = "module_relocation_overflow"


class ModuleNoSpace(ModuleError):
    code = "module_no_space"
    errno = -12  # -ENOMEM


class ModuleExists(ModuleError):
    code = "module_exists"
    errno = -17  # -EEXIST


class ModuleNotLoaded(ModuleError):
    code = "module_not_loaded"
    errno = -2  # -ENOENT


class PatchBuildError(ArtifactError):
    code = "patch_build_failed"


class BuildIdMismatch(ArtifactError):
    code = "patch_build_id_mismatch"


class PatchFuncMissing(ArtifactError):
    code = "patch_func_missing"
    errno = -2  # -ENOENT


class OldFuncNotFound(ArtifactError):
    code = "patch_old_func_not_found"
    errno = -2  # -ENOENT


class OldFuncAmbiguous(ArtifactError):
    code = "patch_old_func_ambiguous"


class OldFuncNotTraceable(ArtifactError):
    code = "patch_old_func_not_traceable"


# -- livepatch core --
#
#   LivepatchError          a livepatch request was refused (state untouched)
#     PatchNotFound           no loaded patch of that name (Linux: -ENOENT)
#     PatchStateError         the request does not fit the patch's state (Linux: -EINVAL), e.g. enabling twice
#     TransitionBusy          another patch is in transition (Linux: -EBUSY)
#     PatchIncompatible       its system states are older than or miss those installed (Linux: -EINVAL)
#     PatchInUse              unloading an enabled, forced or replaced-in-transition patch (Linux: -EBUSY)
#     CallbackFailed          a pre_patch callback returned an error (its -errno is kept)
#     PatchFtraceFailed       ftrace refused a patched function, e.g. an IPMODIFY conflict (Linux: -EBUSY)


class LivepatchError(LivepatchdError):
    code = "livepatch_error"
    errno = -22  # -EINVAL


class PatchNotFound(LivepatchError):
    code = "livepatch_not_found"
    errno = -2  # -ENOENT


class PatchStateError(LivepatchError):
    code = "livepatch_bad_state"


class TransitionBusy(LivepatchError):
    code = "livepatch_transition_busy"
    errno = -16  # -EBUSY


class PatchIncompatible(LivepatchError):
    code = "livepatch_incompatible"


class PatchInUse(LivepatchError):
    code = "livepatch_in_use"
    errno = -16  # -EBUSY


class CallbackFailed(LivepatchError):
    code = "livepatch_callback_failed"


class PatchFtraceFailed(LivepatchError):
    code = "livepatch_ftrace_failed"
    errno = -16  # -EBUSY


class KprobeError(LivepatchdError):
    """A kprobe request was refused (nothing was armed or changed)."""

    code = "kprobe_error"
    errno = -22  # -EINVAL


class KprobeRefused(KprobeError):
    """The address may not be probed: its instruction, its function or its place (Linux: -EINVAL)."""

    code = "kprobe_refused"


class KprobeExists(KprobeError):
    code = "kprobe_exists"
    errno = -17  # -EEXIST


class KprobeNotFound(KprobeError):
    code = "kprobe_not_found"
    errno = -2  # -ENOENT


class KprobeNoSpace(KprobeError):
    code = "kprobe_no_space"
    errno = -12  # -ENOMEM
