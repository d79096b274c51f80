"""Paths a caller names must resolve inside the configured roots."""

from __future__ import annotations

import os

from agent.errors import InvalidArgument, PathNotAllowed


def resolve_under_roots(path: str, roots: list[str], field: str = "path") -> str:
    """The real path of `path`, if it lies under one of `roots`.

    Symlinks are resolved first, so a link inside a root that points outside
    it is refused too.
    """
    if not path:
        raise InvalidArgument(f"{field}: must not be empty", field=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidArgument(
            f"{field}: {path!r} may not contain control characters (NUL, newlines, tabs, ...)", field=field
        )
    if not os.path.isabs(path):
        raise InvalidArgument(f"{field}: must be an absolute path, got {path!r}", field=field)
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip("/") + "/"):
            return real
    raise PathNotAllowed(f"{field}: {path!r} is outside the agent's configured roots", field=field)
