"""lpctl signs and shows bundles in its own process with the daemon's artifact format (:mod:`patchformat`):
one key id, the same signed bytes, and refusals with the daemon's codes, the file left as it was."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import clients.cli.keys
import daemon.service.livepatch.trust
from clients.cli.main import app
from patchformat import signing
from patchformat.bundle import PatchBundle
from patchformat.manifest import Manifest

runner = CliRunner()
MANIFEST = {"name": "fix_cmdline", "build_id": "ab" * 20, "objects": [
    {"name": "vmlinux", "funcs": [{"old_name": "cmdline_proc_show", "new_name": "fixed_cmdline_proc_show"}]}]}


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"lpctl ran a subprocess: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def keypair(tmp_path: Path) -> dict[str, str]:
    result = runner.invoke(app, ["--json", "keys", "generate", "signer", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc: dict[str, str] = json.loads(result.stdout)
    return doc


def unsigned(tmp_path: Path) -> Path:
    path = tmp_path / "fix.lpb"
    PatchBundle(Manifest.from_dict(MANIFEST), b"\x7fELF not really an object").save(path)
    return path


def test_one_key_id_for_lpctl_and_the_daemon(tmp_path: Path) -> None:
    doc = keypair(tmp_path)
    public = signing.load_public_key(Path(doc["public_key"]))
    assert clients.cli.keys.key_id is signing.key_id is daemon.service.livepatch.trust.signing.key_id
    assert doc["key_id"] == signing.key_id(public)
    assert len(doc["key_id"]) == 64


def test_lpctl_signs_in_process_what_the_daemon_verifies(tmp_path: Path, no_subprocess: None) -> None:
    doc = keypair(tmp_path)
    path = unsigned(tmp_path)
    result = runner.invoke(app, ["--json", "patch", "sign", str(path), "--key", doc["private_key"]])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["ok"], out["name"], out["key_id"], out["funcs"]) == (True, "fix_cmdline", doc["key_id"],
                                                                     ["cmdline_proc_show"])
    signed = PatchBundle.load(path)
    expected = signing.sign(PatchBundle(Manifest.from_dict(MANIFEST), b"\x7fELF not really an object"),
                            signing.load_private_key(Path(doc["private_key"])))
    assert signed.to_bytes() == expected.to_bytes(), "Ed25519 is deterministic: the daemon's signature, byte for byte"
    public = signing.load_public_key(Path(doc["public_key"]))
    assert daemon.service.livepatch.trust.signing.verify(signed, [public]) == doc["key_id"]
    text = runner.invoke(app, ["patch", "sign", str(path), "--key", doc["private_key"],
                               "--out", str(tmp_path / "copy.lpb")])
    assert text.exit_code == 0
    assert text.stdout.strip() == f"{tmp_path / 'copy.lpb'}: fix_cmdline signed by {doc['key_id'][:16]}"


def test_lpctl_shows_a_bundle(tmp_path: Path, no_subprocess: None) -> None:
    path = unsigned(tmp_path)
    result = runner.invoke(app, ["patch", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (f"{path}: fix_cmdline for build {'ab' * 8}, unsigned, replaces "
                                     "cmdline_proc_show")
    doc = json.loads(runner.invoke(app, ["--json", "patch", "show", str(path)]).stdout)
    assert (doc["ok"], doc["build_id"], doc["key_id"]) == (True, "ab" * 20, None)


def test_bad_bundles_and_keys_are_refused_with_the_daemons_codes(tmp_path: Path, no_subprocess: None) -> None:
    doc = keypair(tmp_path)
    garbage = tmp_path / "garbage.lpb"
    garbage.write_bytes(b"{not json")
    result = runner.invoke(app, ["patch", "sign", str(garbage), "--key", doc["private_key"]])
    assert result.exit_code == 1
    assert "patch_bundle_malformed" in result.stderr
    assert garbage.read_bytes() == b"{not json", "nothing written"
    path = unsigned(tmp_path)
    before = path.read_bytes()
    result = runner.invoke(app, ["--json", "patch", "sign", str(path), "--key", doc["public_key"]])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "patch_key_invalid"
    assert path.read_bytes() == before
    result = runner.invoke(app, ["patch", "sign", str(path), "--key", str(tmp_path / "missing.key")])
    assert result.exit_code == 1
    assert "patch_key_invalid" in result.stderr
    result = runner.invoke(app, ["patch", "show", str(tmp_path / "missing.lpb")])
    assert result.exit_code == 1
    assert "patch_bundle_malformed" in result.stderr
