"""Typed wrappers around qemu-img."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from agent import procs
from agent.errors import InUse
from agent.volumes.qemu_objects import with_objects


def _run(argv: list[str], *, timeout: float, what: str, check: bool = True):
    """procs.run, turning qemu's image-lock refusal into InUse."""
    try:
        return procs.run(with_objects(argv), timeout=timeout, what=what, check=check)
    except procs.CommandFailed as e:
        if "lock" in e.stderr and "Failed to get" in e.stderr:
            raise InUse(
                f"{argv[-1] if argv else 'image'}: in use by another process (a running VM or qemu-nbd holds its lock)"
            ) from None
        raise


TIMEOUT = 600.0  # metadata operations are quick; rebase/convert get more


@dataclass(frozen=True)
class Bitmap:
    name: str
    flags: tuple[str, ...]
    granularity: int

    @property
    def consistent(self) -> bool:
        return "in-use" not in self.flags

    @property
    def enabled(self) -> bool:
        return "auto" in self.flags


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None
    backing_format: str | None
    bitmaps: tuple[Bitmap, ...] = field(default_factory=tuple)

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


@dataclass(frozen=True)
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None  # host offset in the layer at `depth`, when stored as it is
    compressed: bool = False


def info(path: str, *, force_share: bool = True, fmt: str | None = None) -> ImageInfo:
    argv = ["qemu-img", "info", "--output=json"]
    if force_share:
        argv.append("-U")
    if fmt:
        argv += ["-f", fmt]
    return _image_info(json.loads(_run(argv + [path], timeout=60, what="qemu-img info").stdout), path)


def chain_info(path: str) -> list[ImageInfo]:
    """Info of every layer of an image's backing chain, top first (one process)."""
    out = _run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", path], timeout=60, what="qemu-img info"
    ).stdout
    return [_image_info(d, d.get("filename", "")) for d in json.loads(out)]


def _image_info(d: dict, path: str) -> ImageInfo:
    bitmaps = ()
    spec = d.get("format-specific") or {}
    if spec.get("type") == "qcow2":
        bitmaps = tuple(
            Bitmap(b["name"], tuple(b.get("flags", [])), b.get("granularity", 0))
            for b in spec.get("data", {}).get("bitmaps", []) or []
        )
    return ImageInfo(
        path=path,
        format=d["format"],
        virtual_size=d["virtual-size"],
        actual_size=d.get("actual-size", 0),
        backing_filename=d.get("backing-filename"),
        backing_format=d.get("backing-filename-format"),
        bitmaps=bitmaps,
    )


def create(
    path: str,
    size: int | None = None,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    preallocation: str = "off",
    unsafe: bool = False,
) -> None:
    """unsafe: do not open the backing file (a running VM holds it)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size=65536,preallocation={preallocation}"]
    if backing:
        argv += ["-b", backing, "-F", backing_format or "qcow2"] + (["-u"] if unsafe else [])
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    _run(argv, timeout=TIMEOUT, what="qemu-img create")


def bitmap(path: str, op: str, name: str, *, source_file: str | None = None, source: str | None = None) -> None:
    """op: add (enabled), enable, disable, remove, or merge (source bitmap
    `source` of `source_file` into `name`)."""
    argv = ["qemu-img", "bitmap", "-f", "qcow2"]
    if op == "add":
        argv += ["--add", "--enable", "-g", "65536"]
    elif op in ("enable", "disable", "remove"):
        argv.append(f"--{op}")
    elif op == "merge":
        argv += ["--merge", source or name]
        if source_file:
            argv += ["-b", source_file, "-F", "qcow2"]
    else:
        raise ValueError(op)
    _run(argv + [path, name], timeout=TIMEOUT, what=f"qemu-img bitmap --{op}")


def rebase(
    path: str,
    backing: str | None,
    *,
    backing_format: str = "qcow2",
    unsafe: bool = False,
    timeout: float = 24 * 3600,
    on_percent=None,
    checkpoint=None,
) -> None:
    """Safe mode copies into `path` whatever differs between its old and new
    backing, so its guest-visible content stays the same (also when it is
    stopped half-way). With on_percent, progress is reported and
    checkpoint() may cancel."""
    argv = ["qemu-img", "rebase", "-f", "qcow2", "-b", backing or ""]
    if backing:
        argv += ["-F", backing_format]
    if unsafe:
        argv.append("-u")
    if on_percent is None:
        _run(argv + ["-q", path], timeout=timeout, what="qemu-img rebase")
    else:
        procs.run_with_progress(
            with_objects(argv + ["-p", path]),
            on_percent=on_percent,
            checkpoint=checkpoint or (lambda: None),
            timeout=timeout,
            what="qemu-img rebase",
        )


def resize(path: str, size: int) -> None:
    _run(["qemu-img", "resize", "-q", "-f", "qcow2", path, str(size)], timeout=TIMEOUT, what="qemu-img resize")


def map_image(path: str) -> list[MapEntry]:
    out = _run(["qemu-img", "map", "-U", "--output=json", path], timeout=TIMEOUT, what="qemu-img map").stdout
    return [
        MapEntry(
            e["start"],
            e["length"],
            e["depth"],
            e["present"],
            e["zero"],
            e["data"],
            e.get("offset"),
            bool(e.get("compressed", False)),
        )
        for e in json.loads(out)
    ]


def allocated_data(path: str) -> int:
    """Guest bytes holding data anywhere in the chain."""
    return sum(e.length for e in map_image(path) if e.present and e.data)


def check(path: str) -> dict:
    cp = _run(["qemu-img", "check", "-U", "--output=json", path], timeout=TIMEOUT, check=False, what="qemu-img check")
    return json.loads(cp.stdout) if cp.stdout.strip() else {"error": cp.stderr.strip()}


def ensure_not_in_use(path: str) -> None:
    """Raise InUse if a VM's qemu or a qemu-nbd holds the image: a plain
    `qemu-img info` needs the locks they hold."""
    info(path, force_share=False)


def convert_into(
    src: str,
    dst: str,
    *,
    on_percent,
    checkpoint,
    rate_limit: int = 0,
    src_format: str = "qcow2",
    timeout: float = 7 * 24 * 3600,
) -> None:
    """Copy src's guest content into the existing, empty qcow2 dst. Zero
    blocks stay holes (-S 4k, the default); stopping it half-way leaves dst
    partial, so callers delete dst then."""
    argv = [
        "qemu-img",
        "convert",
        "-p",
        "-U",
        "-n",
        "--target-is-zero",
        "-W",
        "-m",
        "8",
        "-f",
        src_format,
        "-O",
        "qcow2",
    ]
    if rate_limit:
        argv += ["-r", str(rate_limit)]
    procs.run_with_progress(
        with_objects(argv + [src, dst]),
        on_percent=on_percent,
        checkpoint=checkpoint,
        timeout=timeout,
        what="qemu-img convert",
    )
