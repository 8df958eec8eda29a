"""kallsyms lookups, including duplicated local symbols told apart by sympos."""

from __future__ import annotations

import pytest

from daemon.errors import AmbiguousSymbol, SymbolError
from daemon.guest import build
from daemon.kernel.kallsyms import Kallsyms
from daemon.kernel.kernel import load_image


@pytest.fixture(scope="module")
def kallsyms() -> Kallsyms:
    return load_image(build.IMAGE_PATH)[1]


def test_lookup_and_describe(kallsyms: Kallsyms) -> None:
    sym = kallsyms.lookup("cmdline_proc_show")
    assert sym.is_func
    assert sym.size > 0
    assert kallsyms.containing(sym.addr + 4) == sym
    assert kallsyms.describe(sym.addr + 8) == f"cmdline_proc_show+0x8/{sym.size:#x}"


def test_duplicates_need_sympos(kallsyms: Kallsyms) -> None:
    """corpus_helper is a static function in 16 objects: sympos picks one, in address order."""
    dups = kallsyms.all("corpus_helper")
    assert len(dups) == 16
    with pytest.raises(AmbiguousSymbol) as err:
        kallsyms.lookup("corpus_helper")
    assert err.value.code == "ambiguous_symbol"
    assert [kallsyms.lookup("corpus_helper", i + 1).addr for i in range(16)] == sorted(d.addr for d in dups)
    with pytest.raises(SymbolError, match="no position 17"):
        kallsyms.lookup("corpus_helper", 17)


def test_unknown_symbol(kallsyms: Kallsyms) -> None:
    with pytest.raises(SymbolError) as err:
        kallsyms.lookup("no_such_function")
    assert err.value.code == "unknown_symbol"
    assert kallsyms.containing(0x1000) is None
