"""The project's exception tree.

Every error the daemon reports carries a stable ``code`` (a short snake_case string that clients may match on)
and a message a person can act on. Layers subclass the branch that fits; the tree is::

    LivepatchdError
      GuestError            the emulated machine or its image misbehaved
        GuestFault            a vCPU faulted (unmapped access, bad instruction)
        GuestPanic            guest code called panic() or hit BUG()
        ImageError            the kernel image is missing, malformed or inconsistent
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


class GuestError(LivepatchdError):
    code = "guest_error"


class GuestFault(GuestError):
    code = "guest_fault"


class GuestPanic(GuestError):
    code = "guest_panic"


class ImageError(GuestError):
    code = "image_error"


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
