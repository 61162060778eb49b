"""The chain store: an append-only log of records that loses no more than what was damaged.

DESIGN.md invariant 5 ("nothing is lost"): a node killed at any instant restarts on a valid
prefix, and damage to the file (a flipped bit, a bad sector) costs only the records it touched.

**Format v2** (written since this version). After the header ``MAGIC + run_id`` come frames,
one per round, in increasing round order::

    sync    8 bytes   SYNC, a fixed marker
    round   u64       the slot (round index) this record fills
    length  u32       payload bytes, at most MAX_FRAME
    hash    32 bytes  sha256(payload)
    hcrc    u32       crc32 of round, length and hash
    payload

Why each field: ``hcrc`` means that no field of a header is trusted before it is checked; v1
trusted its length field, so one damaged byte there (or anywhere in a payload) made the reader
drop every record after it as a "torn tail". ``sync`` lets a reader that hits a bad frame find
the next good one by searching for the marker (and then checking the header crc and the payload
hash, so a marker-like run of bytes inside a payload is not taken for a frame). ``round`` says
which slot the next good frame fills, so the records lost in between are known exactly. They
become HOLES: the store keeps every good record after them, reports the holes, and the node
re-fetches just those rounds from peers (:meth:`ChainStore.fill`).

**Damage vs a torn tail.** Appends are written and fsynced before they count, so a crash can
only leave one incomplete frame at the end. Anything unreadable that no good frame follows is
therefore cut off on open: logged at INFO as a torn tail (an interrupted append, never an
acknowledged record), or at WARNING if it starts with a complete frame whose payload hash fails
(a damaged last record, which peers can give back). Unreadable bytes *followed* by a good frame
are damage: WARNING naming the rounds lost, which stay holes until filled.

**v1 stores** (``[u32 length][sha256][payload]`` frames, no marker) are read with v1's rules
and migrated to v2 on open by one atomic rewrite (write, fsync, rename, fsync the directory):
a crash during the migration leaves the untouched v1 file, which the next open migrates again.

Whole files (genesis, checkpoints, keys) are replaced atomically by :func:`atomic_write`.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from seedswarm.gossip.wire import CheckpointManifest
from seedswarm.node.core.joinplan import check_chunk
from seedswarm.node.files import atomic_write
from seedswarm.node.learn.checkpoint import Checkpoint, CheckpointError, ManifestNamed

log = logging.getLogger("seedswarm.store")

MAGIC = b"seedswarm-chain-v2\n"
MAGIC_V1 = b"seedswarm-chain-v1\n"
#: The frame marker. 0xc1 is the one byte msgpack never emits, so encoded records rarely hold
#: it; a false match must also pass the header crc and the payload hash, so it never counts.
SYNC = b"\xc1SEEDSW\xc1"
_HEAD = struct.Struct(">8sQI32sI")  # sync, round, length, sha256(payload), crc32(round|length|hash)
_CRC = struct.Struct(">QI32s")
_FRAME_V1 = struct.Struct(">I32s")
MAX_FRAME = 1 << 24
#: At most this many rounds between two good frames (a sanity bound on a damaged file: it would
#: take megabytes of destroyed frames to lose that many records).
MAX_GAP = 1 << 20


class StoreError(Exception):
    """The store belongs to another run or is not a seedswarm store."""


def encode_frame(round_: int, payload: bytes) -> bytes:
    """One v2 frame: header (with its own crc) and payload."""
    digest = hashlib.sha256(payload).digest()
    crc = zlib.crc32(_CRC.pack(round_, len(payload), digest))
    return _HEAD.pack(SYNC, round_, len(payload), digest, crc) + payload


def _frame_at(data: bytes, pos: int, first: int) -> tuple[int, int, bool] | None:
    """``(round, end, ok)`` of a frame at ``pos`` whose header checks out and that fits in
    ``data``; ``ok`` says whether its payload hash matches too. None if there is no such frame,
    or its round is not in ``first .. first + MAX_GAP`` (frames come in increasing order)."""
    if pos + _HEAD.size > len(data):
        return None
    sync, round_, length, digest, crc = _HEAD.unpack_from(data, pos)
    if sync != SYNC or zlib.crc32(_CRC.pack(round_, length, digest)) != crc:
        return None
    end = pos + _HEAD.size + length
    if length > MAX_FRAME or end > len(data) or not first <= round_ <= first + MAX_GAP:
        return None
    ok = hashlib.sha256(memoryview(data)[pos + _HEAD.size : end]).digest() == digest
    return round_, end, ok


def _rounds(lo: int, hi: int) -> str:
    return f"round {lo}" if lo == hi else f"rounds {lo}..{hi}"


class ChainStore:
    """Records by round (slot), starting at round 0, some of which may be holes.

    * ``len(store)``: number of slots, holes included; the last slot is never a hole.
    * ``store[i]``: the record of round ``i``, or None for a hole.
    * :meth:`records`: contiguous records only (it stops at a hole), what replay and a
      ChainResponse need; :meth:`valid_prefix` is how many records precede the first hole.
    * :meth:`holes`, :meth:`fill`: the rounds to re-fetch, and writing one back.
    * ``damaged``: holes found on open; ``dropped_tail_bytes``: bytes cut off on open.
    """

    def __init__(self, path: str | os.PathLike[str], run_id: bytes) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._slots: list[bytes | None] = []
        self._ends: list[int] = []  # file offset after slot i's frame (a hole: after the last record before it)
        self._holes: list[int] = []  # sorted
        self._header = MAGIC + run_id
        self._end = len(self._header)  # end of the last good frame
        self.dropped_tail_bytes = 0
        self.damaged = 0
        self._open()

    # ------------------------------------------------------------------ reading
    def _open(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            atomic_write(self.path, self._header)
        data = self.path.read_bytes()
        magic = data[: len(MAGIC)]
        if magic not in (MAGIC, MAGIC_V1):
            raise StoreError(f"{self.path} is not a seedswarm chain store")
        header = magic + self.run_id
        if data[: len(header)] != header:
            got = data[len(magic) : len(header)].hex()[:16]
            raise StoreError(
                f"{self.path} holds the chain of run {got}, not {self.run_id.hex()[:16]}: "
                "use another --data-dir for another swarm"
            )
        if magic == MAGIC_V1:
            self._open_v1(data, len(header))
        else:
            self._open_v2(data)

    def _open_v2(self, data: bytes) -> None:
        pos = len(self._header)
        skipped = 0  # unreadable bytes just before pos
        while pos < len(data):
            nxt = len(self._slots)
            frame = _frame_at(data, pos, nxt)
            if frame is not None and frame[2]:
                self._log_gap(nxt, frame[0], pos, skipped)
                self._put(frame[0], data[pos + _HEAD.size : frame[1]], frame[1])
                pos, skipped = frame[1], 0
                continue
            # Unreadable from pos: search for the next good frame.
            q = data.find(SYNC, pos + 1)
            while q != -1 and ((f := _frame_at(data, q, nxt)) is None or not f[2]):
                q = data.find(SYNC, q + 1)
            if q == -1:
                self._cut_tail(data, pos, frame)
                break
            skipped += q - pos
            pos = q
        self.damaged = len(self._holes)

    def _log_gap(self, nxt: int, round_: int, pos: int, skipped: int) -> None:
        """Say what lies between the last good frame (round ``nxt - 1``) and this one."""
        if skipped and round_ > nxt:
            log.warning("chain store %s: %s damaged (%d unreadable bytes before offset %d); the records "
                        "after are kept; will re-fetch from peers", self.path, _rounds(nxt, round_ - 1), skipped, pos)
        elif skipped:
            log.warning("chain store %s: %d unreadable bytes before offset %d, between rounds %d and %d "
                        "(no record lost)", self.path, skipped, pos, nxt - 1, nxt)
        elif round_ > nxt:
            log.warning("chain store %s: %s missing (holes left by an earlier repair); will re-fetch from peers",
                        self.path, _rounds(nxt, round_ - 1))

    def _open_v1(self, data: bytes, pos: int) -> None:
        """v1's rules (no resynchronisation: a bad frame ends the log), then migrate to v2."""
        while pos + _FRAME_V1.size <= len(data):
            length, digest = _FRAME_V1.unpack_from(data, pos)
            end = pos + _FRAME_V1.size + length
            if length > MAX_FRAME or end > len(data):
                break
            payload = data[pos + _FRAME_V1.size : end]
            if hashlib.sha256(payload).digest() != digest:
                break
            self._slots.append(payload)
            pos = end
        if pos < len(data):
            self.dropped_tail_bytes = len(data) - pos
            log.info("chain store %s: cut a torn tail of %d bytes after round %d (an interrupted append)",
                     self.path, self.dropped_tail_bytes, len(self._slots) - 1)
        self._rewrite()
        log.info("chain store %s: migrated %d records from format v1 to v2", self.path, len(self._slots))

    def _put(self, round_: int, payload: bytes, end: int) -> None:
        """Record a good frame of ``round_`` ending at ``end``; rounds skipped before it are holes."""
        while len(self._slots) < round_:
            self._holes.append(len(self._slots))
            self._slots.append(None)
            self._ends.append(self._end)
        self._slots.append(payload)
        self._ends.append(end)
        self._end = end

    def _cut_tail(self, data: bytes, pos: int, frame: tuple[int, int, bool] | None) -> None:
        """Cut everything from ``pos``: nothing good follows it."""
        self.dropped_tail_bytes = len(data) - pos
        last = len(self._slots) - 1
        if frame is not None and not frame[2]:
            log.warning("chain store %s: the last record (round %d) is damaged: cut it (%d bytes); "
                        "will re-fetch from peers", self.path, frame[0], self.dropped_tail_bytes)
        else:
            log.info("chain store %s: cut a torn tail of %d bytes after round %d (an interrupted append)",
                     self.path, self.dropped_tail_bytes, last)
        with open(self.path, "r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        """Number of slots (rounds), holes included."""
        return len(self._slots)

    def __getitem__(self, i: int) -> bytes | None:
        """The record of round ``i`` (negative counts from the end), or None for a hole."""
        return self._slots[i]

    def valid_prefix(self) -> int:
        """How many records come before the first hole (``len(self)`` when there is none)."""
        return self._holes[0] if self._holes else len(self._slots)

    def holes(self) -> list[int]:
        """The rounds whose records were lost, in increasing order."""
        return list(self._holes)

    def records(self, start: int = 0, limit: int | None = None) -> list[bytes]:
        """Up to ``limit`` records from round ``start`` on, stopping before the first hole.

        The result is always contiguous (what replay and a ChainResponse need): ``records()`` is
        the valid prefix, and a ``start`` that is a hole, negative, or past the end gives ``[]``.
        """
        if start < 0:
            return []
        end = len(self._slots) if limit is None else min(len(self._slots), start + max(0, limit))
        k = bisect.bisect_left(self._holes, start)
        if k < len(self._holes):
            end = min(end, self._holes[k])
        return [r for r in self._slots[start:end] if r is not None]

    # ------------------------------------------------------------------ writing
    def append(self, record: bytes) -> None:
        """Store ``record`` as round ``len(self)``: written and fsynced before it counts."""
        if len(record) > MAX_FRAME:
            raise ValueError(f"record of {len(record)} bytes exceeds the store's frame limit {MAX_FRAME}")
        frame = encode_frame(len(self._slots), record)
        with open(self.path, "ab") as f:
            f.write(frame)
            f.flush()
            os.fsync(f.fileno())
        self._slots.append(record)
        self._end += len(frame)
        self._ends.append(self._end)

    def fill(self, i: int, record: bytes) -> None:
        """Write ``record`` into the hole at round ``i``, crash-safely.

        The file is rewritten whole (write, fsync, rename): a crash leaves the old file or the new
        one, and the rewrite also drops the damaged bytes. That costs O(store size) per call,
        which is fine for holes (rare; records are small). Filling a round with the record it
        already holds is a no-op; a different record is a ValueError (that is a fork: truncate).
        """
        if not 0 <= i < len(self._slots):
            raise IndexError(f"round {i} is not a slot of this store (0..{len(self._slots) - 1})")
        have = self._slots[i]
        if have is not None:
            if have == record:
                return
            raise ValueError(f"round {i} is not a hole: it holds a different record")
        if len(record) > MAX_FRAME:
            raise ValueError(f"record of {len(record)} bytes exceeds the store's frame limit {MAX_FRAME}")
        self._slots[i] = record
        try:
            self._rewrite()
        except BaseException:
            self._slots[i] = None
            raise
        self._holes.remove(i)
        log.info("chain store %s: filled the hole at round %d (%d hole(s) left)", self.path, i, len(self._holes))

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` slots (undo of a bounded number of rounds after a fork switch).

        Holes at the new end are dropped too (a store never ends with a hole: that is simply a
        shorter chain), so ``len(self) <= length`` afterwards, equal when round ``length - 1``
        holds a record. No-op when ``length >= len(self)``.
        """
        if length < 0:
            raise ValueError(f"cannot keep {length} records")
        if length >= len(self._slots):
            return
        cut = self._ends[length - 1] if length > 0 else len(self._header)
        with open(self.path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        del self._slots[length:]
        del self._ends[length:]
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
            self._ends.pop()
        del self._holes[bisect.bisect_left(self._holes, len(self._slots)) :]
        self._end = cut

    def _rewrite(self) -> None:
        """The whole store as v2 (only good frames), atomically replacing the file."""
        parts = [self._header]
        end = len(self._header)
        ends: list[int] = []
        for r, rec in enumerate(self._slots):
            if rec is not None:
                frame = encode_frame(r, rec)
                parts.append(frame)
                end += len(frame)
            ends.append(end)
        atomic_write(self.path, b"".join(parts))
        self._ends = ends
        self._end = end


class StoredCheckpoint(ManifestNamed):
    """A checkpoint served from its file: the manifest in memory, each chunk read when asked.

    Serving used to keep every recent checkpoint's whole blob in memory (three full parameter
    copies with the default ``checkpoints_kept``; 1.2 GB at 100M float32 parameters). The file
    is opened once and read with ``os.pread`` (no shared file position), and the open file keeps
    the bytes readable after :meth:`CheckpointDir.save` prunes or replaces it (POSIX: an unlinked
    file lives until its last descriptor closes), so a joiner that got the manifest a moment ago
    still gets every chunk, as when the blob was in memory. Each chunk is checked against the
    manifest before it leaves (one hash of ``chunk_bytes``): a file damaged on disk makes
    :meth:`chunk` answer None (the joiner asks another peer), never serve bad bytes.
    """

    def __init__(self, manifest: CheckpointManifest, chunk_bytes: int, file: BinaryIO) -> None:
        self.manifest = manifest
        self.chunk_bytes = chunk_bytes
        self._file: BinaryIO | None = file
        self._warned = False  # one warning per checkpoint, however often a bad chunk is asked for

    def chunk(self, index: int) -> bytes | None:
        """Chunk ``index`` as the manifest lists it, or None (no such chunk, file unreadable or damaged)."""
        f = self._file
        if f is None or not 0 <= index < len(self.manifest.chunks):
            return None
        try:
            data = os.pread(f.fileno(), self.chunk_bytes, index * self.chunk_bytes)
            check_chunk(self.manifest, index, data)
        except (OSError, ValueError, CheckpointError) as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot serve chunk %d of the checkpoint of round %d: %s", index, self.round, e)
            return None
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CheckpointDir:
    """``<data dir>/checkpoints``: ``<round>-<head>.ckpt`` files written atomically, newest kept."""

    def __init__(self, path: Path, run: bytes, chunk_bytes: int, keep: int) -> None:
        self.path = path
        self.run = run
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _name(self, round_: int, head: bytes) -> Path:
        return self.path / f"{round_:010d}-{head.hex()[:16]}.ckpt"

    def save(self, ckpt: Checkpoint) -> StoredCheckpoint:
        """Write ``ckpt`` and return it opened for serving (the caller closes it); older files
        beyond ``keep`` are deleted after it is open, so even one older than those kept (an
        abandoned fork's newer rounds still on disk) can be served."""
        path = self._name(ckpt.round, ckpt.head)
        atomic_write(path, ckpt.blob, mode=0o600)
        stored = StoredCheckpoint(ckpt.manifest, ckpt.chunk_bytes, open(path, "rb"))  # noqa: SIM115
        files = sorted(self.path.glob("*.ckpt"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)
        return stored

    def load_each(self) -> Iterator[tuple[StoredCheckpoint, bytes]]:
        """Every readable checkpoint, newest first, opened for serving, with its blob (one at a
        time: a caller that stops at the first usable one reads no other whole file; it closes
        the ones it does not keep). A corrupt file is skipped with a warning."""
        for f in sorted(self.path.glob("*.ckpt"), reverse=True):
            try:
                file = open(f, "rb")  # noqa: SIM115  (closed by the caller, or below)
            except OSError as e:
                log.warning("skipping checkpoint %s: %s", f, e)
                continue
            try:
                blob = file.read()
                ck = Checkpoint.from_blob(self.run, blob, self.chunk_bytes)
            except (OSError, CheckpointError) as e:
                file.close()
                log.warning("skipping checkpoint %s: %s", f, e)
                continue
            yield StoredCheckpoint(ck.manifest, ck.chunk_bytes, file), blob

    def remove(self, ckpt: Checkpoint | StoredCheckpoint) -> None:
        self._name(ckpt.round, ckpt.head).unlink(missing_ok=True)
