"""What the package declares: its license is the one in LICENSE; aiomqtt stays below 3 (the bridge acknowledges
requests through aiomqtt 2's private paho client, which 3.x no longer has). And what a non-editable install
holds: the native TLB fill library builds from the installed source and loads, from another working
directory; the library built for each supported host is a shared object of that machine exporting the fill
callback and needing nothing else (the aarch64 one is checked as a file here: it is loaded only on aarch64)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from mqtt_fixtures import REPO
from packaging.requirements import Requirement
from packaging.version import Version

from daemon.emu.native import build as native

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_license_file_matches_the_declared_license() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text.splitlines()[1]
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_aiomqtt_is_pinned_below_3() -> None:
    (aiomqtt,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("aiomqtt")]
    assert aiomqtt.specifier.contains(Version("2.5.1"))
    assert not aiomqtt.specifier.contains(Version("3.0.0"))
    assert not aiomqtt.specifier.contains(Version("3.0.0a1"), prereleases=True)


_LOAD_INSTALLED = """
import json, sys
from daemon.emu.native import build
from daemon.kernel.kernel import Kernel, KernelConfig
address = build.fill_callback_address()
with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0)) as k:
    table = k.machine.vcpus[0].fill_table
    result = k.call("bench_corpus", 2000, 1)
    print(json.dumps({"build": build.__file__, "source": str(build.SOURCE), "library": str(build.library_path()),
                      "address": address, "corpus": result, "fills": table.fills, "refused": table.refused}))
"""


def test_pip_install_builds_and_loads_the_native_fill_from_another_directory(tmp_path: Path) -> None:
    """``pip install .`` (not editable) into a target folder, run from elsewhere with a fresh cache: the library
    is built from the installed tlb_fill.c, has the committed bytes, and the installed kernel boots on it."""
    site, work, cache = tmp_path / "site", tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                          "--target", str(site), str(REPO)], cwd=work, capture_output=True, text=True, timeout=600,
                         check=False)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (site / "daemon" / "emu" / "native" / "tlb_fill.c").is_file()
    assert not (site / "daemon" / "emu" / "native" / "tlb_fill.c").is_symlink()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", native.CACHE_ENV, "XDG_CACHE_HOME")}
    env |= {"PYTHONPATH": str(site), native.CACHE_ENV: str(cache)}
    run = subprocess.run([sys.executable, "-c", _LOAD_INSTALLED], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(got["build"]).is_relative_to(site)  # the installed copy, not this checkout
    assert Path(got["source"]).is_relative_to(site)
    library = Path(got["library"])
    assert library.parent == cache / "native"
    assert hashlib.sha256(library.read_bytes()).hexdigest() == native.read_digests()[native.host_target()]
    assert got["address"] > 0
    assert got["corpus"] == 0  # no wrong result on the virtual TLB
    assert got["fills"] > 0
    assert got["refused"] == 0


_MACHINES = {"x86_64-linux-gnu": "EM_X86_64", "aarch64-linux-gnu": "EM_AARCH64"}


@pytest.mark.parametrize("target", sorted(native.TARGETS.values()))
def test_native_library_is_a_shared_object_of_its_machine_exporting_the_fill(tmp_path: Path, target: str) -> None:
    out = tmp_path / f"{target}.so"
    native.compile_to(target, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == native.read_digests()[target]
    with out.open("rb") as f:
        elf = ELFFile(f)
        assert elf.header["e_type"] == "ET_DYN"
        assert elf.header["e_machine"] == _MACHINES[target]
        assert elf.elfclass == 64
        assert elf.little_endian
        dynsym = elf.get_section_by_name(".dynsym")
        assert isinstance(dynsym, SymbolTableSection)
        (fill,) = [s for s in dynsym.iter_symbols() if s.name == native.SYMBOL]
        assert fill["st_info"]["type"] == "STT_FUNC"
        assert fill["st_info"]["bind"] == "STB_GLOBAL"
        assert fill["st_other"]["visibility"] == "STV_DEFAULT"
        assert fill["st_shndx"] != "SHN_UNDEF"
        assert fill["st_size"] > 0
        text = elf.get_section_by_name(".text")
        assert text is not None
        assert text["sh_addr"] <= fill["st_value"] < text["sh_addr"] + text["sh_size"]
        undefined = [s.name for s in dynsym.iter_symbols() if s.name and s["st_shndx"] == "SHN_UNDEF"]
        assert undefined == []  # freestanding: nothing to resolve on the host
        dynamic = elf.get_section_by_name(".dynamic")
        assert isinstance(dynamic, DynamicSection)
        assert [t for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED"] == []
