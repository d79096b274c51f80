"""The house rules, checked before anything starts a server: ruff (lint,
import order and format), clang-format on native/, the import contract
(import-linter), the native glue's rules and strict types on the files
named in [tool.mypy]. conftest.py runs this module first, so a broken rule
fails in seconds, not after the whole suite."""

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


def test_clang_format_changes_nothing():
    sources = sorted(str(p.relative_to(REPO)) for p in (REPO / "native").rglob("*.[ch]"))
    _run(str(BIN / "clang-format"), "--dry-run", "--Werror", *sources)


def test_layers_import_only_downward():
    _run(str(BIN / "lint-imports"), "--no-cache")


@pytest.mark.timeout(300)
def test_the_typed_files_pass_strict_mypy():
    _run(sys.executable, "-m", "mypy", "--no-incremental")


def test_native_glue_and_library_layers_stay_apart():
    """Only module.c and the py_*.c glue include Python.h; only nfsio.c and
    iscsiio.c include their libraries' headers (docs/native.md)."""
    native = REPO / "native"
    owners = {"Python.h": None, "nfsc/libnfs.h": {"nfsio.c"}, "iscsi/iscsi.h": {"iscsiio.c"}}
    for path in sorted(native.glob("*.[ch]")):
        text = path.read_text()
        for header, allowed in owners.items():
            if f"#include <{header}>" not in text:
                continue
            if header == "Python.h":
                assert path.name == "pyglue.h", f"{path.name} includes Python.h: include pyglue.h in a py_*.c file"
            else:
                assert path.name in allowed, f"{path.name} includes {header}: only {sorted(allowed)} may"
    for path in sorted(native.glob("*.c")):
        glue = path.name == "module.c" or path.name.startswith("py_")
        assert ('#include "pyglue.h"' in path.read_text()) == glue, f"{path.name}: Python glue outside py_*.c"


def test_every_native_export_has_a_docstring():
    """Each function and method of agent._native says its signature first."""
    from agent import _native

    for name in dir(_native):
        obj = getattr(_native, name)
        if name.startswith("_"):
            continue
        if isinstance(obj, type):
            assert obj.__doc__, name
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert (member.__doc__ or "").startswith(attr + "("), f"{name}.{attr}"
        elif callable(obj):
            assert (obj.__doc__ or "").startswith(name + "("), name
