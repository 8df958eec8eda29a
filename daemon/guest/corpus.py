"""Generator of the guest's function corpus: many small patchable functions, like a real kernel's ~50,000.

Each function ``f_i`` is either a leaf ``x * mul + add`` or (every 8th, offset 1) a chained call
``f_{i-1}(x + mul) ^ add``; ``corpus_params`` describes each one so that guest load generators can check every
result. Names are built from kernel-like words (``mm_alloc_page_00042``) so that set_ftrace_filter globs such
as ``*alloc*`` select realistic subsets. Every file also defines a ``static corpus_helper``: the same name in
several objects, which kallsyms tells apart by position (``sympos``) as Linux does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

NR_FUNCTIONS = 10_240
PER_FILE = 640  # a multiple of 8, so a chained function and its callee share a file
SEED = 20261124

_SUBSYS = ["mm", "fs", "net", "blk", "sched", "irq", "tty", "ext4", "xfs", "tcp", "udp", "usb", "pci", "dma"]
_VERBS = ["alloc", "free", "get", "put", "init", "exit", "read", "write", "lookup", "update", "flush", "map"]
_NOUNS = ["page", "inode", "skb", "queue", "entry", "buffer", "node", "slot", "table", "range", "cache"]


@dataclass(frozen=True)
class CorpusVariant:
    """A kernel build's corpus: how many functions (a multiple of PER_FILE) and the seed of their constants.
    The names are drawn from one sequence, so a larger corpus starts with every function of a smaller one."""

    nr_functions: int = NR_FUNCTIONS
    params_seed: int = SEED + 1


DEFAULT_CORPUS = CorpusVariant()


def function_names(nr: int = NR_FUNCTIONS) -> list[str]:
    rng = random.Random(SEED)
    return [f"{rng.choice(_SUBSYS)}_{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}_{i:05d}" for i in range(nr)]


def _params(variant: CorpusVariant = DEFAULT_CORPUS) -> list[tuple[int, int, bool]]:
    rng = random.Random(variant.params_seed)
    return [(rng.getrandbits(32) | 1, rng.getrandbits(48), i % 8 == 1) for i in range(variant.nr_functions)]


def write_sources(out: Path, variant: CorpusVariant = DEFAULT_CORPUS) -> list[Path]:
    """Write corpus_NN.c files and corpus_table.c into ``out``; returns their paths in link order."""
    if variant.nr_functions % PER_FILE:
        raise ValueError(f"a corpus has a multiple of {PER_FILE} functions, not {variant.nr_functions}")
    names, params = function_names(variant.nr_functions), _params(variant)
    files: list[Path] = []
    for start in range(0, variant.nr_functions, PER_FILE):
        idx = start // PER_FILE
        lines = ['#include "kernel.h"', "", "static noinline u64 corpus_helper(u64 x)", "{",
                 f"\treturn x + {idx + 1};", "}", "", f"u64 corpus_dup_{idx:02d}(u64 x)", "{",
                 "\treturn corpus_helper(x);", "}", ""]
        for i in range(start, start + PER_FILE):
            mul, add, chained = params[i]
            body = (f"{names[i - 1]}(x + {mul:#x}ULL) ^ {add:#x}ULL" if chained else f"x * {mul:#x}ULL + {add:#x}ULL")
            lines += [f"noinline u64 {names[i]}(u64 x)", "{", f"\treturn {body};", "}", ""]
        path = out / f"corpus_{idx:02d}.c"
        path.write_text("\n".join(lines))
        files.append(path)
    table = ['#include "kernel.h"', ""]
    table += [f"u64 {n}(u64 x);" for n in names]
    table += ["", "const corpus_fn_t corpus_fns[] = {"] + [f"\t{n}," for n in names] + ["};", ""]
    table += ["const struct corpus_param corpus_params[] = {"]
    table += [f"\t{{ {m:#x}ULL, {a:#x}ULL, {int(c)} }}," for m, a, c in params] + ["};", ""]
    table += [f"const u64 corpus_nr = {variant.nr_functions};", ""]
    path = out / "corpus_table.c"
    path.write_text("\n".join(table))
    files.append(path)
    return files
