"""The house rules, checked before anything starts a server: ruff (lint,
import order and format), the import contract (import-linter) and strict types on the
files named in [tool.mypy]. conftest.py runs this module first, so a
broken rule fails in seconds, not after the whole suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.agents import REPO

BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    p = subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"


def test_ruff_finds_nothing():
    _run(str(BIN / "ruff"), "check", "--no-cache", "agent", "tests", "bench", "setup.py")


def test_ruff_format_changes_nothing():
    _run(str(BIN / "ruff"), "format", "--check", "--no-cache", "agent", "tests", "bench", "setup.py")


def test_layers_import_only_downward():
    _run(str(BIN / "lint-imports"), "--no-cache")


@pytest.mark.timeout(300)
def test_the_typed_files_pass_strict_mypy():
    _run(sys.executable, "-m", "mypy", "--no-incremental")
