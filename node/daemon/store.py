"""Crash-safe storage: an append-only record log and atomically replaced files.

The log is a sequence of frames ``[u32 length][sha256(payload)][payload]`` after a header that
names the run. Appends are written and fsynced before they count. A node killed mid-write
leaves at most one torn frame at the tail: on open it is detected (short or hash mismatch),
reported, and cut off, so the store always reopens on a valid prefix (DESIGN.md invariant 5).
Whole files (genesis, checkpoints, keys) are written to a temporary name, fsynced, and renamed
over the old one, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path

from seedswarm.node.files import atomic_write

log = logging.getLogger("seedswarm.store")

MAGIC = b"seedswarm-chain-v1\n"
_FRAME = struct.Struct(">I32s")
MAX_FRAME = 1 << 24


class StoreError(Exception):
    """The store belongs to another run or is not a seedswarm store."""


class ChainStore:
    """Append-only log of encoded records, one frame per round, starting at round 0."""

    def __init__(self, path: str | os.PathLike[str], run_id: bytes) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._offsets: list[int] = []  # offset of each frame
        self._records: list[bytes] = []
        self.dropped_tail_bytes = 0
        self._open()

    def _open(self) -> None:
        header = MAGIC + self.run_id
        if not self.path.exists() or self.path.stat().st_size == 0:
            atomic_write(self.path, header)
        data = self.path.read_bytes()
        if not data.startswith(MAGIC):
            raise StoreError(f"{self.path} is not a seedswarm chain store")
        if data[: len(header)] != header:
            got = data[len(MAGIC) : len(header)].hex()[:16]
            raise StoreError(
                f"{self.path} holds the chain of run {got}, not {self.run_id.hex()[:16]}: "
                "use another --data-dir for another swarm"
            )
        pos = len(header)
        while pos < len(data):
            if pos + _FRAME.size > len(data):
                break
            length, digest = _FRAME.unpack_from(data, pos)
            end = pos + _FRAME.size + length
            if length > MAX_FRAME or end > len(data):
                break
            payload = data[pos + _FRAME.size : end]
            if hashlib.sha256(payload).digest() != digest:
                break
            self._offsets.append(pos)
            self._records.append(payload)
            pos = end
        if pos < len(data):
            self.dropped_tail_bytes = len(data) - pos
            log.warning(
                "chain store %s: dropped a torn tail of %d bytes after record %d (crash during a write)",
                self.path, self.dropped_tail_bytes, len(self._records) - 1,
            )
            with open(self.path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
        self._end = pos

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> bytes:
        return self._records[i]

    def records(self, start: int = 0, limit: int | None = None) -> list[bytes]:
        end = len(self._records) if limit is None else min(len(self._records), start + limit)
        return self._records[start:end]

    def append(self, record: bytes) -> None:
        frame = _FRAME.pack(len(record), hashlib.sha256(record).digest()) + record
        with open(self.path, "ab") as f:
            f.write(frame)
            f.flush()
            os.fsync(f.fileno())
        self._offsets.append(self._end)
        self._records.append(record)
        self._end += len(frame)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` records (undo of a bounded number of rounds after a fork switch)."""
        if length >= len(self._records):
            return
        cut = self._offsets[length]
        with open(self.path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        del self._offsets[length:]
        del self._records[length:]
        self._end = cut
