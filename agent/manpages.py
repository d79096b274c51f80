"""Manual pages and shell completions of `blockferry`, `blockferry-ctl` and `blockferry-restore`,
generated from their parsers (argparse-manpage, shtab) into `man/` and
`completions/`, which the wheel installs (share/man/man1,
share/bash-completion/completions). `python -m agent.manpages` writes
them; tests/test_cli.py keeps them equal to the parsers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import shtab

from agent import __version__

REPO = Path(__file__).resolve().parents[1]


def parsers() -> dict[str, argparse.ArgumentParser]:
    from agent.cli.app import parser as cli_parser
    from agent.ctl.app import parser as ctl_parser
    from agent.offline_restore import parser as restore_parser

    return {"blockferry": cli_parser(), "blockferry-ctl": ctl_parser(), "blockferry-restore": restore_parser()}


def manpage(p: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import Manpage  # a test and build tool, not needed at run time

    m = Manpage(p)
    m.date = ""  # reproducible: the page changes when the parser does, not every day
    m.source = f"blockferry {__version__}"
    m.manual = "blockferry manual"
    return str(m)


def files() -> dict[Path, str]:
    os.environ["COLUMNS"] = "80"  # argparse wraps help text to the terminal: the same everywhere
    out = {}
    for name, p in parsers().items():
        out[REPO / "man" / f"{name}.1"] = manpage(p)
        out[REPO / "completions" / name] = shtab.complete(p, shell="bash")
    return out


def main() -> int:
    for path, text in files().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
