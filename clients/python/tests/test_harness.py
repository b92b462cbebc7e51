"""The test harness itself: where the rld binary comes from, and that a
missing one fails the suite under CI=true instead of skipping it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO_ROOT, find_rld

HERE = Path(__file__).resolve().parent


def fake_cargo(tmp_path: Path, target: Path) -> str:
    """A directory holding a ``cargo`` that answers ``metadata`` only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cargo = bin_dir / "cargo"
    reply = json.dumps({"target_directory": str(target), "packages": []})
    cargo.write_text(f"#!/bin/sh\n[ \"$1\" = metadata ] || exit 9\necho '{reply}'\n")
    cargo.chmod(0o755)
    return str(bin_dir)


def test_rld_bin_wins(monkeypatch, tmp_path):
    binary = tmp_path / "rld"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("RLD_BIN", str(binary))
    assert find_rld() == (str(binary), "")
    monkeypatch.setenv("RLD_BIN", str(tmp_path / "missing"))
    path, why = find_rld()
    assert path is None and "is not an executable file" in why


def test_otherwise_the_debug_binary_of_cargos_target_dir(monkeypatch, tmp_path):
    target = tmp_path / "target"
    monkeypatch.delenv("RLD_BIN", raising=False)
    monkeypatch.setenv("PATH", fake_cargo(tmp_path, target))
    path, why = find_rld()
    assert path is None and f"{target}/debug/rld does not exist" in why
    (target / "debug").mkdir(parents=True)
    (target / "debug" / "rld").write_text("#!/bin/sh\n")
    (target / "debug" / "rld").chmod(0o755)
    assert find_rld() == (str(target / "debug" / "rld"), "")


def test_without_cargo_it_says_to_set_rld_bin(monkeypatch, tmp_path):
    monkeypatch.delenv("RLD_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    path, why = find_rld()
    assert path is None and "set RLD_BIN" in why


@pytest.mark.parametrize(
    "ci,code,says",
    [("true", 1, "no rld binary: cannot ask cargo"), ("", 0, "1 skipped")],
)
def test_a_missing_binary_fails_under_ci_and_skips_otherwise(tmp_path, ci, code, says):
    env = dict(os.environ, RLD_BIN="", CI=ci, PATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{HERE / 'test_daemon.py'}::test_handshake_reports_the_server"],
        cwd=REPO_ROOT / "clients" / "python",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert says in output, output
