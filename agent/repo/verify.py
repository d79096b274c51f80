"""Verify a backup, or a whole repository, and name everything damaged.

A backup:
- light: every chunk the manifest names is present and decodes, and its
  checksum (the chunk id; with encryption also the GCM tag) holds; a chunk
  shared by several positions is read once;
- deep: also the image digest recomputed from the chunks equals the
  manifest's (catches a manifest whose chunk list was altered consistently).

A repository:
- every pack is read once, each record checked against the id its index
  gives; packs without an index and indexes without a pack are named;
- every manifest is read and each of its chunks must be among the good
  ones; deep: each backup's block-digest records hash to its chunk ids and
  give its image digest (the records were checked against the data by the
  pack scan, so no backup's data is read twice);
- chunks no backup references are counted (the next GC reclaims them).

Verification never stops at the first damaged item: the report lists every
one (the pack, the chunk, the backups that reference it, why). Transport
errors are not damage: they end the verification as what they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import DataCorrupt, NotFound
from agent.repo.format import BLOCK_SIZE, ZERO, ImageDigest, Manifest, decode_chunk, zero_block_digests
from agent.repo.pipeline import OrderedPipeline
from agent.repo.repository import Repository

MANIFEST_WEIGHT = 1 << 20  # progress: a backup's check counts as this many bytes of packs


@dataclass(frozen=True)
class Damage:
    """One damaged item: a chunk (chunk_id, in pack), or a whole object
    (object: a manifest, a pack index, a pack without an index, a backup's
    block digests)."""

    reason: str
    pack: str = ""
    chunk_id: str = ""
    object: str = ""
    backup_uuids: list[str] = field(default_factory=list)  # the backups it makes unrestorable
    first_chunk_index: int = -1  # a single backup's verify: the chunk's first position in it

    @classmethod
    def of(cls, d: Damage | dict) -> Damage:
        return d if isinstance(d, Damage) else cls(**d)

    def describe(self) -> str:
        what = f"chunk {self.chunk_id[:16]}" if self.chunk_id else self.object
        where = f" in {self.pack}" if self.pack and self.chunk_id else ""
        at = f" (position {self.first_chunk_index})" if self.first_chunk_index >= 0 else ""
        return f"{what}{where}{at}: {self.reason}"


@dataclass
class VerifyResult:
    """What a verify checked and what it found, for one backup
    (backup_uuid) or the whole repository (repository); the verify job's
    result as it is journaled and sent."""

    backup_uuid: str  # "" for a repository verify
    deep: bool
    chunks_checked: int = 0
    bytes_checked: int = 0
    damage: list[Damage] = field(default_factory=list)  # every damaged item (empty: all good)
    repository: bool = False
    backups_checked: int = 0
    packs_checked: int = 0
    damaged_backups: list[str] = field(default_factory=list)  # the backups the damage makes unrestorable
    orphan_packs: list[str] = field(default_factory=list)  # a pack without its index: GC removes it
    unreferenced_chunks: int = 0  # stored, referenced by no backup: GC reclaims them
    unreferenced_bytes: int = 0

    def __post_init__(self) -> None:  # from the journal: the damage comes back as dicts
        self.damage = [Damage.of(d) for d in self.damage]

    def finish(self) -> VerifyResult:
        self.damaged_backups = sorted({b for d in self.damage for b in d.backup_uuids})
        return self

    def check(self) -> VerifyResult:
        """Itself when nothing is damaged; else DataCorrupt naming every
        damaged item (the result rides along)."""
        if self.damage:
            raise DataCorrupt(self.summary(), result=self)
        return self

    def summary(self) -> str:
        """Every damaged item, for the error message (the result has them all)."""
        subject = f"backup {self.backup_uuid}" if self.backup_uuid else "repository"
        items = [d.describe() for d in self.damage]
        shown = items[:100]
        more = f"; and {len(items) - len(shown)} more (see the job's result)" if len(items) > len(shown) else ""
        backups = (
            f"; backups affected: {', '.join(self.damaged_backups)}"
            if not self.backup_uuid and self.damaged_backups
            else ""
        )
        return f"{subject}: {len(items)} damaged item(s): " + "; ".join(shown) + more + backups


def _reason(e: DataCorrupt) -> str:
    return e.message.rsplit(": ", 1)[-1]


# ---- one backup ----


def verify(repo: Repository, manifest: Manifest, *, deep: bool, ctx=None) -> VerifyResult:
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    with repo.shared("verify", checkpoint=ctx.checkpoint):
        repo.refresh()
        return _verify(repo, manifest, deep, ctx)


def _verify(repo: Repository, m: Manifest, deep: bool, ctx) -> VerifyResult:
    report = VerifyResult(m.backup_id, deep)
    h = ImageDigest() if deep else None
    cs = m.chunk_size
    seen: set[str] = set()
    bad: dict[str, Damage] = {}
    ctx.progress(0, m.size, "verifying")

    def work(i: int, cid: str):
        length = min(cs, m.size - i * cs)
        if cid == ZERO:
            return i, cid, length, None, None
        loc = repo.location(bytes.fromhex(cid))
        try:
            data, digests = repo.get(bytes.fromhex(cid))
        except DataCorrupt as e:  # a transport error stays what it is: never a verdict on the data
            return (
                i,
                cid,
                length,
                None,
                Damage(_reason(e), loc.pack if loc else "", cid, backup_uuids=[m.backup_id], first_chunk_index=i),
            )
        if len(data) != length:
            return (
                i,
                cid,
                length,
                None,
                Damage(
                    f"holds {len(data)} bytes, not {length}",
                    loc.pack,
                    cid,
                    backup_uuids=[m.backup_id],
                    first_chunk_index=i,
                ),
            )
        return i, cid, length, digests, None

    def retire(result) -> None:
        nonlocal h
        i, cid, length, digests, damage = result
        if damage is not None:
            if cid not in bad:
                bad[cid] = damage
                report.damage.append(damage)
            h = None  # no image digest to compare
        elif h is not None:
            h.add(digests if digests is not None else zero_block_digests(length), length)
        if digests is not None:
            report.chunks_checked += 1
            report.bytes_checked += length
        ctx.progress(i * cs + length)

    with OrderedPipeline(work, retire) as pipe:
        for i, cid in enumerate(m.chunks):
            ctx.checkpoint()
            if cid != ZERO and (cid in bad or (not deep and cid in seen)):
                continue
            seen.add(cid)
            pipe.submit(i, cid)
        pipe.drain()
    if h is not None and h.hexdigest() != m.image_digest:
        report.damage.append(
            Damage(
                "the image digest of its chunks does not match the manifest's",
                object=f"manifests/{m.backup_id}",
                backup_uuids=[m.backup_id],
            )
        )
    return report.finish()


# ---- the whole repository ----


def verify_repository(repo: Repository, *, deep: bool, ctx=None) -> VerifyResult:
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    with repo.shared("verify", checkpoint=ctx.checkpoint):
        repo.refresh()
        return _verify_repository(repo, deep, ctx)


def _verify_repository(repo: Repository, deep: bool, ctx) -> VerifyResult:
    store = repo.store
    report = VerifyResult("", deep, repository=True)
    names = set(store.list("packs"))
    packs = sorted(n for n in names if not n.endswith(".idx"))
    indexed = sorted(n[:-4] for n in names if n.endswith(".idx"))
    report.orphan_packs = [p for p in packs if f"{p}.idx" not in names]
    sizes = {p: store.size(p) for p in packs if f"{p}.idx" in names}
    backup_ids = repo.backup_ids()
    total = sum(sizes.values()) + MANIFEST_WEIGHT * len(backup_ids)
    done = base = 0  # bytes of packs checked; base: of the packs finished
    ctx.progress(0, total, "checking packs")

    good: dict[bytes, int] = {}  # chunk id -> plaintext bytes
    bad: dict[bytes, Damage] = {}
    for pack in indexed:
        ctx.checkpoint()
        try:
            entries = repo._read_index(pack)
        except DataCorrupt as e:
            report.damage.append(Damage(_reason(e), object=f"{pack}.idx"))
            continue
        except NotFound:
            continue  # removed meanwhile (a GC of another agent finished before our lock)
        if pack not in sizes:
            for cid in entries:
                bad.setdefault(cid, Damage("its pack is missing", pack, cid.hex()))
            continue
        report.packs_checked += 1

        def work(cid: bytes, loc):
            try:
                record = store.get(loc.pack, loc.offset, loc.length)
            except NotFound:
                return cid, loc, Damage("its pack is missing", loc.pack, cid.hex())
            if len(record) < loc.length:
                return cid, loc, Damage("record is truncated", loc.pack, cid.hex())
            try:
                decode_chunk(record, cid, repo._decompressor(), repo.sealer, loc.pack)
            except DataCorrupt as e:
                return cid, loc, Damage(_reason(e), loc.pack, cid.hex())
            return cid, loc, None

        def retire(result) -> None:
            nonlocal done
            cid, loc, damage = result
            done += loc.length
            ctx.progress(done)
            if damage is None:
                if cid not in good:
                    report.chunks_checked += 1
                    report.bytes_checked += loc.plain
                good[cid] = loc.plain
                bad.pop(cid, None)  # a good copy in another pack (a repack that a crash interrupted)
            elif cid not in good:
                bad.setdefault(cid, damage)

        with OrderedPipeline(work, retire) as pipe:
            for cid, loc in sorted(entries.items(), key=lambda kv: kv[1].offset):
                pipe.submit(cid, loc)
            pipe.drain()
        base += sizes[pack]
        done = base

    ctx.progress(done, total, "checking backups")
    referenced: set[bytes] = set()
    damage_of_chunks: dict[bytes, Damage] = {}
    for bid in backup_ids:
        ctx.checkpoint()
        try:
            m = repo.manifest(bid)
        except NotFound:
            continue  # deleted meanwhile
        except DataCorrupt as e:
            report.damage.append(Damage(_reason(e), object=f"manifests/{bid}", backup_uuids=[bid]))
            continue
        report.backups_checked += 1
        mine = {bytes.fromhex(c) for c in m.chunks if c != ZERO}
        referenced |= mine
        for cid in mine:
            if cid in good:
                continue
            d = damage_of_chunks.get(cid)
            if d is None:
                d = damage_of_chunks[cid] = bad.get(cid) or Damage("in no pack index", chunk_id=cid.hex())
                report.damage.append(d)
            d.backup_uuids.append(bid)
        if deep and not (mine - good.keys()):
            problem = _check_block_digests(repo, m)
            if problem:
                report.damage.append(Damage(problem, object=f"blocks/{bid}", backup_uuids=[bid]))
        done += MANIFEST_WEIGHT
        ctx.progress(done)
    for cid, d in bad.items():
        if cid not in referenced:
            report.damage.append(d)  # damaged, though no backup needs it: GC removes it
    for d in report.damage:
        d.backup_uuids.sort()
    unreferenced = good.keys() - referenced
    report.unreferenced_chunks = len(unreferenced)
    report.unreferenced_bytes = sum(good[c] for c in unreferenced)
    return report.finish()


def _check_block_digests(repo: Repository, m: Manifest) -> str:
    """'' when the backup's block-digest records hash to its chunk ids and
    give its image digest; else what is wrong."""
    reader = repo.block_reader(m.backup_id)
    h = ImageDigest()
    cs = m.chunk_size
    try:
        for i, cid in enumerate(m.chunks):
            length = min(cs, m.size - i * cs)
            digests = reader.get(i, (length + BLOCK_SIZE - 1) // BLOCK_SIZE)
            if cid == ZERO:
                if digests != zero_block_digests(length):
                    return f"the block digests of zero chunk {i} are not those of zeros"
            elif repo.sealer.chunk_id(digests) != bytes.fromhex(cid):
                return f"the block digests of chunk {i} do not match its chunk id"
            h.add(digests, length)
    except DataCorrupt as e:
        return _reason(e)
    if h.hexdigest() != m.image_digest:
        return "the image digest of its block digests does not match the manifest's"
    return ""
