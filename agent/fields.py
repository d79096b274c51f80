"""Rules for fields that name places on storage servers, shared by the
agent's config, its drivers and stores, and the controller's API: every
refusal names the field."""

from __future__ import annotations

import posixpath
import re
from typing import Protocol
from urllib.parse import urlsplit

from agent.errors import InvalidArgument

_URL_SAFE = re.compile(r"^[A-Za-z0-9._/-]+$")


def check_nfs_export(export: str, field: str = "export") -> str:
    """An NFS pool's export path: absolute, no '..', and only characters
    that stay themselves inside qemu's nfs:// URLs."""
    if not export.startswith("/") or not _URL_SAFE.match(export) or ".." in export.split("/"):
        raise InvalidArgument(
            f"{field}: {export!r} must be an absolute export path of letters, digits and ._-/ "
            "without '..' (it becomes part of nfs:// URLs)",
            field=field,
        )
    return posixpath.normpath(export)


def check_nfs_server(server: str, field: str = "ip") -> str:
    """An NFS pool's server: an IPv4 address or a host name (an IPv6 literal
    would need brackets in the URLs, which libnfs does not take)."""
    if not server or ":" in server or "/" in server or "?" in server or "@" in server:
        raise InvalidArgument(f"{field}: {server!r}: an nfs pool needs an IPv4 address or a host name", field=field)
    return server


def check_sub_dir(value: str, field: str = "sub_dir") -> str:
    """A relative path below root_dir: no '..', no absolute path."""
    value = value.rstrip("/") if value else ""
    if not value:
        return ""
    if value.startswith("/") or any(p in ("", ".", "..") for p in value.split("/")):
        raise InvalidArgument(f"{field}: {value!r} must be a plain relative path (no '..')", field=field)
    return value


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MIN_PART = 5 << 20


def is_bucket(value: str) -> bool:
    """An S3 bucket name as AWS and RGW accept it: 3-63 of a-z 0-9 . -"""
    return bool(_BUCKET.match(value)) and ".." not in value


def endpoint_host(value: str) -> str:
    """The host of an S3 endpoint URL http(s)://host[:port] (no path, query
    or credentials), or "" when it is not one."""
    try:
        u = urlsplit(value)
        u.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return ""
    if u.scheme not in ("http", "https") or not u.hostname or u.path.strip("/") or u.query or u.username:
        return ""
    return u.hostname


class S3Fields(Protocol):
    """What check_s3 reads of a backup point's settings."""

    endpoint: str
    bucket: str
    username: str
    secret: str
    part_size: int


def check_s3(bp: S3Fields, label: str) -> None:
    """An S3 backup point's endpoint, bucket, credentials and part size."""
    from agent.errors import ConfigError

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"[{label}] {key}: {why}", field=f"{label}.{key}")

    if not endpoint_host(bp.endpoint):
        raise bad("endpoint", f"must be http(s)://host[:port] without path or credentials, not {bp.endpoint!r}")
    if not is_bucket(bp.bucket):
        raise bad("bucket", f"{bp.bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    if not bp.username or not bp.secret:
        raise bad("username", "s3 needs username (the access key) and secret (the secret key)")
    if bp.part_size < MIN_PART:
        raise bad("part_size", "must be at least 5 MiB (5242880)")
