"""Definitions the controller attached at run time (pools, backup points):
one JSON file per uuid in a directory under the state dir (0700), each file
0600 (a definition may hold a password or secret) and replaced atomically,
so the agent starts again with what it served."""

from __future__ import annotations

import dataclasses
import json
import os


class AttachedDefinitions:
    def __init__(self, directory: str, section_type: type):
        self.directory = directory
        self.section_type = section_type

    def load(self) -> dict:
        """uuid -> section, for every definition kept."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            if name.endswith(".json"):
                with open(os.path.join(self.directory, name)) as f:
                    out[name[:-5]] = self.section_type(**json.load(f))
        return out

    def save(self, uuid: str, section) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, f"{uuid}.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(section), f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)

    def remove(self, uuid: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, f"{uuid}.json"))
        except FileNotFoundError:
            pass
