"""Field rules shared by the routers; every refusal names the field."""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib

from agent.errors import InvalidArgument

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def uuid(value: str, field: str, *, required: bool = True) -> str:
    if not value and not required:
        return ""
    try:
        if str(uuidlib.UUID(value)) == value.lower():
            return value.lower()
    except (ValueError, AttributeError, TypeError):
        pass
    raise InvalidArgument(f"{field}: {value!r} is not a uuid", field=field)


def name(value: str, field: str) -> str:
    if not value or len(value) > 128:
        raise InvalidArgument(f"{field}: must be 1 to 128 characters", field=field)
    if any(c in value for c in "/\\") or value in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(
            f"{field}: {value!r} may not contain '/', '\\\\', control characters, or be '.' or '..'", field=field
        )
    return value


def host(value: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if _HOST.match(value or ""):
        return value
    raise InvalidArgument(f"{field}: {value!r} is not an IP address or host name", field=field)


def _control(value: str, field: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(
            f"{field}: {value!r} may not contain control characters (newlines, tabs, ...)", field=field
        )


def abs_path(value: str, field: str) -> str:
    _control(value, field)
    if not value.startswith("/") or any(p in (".", "..") for p in value.split("/")):
        raise InvalidArgument(f"{field}: {value!r} must be an absolute path without '.' or '..'", field=field)
    if len(value) > 1024:
        raise InvalidArgument(f"{field}: longer than 1024 characters", field=field)
    return value


def iqn(value: str, field: str) -> str:
    """An iSCSI target name: iqn.... or eui...., no separators or control characters."""
    if (
        not value.startswith("iqn.")
        and not value.startswith("eui.")
        or len(value) > 223
        or any(c in value for c in "/\\ ")
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise InvalidArgument(f"{field}: {value!r} must be the target IQN (iqn.... or eui....)", field=field)
    return value


def by_id_name(value: str, field: str) -> str:
    """A /dev/disk/by-id name (wwn-0x5000c500ad9285bb, scsi-..., as seed 002's
    Source and fc_device/list give it): one path component, no '..'."""
    _control(value, field)
    if not value or len(value) > 255 or value in (".", "..") or not all(c.isalnum() or c in "-_.:" for c in value):
        raise InvalidArgument(
            f"{field}: {value!r} is not a /dev/disk/by-id name (such as wwn-0x5000c500ad9285bb)", field=field
        )
    return value


def under_roots(path: str, roots: list[str], field: str, where: str) -> str:
    """A local path (already abs_path-checked) that lies under one of the
    roots an agent reported; PathNotAllowed naming the field otherwise."""
    import posixpath

    from agent.errors import PathNotAllowed

    norm = posixpath.normpath(path)
    if any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in map(posixpath.normpath, roots)):
        return path
    raise PathNotAllowed(
        f"{field}: {path!r} is not under the roots of {where} ({', '.join(sorted(roots)) or 'none'}); "
        "a local backup point is a directory below an agent's [agent] roots",
        field=field,
    )


def rbd_image(value: str, rados_pool: str, field: str) -> str:
    """An existing RBD image to adopt: its name, or "<rados pool>/<name>"
    naming this pool's RADOS pool."""
    pool, _, image = value.rpartition("/")
    if pool and pool != rados_pool:
        raise InvalidArgument(f"{field}: {value!r} names RADOS pool {pool!r}; this pool is {rados_pool!r}", field=field)
    if (
        not image
        or len(image) > 255
        or "@" in image
        or "/" in image
        or any(ord(c) < 32 or ord(c) == 127 for c in image)
    ):
        raise InvalidArgument(
            f"{field}: {value!r} must be an RBD image name (or {rados_pool}/<name>) without '@' or control characters",
            field=field,
        )
    return image


def rel_path(value: str, field: str) -> str:
    if not value:
        return ""
    _control(value, field)
    if value.startswith("/") or any(p in ("", ".", "..") for p in value.rstrip("/").split("/")):
        raise InvalidArgument(f"{field}: {value!r} must be a relative path without '..'", field=field)
    if len(value) > 1024:
        raise InvalidArgument(f"{field}: longer than 1024 characters", field=field)
    return value.rstrip("/")


def page(page_num: int, page_size: int) -> tuple[int, int]:
    """Seed paging: page_num counts from 1 (0 is the first page too);
    page_size 0 means everything."""
    if page_num < 0 or page_num > 10_000_000:
        raise InvalidArgument("page_num: must be 0 to 10000000", field="page_num")
    if page_size < 0 or page_size > 1000:
        raise InvalidArgument("page_size: must be 0 (all) to 1000", field="page_size")
    if page_size == 0:
        return 0, 0
    return (max(page_num, 1) - 1) * page_size, page_size


def bad(field: str, why: str) -> InvalidArgument:
    """The refusal of a field: "<field>: <why>", naming it."""
    return InvalidArgument(f"{field}: {why}", field=field)
