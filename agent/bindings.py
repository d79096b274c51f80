"""Start-up check of the Python bindings the agent needs.

The Debian-only bindings (rados, rbd, libnbd) are linked into the venv by
setup.sh; a missing one, or one built for another Python ABI, is reported
with the Debian package that provides it.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from agent.errors import BindingMissing

# module -> (package to install, what needs it)
REQUIRED = {
    "agent._native": ("blockferry itself (./setup.sh or 'pip install .')", "checksums, digests, diffs"),
    "grpc": ("grpcio (pip)", "the gRPC server"),
    "nbd": ("python3-libnbd (Debian), linked by ./setup.sh", "qcow2 volumes over NBD"),
    "rados": ("python3-rados (Debian), linked by ./setup.sh", "Ceph RBD pools"),
    "rbd": ("python3-rbd (Debian), linked by ./setup.sh", "Ceph RBD pools"),
}


@dataclass(frozen=True)
class BindingStatus:
    module: str
    package: str
    needed_for: str
    ok: bool
    error: str = ""


def check(modules: dict[str, tuple[str, str]] = REQUIRED) -> list[BindingStatus]:
    out = []
    for module, (package, needed_for) in modules.items():
        try:
            importlib.import_module(module)
            out.append(BindingStatus(module, package, needed_for, True))
        except Exception as e:  # ImportError, or an ABI error raised as something else
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            out.append(BindingStatus(module, package, needed_for, False, why))
    return out


def require(modules: dict[str, tuple[str, str]] = REQUIRED) -> list[BindingStatus]:
    """Raise BindingMissing naming every broken binding and its package."""
    statuses = check(modules)
    bad = [s for s in statuses if not s.ok]
    if bad:
        py = f"CPython {sys.version_info.major}.{sys.version_info.minor}"
        lines = [f"  {s.module} (needed for {s.needed_for}): {s.error}; install {s.package}" for s in bad]
        raise BindingMissing(
            f"missing or unloadable Python bindings under {py} (they must be built for CPython 3.11):\n"
            + "\n".join(lines)
        )
    return statuses
