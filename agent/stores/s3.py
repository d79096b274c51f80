"""An S3 backup point: objects under a prefix of a bucket, through boto3.

A small object (a manifest, an index, a lock record) is one PUT, visible
and durable when the gateway answers. A pack is a multipart upload: parts
of `part_size` bytes are sent as they fill (one in flight per writer, so a
writer holds at most one part in memory), and CompleteMultipartUpload makes
the object appear whole; an aborted or crashed writer leaves only an
incomplete upload, which sweep_partial() aborts. `publish(create_only=True)`
is a conditional PUT (If-None-Match: *): of two writers racing to create a
repository, the gateway lets exactly one win.

Reads are ranged GETs copied into the caller's buffer. Every call goes
through botocore's standard retry mode (5xx, throttling, timeouts and
dropped connections, with backoff), and ends in one of the store errors
(TargetUnreachable, AccessDenied, NotFound, ...) naming the backup point
and the object, never the credentials.

Ceph RGW 16.2 refuses the aws-chunked CRC32 trailers newer boto3 sends:
checksums are computed and validated only when an operation requires
them (../shared/notes/facts.md, "Ceph RGW").
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.errors import (
    AccessDenied,
    AlreadyExists,
    AuthFailed,
    BlockferryError,
    FailedPrecondition,
    NoSpace,
    NotFound,
    StorageIOError,
    TargetUnreachable,
)
from agent.stores.base import Buffer, ObjectStore, ObjectWriter, StoreFacts, StoreStats, check_object_name

log = logging.getLogger("agent.stores")

MIN_PART = 5 << 20  # S3's smallest part (but the last)
UNBOUNDED = 1 << 60  # what stats() reports when the gateway sets no quota


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    concurrent_writers = True
    noun = "backup point"  # what errors call it

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        prefix: str,
        *,
        access_key: str,
        secret_key: str,
        region: str = "",
        timeout: float = 30.0,
        part_size: int = 16 << 20,
        max_attempts: int = 8,
        outage: float = 60.0,
        label: str = "",
    ):
        self.endpoint, self.bucket = endpoint, bucket
        self.prefix = prefix.strip("/")
        self.label = label or f"{endpoint}/{bucket}/{self.prefix}"
        self.part_size = max(part_size, MIN_PART)
        self._creds = (access_key, secret_key)
        self.region = region or "us-east-1"
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.outage = outage
        self._local = threading.local()

    # ---- the client ----

    @property
    def client(self) -> Any:
        """One boto3 client per thread (a client is thread-safe, but its
        connection pool is sized for one thread's calls here)."""
        c = getattr(self._local, "client", None)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StorageIOError("the S3 client (boto3) is not installed") from None
            cfg = Config(
                region_name=self.region,
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": self.max_attempts},
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            c = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self._creds[0],
                aws_secret_access_key=self._creds[1],
                config=cfg,
            )
            self._local.client = c
        return c

    def ride_outage(self, what: str, call: Callable[[], Any]) -> Any:
        """call() again while the gateway does not answer at all (connection
        refused or dropped, after botocore's own retries), for up to
        `outage` seconds from the first such failure: a gateway restart
        takes longer than botocore's backoff covers. An answer with an
        error code is final at once."""
        deadline, delay = 0.0, 1.0
        while True:
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - botocore's errors
                now = time.monotonic()
                deadline = deadline or now + self.outage
                if _code(e) or now >= deadline:
                    raise
                log.warning(
                    "the gateway does not answer; trying again",
                    extra={"backup_point": self.label, "object": what, "error": type(e).__name__},
                )
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 10.0)

    def key(self, name: str) -> str:
        check_object_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def error(self, what: str, e: Exception) -> BlockferryError:
        """A boto3/botocore error as a store error: names the backup point and
        what was being done, and keeps the gateway's reason."""
        code = _code(e)
        message = f"{self.noun} {self.label}: {what}: {code or type(e).__name__}"
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(message, field="name")
        if code == "NoSuchBucket":
            return TargetUnreachable(f"{message} (bucket {self.bucket})", field="backup_point_uuid")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return AuthFailed(message, field="backup_point_uuid")
        if code in ("AccessDenied", "403"):
            return AccessDenied(message, field="backup_point_uuid")
        if code in ("QuotaExceeded", "EntityTooLarge"):
            return NoSpace(message, field="backup_point_uuid")
        if code in ("PreconditionFailed", "412"):
            return AlreadyExists(message, field="name")
        if not code:  # no answer at all: connection refused, timeouts after the retries
            return TargetUnreachable(f"{message}: {e}", field="backup_point_uuid")
        return StorageIOError(message, field="backup_point_uuid")

    # ---- writing ----

    def open_writer(self, name: str, *, durable: bool = True) -> ObjectWriter:
        return _S3Writer(self, name)

    def publish(self, name: str, data: bytes, *, durable: bool = True, create_only: bool = False) -> None:
        kw = {"IfNoneMatch": "*"} if create_only else {}
        try:
            body = bytes(data)
            self.ride_outage(
                name, lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=body, **kw)
            )
        except Exception as e:  # noqa: BLE001 - botocore's errors, mapped in one place
            raise self.error(f"cannot write {name}", e) from None

    # ---- reading ----

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        kw = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **kw)
            return r["Body"].read()
        except Exception as e:  # noqa: BLE001
            if _code(e) == "InvalidRange":  # reading at or past the end
                return b""
            raise self.error(f"cannot read {name}", e) from None

    def read_into(self, name: str, offset: int, buf: Buffer) -> int:
        view = memoryview(buf).cast("B")
        data = self.get(name, offset, len(view))
        view[: len(data)] = data
        return len(data)

    def size(self, name: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"])
        except Exception as e:  # noqa: BLE001
            raise self.error(f"cannot find {name}", e) from None

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        full = self.key(prefix) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rest = obj["Key"][len(full) :]
                    if rest:
                        out.append(f"{prefix}/{rest}" if prefix else rest)
        except Exception as e:  # noqa: BLE001
            raise self.error(f"cannot list {prefix or '/'}", e) from None
        return sorted(out)

    def delete(self, name: str) -> None:
        """Gone for every reader at once; on a versioned bucket (object lock
        turns versioning on) the versions are removed too, to give the
        space back, except those a retention still holds: gc's purge()
        takes them when it ends."""
        key = self.key(name)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            if _code(e) not in ("NoSuchKey", "404"):
                raise self.error(f"cannot delete {name}", e) from None
        if self._versioned():
            self._drop_versions(key, keep_latest=False)

    def _versioned(self) -> bool:
        v = getattr(self, "_versioning", None)
        if v is None:
            try:
                v = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status", "") in ("Enabled", "Suspended")
            except Exception as e:  # noqa: BLE001
                if _code(e) not in ("AccessDenied", "403"):
                    raise self.error("cannot read the bucket's versioning", e) from None
                # keys limited to object operations: deletes still hide objects; older
                # versions, if any, stay until the bucket's lifecycle rules remove them
                log.warning("the keys may not read the bucket's versioning", extra={"backup_point": self.label})
                v = False
            self._versioning = v
        return v

    def _drop_versions(self, key: str, *, keep_latest: bool) -> int:
        """Delete a key's versions (all, or all but a latest object
        version), then its delete markers once no version is left under
        them (removing a marker over a kept version would bring it back).
        A version under retention is skipped."""
        try:
            r = self.client.list_object_versions(Bucket=self.bucket, Prefix=key)
        except Exception as e:  # noqa: BLE001
            raise self.error(f"cannot list the versions of {key}", e) from None
        versions = [v for v in r.get("Versions", []) if v["Key"] == key]
        markers = [m for m in r.get("DeleteMarkers", []) if m["Key"] == key]
        n = left = 0
        for v in versions:
            if keep_latest and v.get("IsLatest"):
                left += 1
                continue
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=v["VersionId"])
                n += 1
            except Exception as e:  # noqa: BLE001
                if _code(e) not in ("AccessDenied", "403"):  # held by a retention: later
                    raise self.error(f"cannot delete a version of {key}", e) from None
                left += 1
        if not left:
            for m in markers:
                self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=m["VersionId"])
                n += 1
        return n

    def purge(self, prefix: str) -> int:
        """The older versions and delete markers directly under a prefix
        whose retention ended (what delete() could not remove yet)."""
        if not self._versioned():
            return 0
        full = self.key(prefix.strip("/")) + "/"
        keys = set()
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                keys.update(v["Key"] for v in page.get("Versions", []) if not v.get("IsLatest"))
                keys.update(m["Key"] for m in page.get("DeleteMarkers", []))
        except Exception as e:  # noqa: BLE001
            raise self.error(f"cannot list the versions under {prefix}", e) from None
        return sum(self._drop_versions(k, keep_latest=True) for k in sorted(keys))

    def retain(self, name: str, until: float, mode: str) -> None:
        """The gateway's retention on the object's current version until a
        date (never shortened: a later one is kept)."""
        key = self.key(name)
        when = datetime.fromtimestamp(math.ceil(until), UTC)
        try:
            cur = self.client.get_object_retention(Bucket=self.bucket, Key=key).get("Retention", {})
            if cur.get("RetainUntilDate") and cur["RetainUntilDate"] >= when:
                return
        except Exception as e:  # noqa: BLE001
            code = _code(e)
            if code == "InvalidRequest":
                raise self._no_lock(mode) from None
            if code not in ("NoSuchObjectLockConfiguration", "ObjectLockConfigurationNotFoundError"):
                raise self.error(f"cannot read the retention of {name}", e) from None
        try:
            self.client.put_object_retention(
                Bucket=self.bucket, Key=key, Retention={"Mode": mode.upper(), "RetainUntilDate": when}
            )
        except Exception as e:  # noqa: BLE001
            if _code(e) == "InvalidRequest":
                raise self._no_lock(mode) from None
            raise self.error(f"cannot lock {name} until {when:%Y-%m-%dT%H:%M:%SZ} ({mode})", e) from None

    def _no_lock(self, mode: str) -> BlockferryError:
        return FailedPrecondition(
            f"{self.noun} {self.label}: lock_mode {mode} needs object lock on bucket {self.bucket}, "
            "which it has not (object lock can only be turned on when a bucket is created)",
            field="lock_mode",
        )

    def sweep_partial(self, prefix: str) -> int:
        """Abort the incomplete multipart uploads under a prefix."""
        full = self.key(prefix.strip("/")) + "/" if prefix.strip("/") else (f"{self.prefix}/" if self.prefix else "")
        n = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for up in page.get("Uploads", []):
                    if "/" in up["Key"][len(full) :]:
                        continue  # deeper: another prefix's
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
        except Exception as e:  # noqa: BLE001
            raise self.error(f"cannot clean incomplete uploads under {prefix or '/'}", e) from None
        return n

    def is_empty(self) -> bool:
        full = f"{self.prefix}/" if self.prefix else ""
        try:
            r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        except Exception as e:  # noqa: BLE001
            raise self.error("cannot list the repository", e) from None
        return not r.get("KeyCount", 0)

    def stats(self) -> StoreStats:
        """The bucket reached (HEAD), its bytes used and, where the gateway
        reports a quota (RGW's X-RGW-Quota-* headers: the bucket's and the
        user's size limits), the smaller one as its size. Without a quota
        the size is unbounded."""
        try:
            r = self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001
            if _code(e) == "403":  # HEAD has no body: ask again for the reason
                self._why_refused(e)
            raise self.error("cannot reach the bucket", e) from None
        h = r.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        used = _int(h.get("x-rgw-bytes-used"))
        quotas = [q for q in (_int(h.get("x-rgw-quota-bucket-size")), _int(h.get("x-rgw-quota-user-size"))) if q > 0]
        if not quotas:
            return StoreStats(UNBOUNDED, used, UNBOUNDED)
        total = min(quotas)
        return StoreStats(total, used, max(0, total - used))

    def _why_refused(self, e: Exception) -> None:
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except Exception as again:  # noqa: BLE001
            raise self.error("cannot reach the bucket", again) from None
        raise self.error("cannot reach the bucket", e)

    def facts(self, repository: bool) -> StoreFacts:
        """Object lock from the bucket's configuration; write permission by
        a conditional PUT of the repository's config, which exists, so the
        gateway answers 412 when we may write and 403 when we may not, and
        nothing is written either way."""
        try:
            rule = self.client.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
            lock = "on" if rule.get("ObjectLockEnabled") == "Enabled" else "off"
            default = rule.get("Rule", {}).get("DefaultRetention", {})
            if lock == "on" and default:
                n, unit = (default["Days"], "days") if "Days" in default else (default.get("Years", 0), "years")
                lock = f"on, {default.get('Mode', '?')} {n} {unit} by default"
        except Exception as e:  # noqa: BLE001
            code = _code(e)
            if code in ("AccessDenied", "403"):
                lock = "unknown (the keys may not read the bucket's object lock configuration)"
            elif code in ("ObjectLockConfigurationNotFoundError", "NotImplemented"):
                lock = "off"
            else:
                raise self.error("cannot read the bucket's object lock configuration", e) from None
        writable = True
        if repository:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key("config"), Body=b"", IfNoneMatch="*")
                # the config went away since we looked: take back what the probe made
                self.client.delete_object(Bucket=self.bucket, Key=self.key("config"))
            except Exception as e:  # noqa: BLE001
                code = _code(e)
                if code in ("AccessDenied", "403"):
                    writable = False
                elif code not in ("PreconditionFailed", "412"):
                    raise self.error("cannot probe write permission", e) from None
        return StoreFacts(writable=writable, object_lock=lock)

    def close(self) -> None:
        c = getattr(self._local, "client", None)
        if c is not None:
            c.close()
            self._local.client = None


class _S3Writer(ObjectWriter):
    """Buffers up to one part; the first full part starts a multipart upload.
    An object smaller than a part is one PUT at commit."""

    def __init__(self, store: S3Store, name: str):
        self.store, self.name, self.key = store, name, store.key(name)
        self.buf = bytearray()
        self.parts: list[dict] = []
        self.upload_id = ""
        self._size = 0
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: Buffer) -> None:
        self.buf += data
        self._size += len(memoryview(data).cast("B"))
        while len(self.buf) >= self.store.part_size:
            self._send(bytes(self.buf[: self.store.part_size]))
            del self.buf[: self.store.part_size]

    def _send(self, part: bytes) -> None:
        c, s = self.store.client, self.store
        try:
            if not self.upload_id:
                up = s.ride_outage(self.name, lambda: c.create_multipart_upload(Bucket=s.bucket, Key=self.key))
                self.upload_id = up["UploadId"]
            n = len(self.parts) + 1
            r = s.ride_outage(
                self.name,
                lambda: c.upload_part(Bucket=s.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=part),
            )
            self.parts.append({"PartNumber": n, "ETag": r["ETag"]})
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise s.error(f"cannot write {self.name}", e) from None

    def commit(self) -> None:
        s = self.store
        if not self.upload_id:
            s.publish(self.name, bytes(self.buf))
            self._done = True
            return
        if self.buf:
            self._send(bytes(self.buf))
            self.buf = bytearray()
        try:
            s.ride_outage(
                self.name,
                lambda: s.client.complete_multipart_upload(
                    Bucket=s.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
                ),
            )
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise s.error(f"cannot complete {self.name}", e) from None
        self._done = True

    def abort(self) -> None:
        self.buf = bytearray()
        if self.upload_id and not self._done:
            try:
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id
                )
            except Exception:  # noqa: BLE001 - sweep_partial() finds it later
                log.warning("an incomplete upload stays", extra={"object": self.name})
        self._done = True


@dataclass(frozen=True)
class Bucket:
    """A bucket as discovery sees it."""

    name: str
    object_lock: str = ""
    versioning: str = ""
    used_bytes: int = 0
    total_bytes: int = 0  # its quota; 0: none reported
    error: str = ""


def discover(
    endpoint: str, access_key: str, secret_key: str, *, region: str = "", timeout: float = 10.0
) -> list[Bucket]:
    """The buckets these keys list, each with its object lock, versioning,
    bytes used and quota (what a backup point on it would report)."""
    from agent.errors import InvalidArgument
    from agent.fields import endpoint_host

    if not endpoint_host(endpoint):
        raise InvalidArgument(
            f"endpoint: must be http(s)://host[:port] without path or credentials, not {endpoint!r}", field="endpoint"
        )
    if not access_key or not secret_key:
        raise InvalidArgument("username: needs the access key, and the secret key as secret", field="username")

    def store(bucket: str) -> S3Store:
        s = S3Store(
            endpoint,
            bucket,
            "",
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            timeout=timeout,
            max_attempts=2,
            outage=0.0,
            label=endpoint + (f" bucket {bucket}" if bucket else ""),
        )
        s.noun = "S3 endpoint"
        return s

    top = store("")
    try:
        names = [b["Name"] for b in top.client.list_buckets().get("Buckets", [])]
    except Exception as e:  # noqa: BLE001
        raise top.error("cannot list the buckets", e) from None
    finally:
        top.close()
    out = []
    for name in sorted(names):
        s = store(name)
        try:
            st = s.stats()
            lock = s.facts(repository=False).object_lock
            try:
                versioning = str(s.client.get_bucket_versioning(Bucket=name).get("Status", ""))
            except Exception:  # noqa: BLE001 - not everyone may read it
                versioning = "unknown"
            total = 0 if st.total_bytes == UNBOUNDED else st.total_bytes
            out.append(Bucket(name, lock, versioning, st.used_bytes, total))
        except BlockferryError as e:
            out.append(Bucket(name, error=e.message))
        finally:
            s.close()
    return out
