"""Build the native objects (``python -m daemon.emu.native``) or check them (``--check``, as CI does)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from daemon.emu.native import HERE, SOURCE, TARGETS, object_path

# -g0 and a relative source path keep the bytes independent of where the tree lives; -O2 since the fill runs
# on every TLB miss.
_FLAGS = ["-shared", "-fPIC", "-O2", "-g0", "-nostdlib", "-Wall", "-Werror", "-Wl,--build-id=none"]


def build(arch: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", TARGETS[arch], *_FLAGS, "-o", str(out), SOURCE.name]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"building {SOURCE.name} for {arch} failed:\n{done.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.emu.native", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temporary directory and compare with the committed objects")
    args = parser.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in TARGETS:
            target = object_path(arch)
            out = Path(tmp) / target.name if args.check else target
            build(arch, out)
            if args.check and (not target.is_file() or target.read_bytes() != out.read_bytes()):
                stale.append(target.name)
            print(f"{'checked' if args.check else 'built'} {target.name} ({out.stat().st_size} bytes)")
    if stale:
        print(f"stale native objects: {', '.join(stale)}: run `python -m daemon.emu.native` and commit them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
