"""Dynamic ftrace on the emulated kernel: records, ops, filters, update plans, tracers and tracefs views.

This module is ftrace's public API: the layers above (livepatch, kprobes, the service) import from here, not from
its submodules, and never from the architecture's text patcher. :mod:`daemon.ftrace.tracefs` holds the
tracefs-format views (text files, as ``/sys/kernel/tracing`` prints them).
"""

from daemon.ftrace import tracefs
from daemon.ftrace.batch import BatchResult
from daemon.ftrace.core import REDIRECT_CALLBACK, Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer, GraphRecord
from daemon.ftrace.filter import terms as filter_terms
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.ftrace.records import DynFtrace, RecFlag, ftrace_call_adjust, func_addr, records_from
from daemon.ftrace.symbols import SymbolAt, SymbolLookup
from daemon.ftrace.tracer import FunctionProfiler, FunctionTracer, ProfileLine, TraceRecord

__all__ = [
    "REDIRECT_CALLBACK",
    "BatchResult",
    "DynFtrace",
    "Ftrace",
    "FtraceOps",
    "FunctionGraphTracer",
    "FunctionProfiler",
    "FunctionTracer",
    "GraphRecord",
    "OpsFlag",
    "ProfileLine",
    "RecFlag",
    "SymbolAt",
    "SymbolLookup",
    "TraceRecord",
    "filter_terms",
    "ftrace_call_adjust",
    "func_addr",
    "records_from",
    "tracefs",
]
