"""ChainStore: append/reopen, torn-tail recovery, damage kept to holes (v2 frames), v1 migration,
run-id check, truncate, fill; atomic_write; the data dir lock."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from seedswarm.node.daemon.store import MAGIC, MAGIC_V1, SYNC, ChainStore, StoreError, encode_frame
from seedswarm.node.files import DataDirInUse, DataDirLock, atomic_write

RUN = b"R" * 32
RECS = [b"record-zero", b"record-one" * 7, b"record-two-" + bytes(range(256))]


def _filled(path):
    s = ChainStore(path, RUN)
    for r in RECS:
        s.append(r)
    return s


def test_append_reopen_round_trip(tmp_path):
    p = tmp_path / "chain.log"
    s = _filled(p)
    assert len(s) == 3 and s.records() == RECS
    s2 = ChainStore(p, RUN)
    assert len(s2) == 3
    assert [s2[i] for i in range(3)] == RECS
    assert s2.records(1, 1) == [RECS[1]]
    assert s2.dropped_tail_bytes == 0
    assert p.read_bytes().startswith(MAGIC + RUN)


def _garbage(p):
    with open(p, "ab") as f:
        f.write(b"\x00\x01garbage-bytes")


def _truncated_frame(p):
    data = p.read_bytes()
    p.write_bytes(data[:-5])


def _flip_last_payload(p):
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,kept", [(_garbage, 3), (_truncated_frame, 2), (_flip_last_payload, 2)])
def test_torn_tail_recovery(tmp_path, damage, kept):
    p = tmp_path / "chain.log"
    _filled(p)
    size_before = p.stat().st_size
    damage(p)
    s = ChainStore(p, RUN)
    assert len(s) == kept
    assert s.records() == RECS[:kept]
    assert s.dropped_tail_bytes > 0
    # the file was cut back to the valid prefix
    assert p.stat().st_size <= size_before
    s.append(b"after-recovery")
    s2 = ChainStore(p, RUN)
    assert s2.dropped_tail_bytes == 0
    assert s2.records() == RECS[:kept] + [b"after-recovery"]


def test_other_run_id_raises(tmp_path):
    p = tmp_path / "chain.log"
    _filled(p)
    with pytest.raises(StoreError):
        ChainStore(p, b"X" * 32)


def test_not_a_store_raises(tmp_path):
    p = tmp_path / "chain.log"
    p.write_bytes(b"hello world, not a chain")
    with pytest.raises(StoreError):
        ChainStore(p, RUN)


def test_truncate_keeps_n(tmp_path):
    p = tmp_path / "chain.log"
    s = _filled(p)
    s.truncate(1)
    assert len(s) == 1 and s.records() == RECS[:1]
    s.append(b"new")
    s2 = ChainStore(p, RUN)
    assert s2.records() == [RECS[0], b"new"]
    assert s2.dropped_tail_bytes == 0
    s2.truncate(5)  # no-op beyond length
    assert len(s2) == 2
    s2.truncate(0)
    assert len(ChainStore(p, RUN)) == 0


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write(p, b"first version, longer")
    assert p.read_bytes() == b"first version, longer"
    atomic_write(p, b"second")
    assert p.read_bytes() == b"second"
    assert [x.name for x in p.parent.iterdir()] == ["f.bin"]


# ---------------------------------------------------------------------------------------------
# v2: per-record checksums, resynchronisation, holes

HEADER = len(MAGIC) + len(RUN)
FRAME_HEAD = 56  # sync 8, round 8, length 4, sha256 32, crc 4
MANY = [f"record-{i}-".encode() + bytes([i]) * (20 + 7 * i) for i in range(6)]


def _many(path: Path, recs: list[bytes] = MANY) -> ChainStore:
    s = ChainStore(path, RUN)
    for r in recs:
        s.append(r)
    return s


def _offset(i: int, recs: list[bytes] = MANY) -> int:
    """File offset of the frame of round ``i`` in a store written by ``_many``."""
    return HEADER + sum(FRAME_HEAD + len(r) for r in recs[:i])


def _flip(p: Path, at: int) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x5A
    p.write_bytes(bytes(data))


def test_flipped_byte_in_the_middle_loses_only_that_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(2) + FRAME_HEAD + 5)  # inside the payload of round 2
    with caplog.at_level(logging.INFO, logger="seedswarm.store"):
        s = ChainStore(p, RUN)
    assert len(s) == 6 and s[2] is None and s.holes() == [2] and s.valid_prefix() == 2
    assert [s[i] for i in (0, 1, 3, 4, 5)] == [MANY[i] for i in (0, 1, 3, 4, 5)]
    assert s.damaged == 1 and s.dropped_tail_bytes == 0
    # records() is contiguous: it stops before a hole
    assert s.records() == MANY[:2] and s.records(1, 5) == [MANY[1]]
    assert s.records(2) == [] and s.records(3) == MANY[3:] and s.records(3, 2) == MANY[3:5]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "round 2 damaged" in warnings[0].getMessage()
    assert "will re-fetch from peers" in warnings[0].getMessage()
    # appending goes on after the last slot; the hole stays a hole
    s.append(b"round-6")
    s2 = ChainStore(p, RUN)
    assert len(s2) == 7 and s2.holes() == [2] and s2[6] == b"round-6"
    # fill writes the hole back; a reopen is fully valid and the damaged bytes are gone
    s2.fill(2, MANY[2])
    assert s2.holes() == [] and s2.valid_prefix() == 7 and s2.records() == [*MANY, b"round-6"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seedswarm.store"):
        s3 = ChainStore(p, RUN)
    assert s3.records() == [*MANY, b"round-6"] and s3.damaged == 0 and s3.dropped_tail_bytes == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert p.stat().st_size == _offset(6) + FRAME_HEAD + len(b"round-6")


@pytest.mark.parametrize("field,at", [("sync", 0), ("round", 12), ("length", 17), ("hash", 30), ("crc", 53)])
def test_damaged_header_field_loses_only_that_record(tmp_path: Path, field: str, at: int) -> None:
    """A damaged length field is never trusted (the header has its own crc), so the reader does
    not jump to a wrong place: it searches for the next frame's marker instead."""
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(3) + at)
    s = ChainStore(p, RUN)
    assert s.holes() == [3], field
    assert [s[i] for i in range(6) if i != 3] == [MANY[i] for i in range(6) if i != 3]


def test_length_field_claiming_a_huge_or_short_frame(tmp_path: Path) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    for length in (0, 3, 1 << 30):
        data = bytearray(p.read_bytes())
        struct.pack_into(">I", data, _offset(1) + 16, length)
        q = tmp_path / f"c{length}.log"
        q.write_bytes(bytes(data))
        s = ChainStore(q, RUN)
        assert s.holes() == [1] and s.records(2) == MANY[2:], length


def test_multiple_holes_and_their_repair(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(1) + FRAME_HEAD + 1)
    # rounds 3 and 4 lost in one run of zeroed bytes (a bad sector)
    data = bytearray(p.read_bytes())
    a, b = _offset(3) + 10, _offset(4) + FRAME_HEAD + 3
    data[a:b] = bytes(b - a)
    p.write_bytes(bytes(data))
    s = ChainStore(p, RUN)
    assert s.holes() == [1, 3, 4] and s.damaged == 3 and s.valid_prefix() == 1
    assert s[0] == MANY[0] and s[2] == MANY[2] and s[5] == MANY[5]
    s.fill(3, MANY[3])
    # the repaired file holds no damaged bytes; the remaining holes are gaps in the round numbers
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seedswarm.store"):
        s2 = ChainStore(p, RUN)
    assert s2.holes() == [1, 4] and s2[3] == MANY[3]
    assert "round 1 missing" in caplog.text and "round 4 missing" in caplog.text
    s2.fill(1, MANY[1])
    s2.fill(4, MANY[4])
    assert ChainStore(p, RUN).records() == MANY


def test_damage_to_the_first_record(tmp_path: Path) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(0) + FRAME_HEAD)
    s = ChainStore(p, RUN)
    assert s.holes() == [0] and s.valid_prefix() == 0 and s.records() == [] and s.records(1) == MANY[1:]


def test_every_single_byte_flip_loses_at_most_its_own_record(tmp_path: Path) -> None:
    """Exhaustive over a small store: whichever byte of the body is damaged, every other record
    survives; the damaged one is a hole, or is cut if it was the last one."""
    recs = MANY[:4]
    p = tmp_path / "chain.log"
    _many(p, recs)
    clean = p.read_bytes()
    q = tmp_path / "damaged.log"
    for at in range(HEADER, len(clean)):
        data = bytearray(clean)
        data[at] ^= 0xFF
        q.write_bytes(bytes(data))
        s = ChainStore(q, RUN)
        hit = max(i for i in range(len(recs)) if _offset(i, recs) <= at)
        if hit == len(recs) - 1:
            assert len(s) == hit and s.records() == recs[:hit] and s.dropped_tail_bytes > 0, at
        else:
            assert s.holes() == [hit] and len(s) == len(recs), at
            assert all(s[i] == recs[i] for i in range(len(recs)) if i != hit), at


def test_a_marker_inside_a_payload_is_not_a_frame(tmp_path: Path) -> None:
    recs = [b"a" * 10, SYNC * 4 + b"tail", b"b" * 10, SYNC + bytes(60)]
    p = tmp_path / "chain.log"
    _many(p, recs)
    assert ChainStore(p, RUN).records() == recs
    _flip(p, _offset(1, recs) + 20)  # header of round 1 (its payload is full of markers)
    s = ChainStore(p, RUN)
    assert s.holes() == [1] and s[2] == recs[2] and s[3] == recs[3]


def test_torn_tail_is_cut_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An interrupted append (a partial frame at the end) is not damage: INFO, no WARNING."""
    p = tmp_path / "chain.log"
    _many(p)
    partial = encode_frame(6, b"x" * 40)[:30]
    with open(p, "ab") as f:
        f.write(partial)
    with caplog.at_level(logging.INFO, logger="seedswarm.store"):
        s = ChainStore(p, RUN)
    assert s.records() == MANY and s.dropped_tail_bytes == len(partial) and s.damaged == 0
    assert "torn tail" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_damaged_last_record_is_cut_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, p.stat().st_size - 1)
    with caplog.at_level(logging.INFO, logger="seedswarm.store"):
        s = ChainStore(p, RUN)
    assert s.records() == MANY[:5] and len(s) == 5 and s.holes() == []
    assert "round 5) is damaged" in caplog.text and "will re-fetch from peers" in caplog.text


def test_truncate_and_append_with_holes(tmp_path: Path) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(2) + FRAME_HEAD + 2)
    s = ChainStore(p, RUN)
    s.truncate(3)  # keeps rounds 0..2, of which 2 is a hole: a store never ends with a hole
    assert len(s) == 2 and s.holes() == [] and s.records() == MANY[:2]
    s.append(b"new-2")
    assert ChainStore(p, RUN).records() == [*MANY[:2], b"new-2"]
    s = _many(tmp_path / "b.log")
    with pytest.raises(ValueError):
        s.truncate(-1)


def test_fill_checks_its_slot(tmp_path: Path) -> None:
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(1) + FRAME_HEAD + 2)
    s = ChainStore(p, RUN)
    s.fill(0, MANY[0])  # the record it holds: no-op
    with pytest.raises(ValueError, match="not a hole"):
        s.fill(0, b"other")
    with pytest.raises(IndexError):
        s.fill(6, b"past the end: use append")
    assert s.holes() == [1]


def test_fill_is_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite is write, fsync, rename: a crash before the rename leaves the old file."""
    p = tmp_path / "chain.log"
    _many(p)
    _flip(p, _offset(1) + FRAME_HEAD + 2)
    before = p.read_bytes()
    s = ChainStore(p, RUN)

    def crash(*_a: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        s.fill(1, MANY[1])
    monkeypatch.undo()
    assert p.read_bytes() == before and s.holes() == [1] and s[1] is None
    assert ChainStore(p, RUN).holes() == [1]


def _v1_bytes(recs: list[bytes]) -> bytes:
    body = b"".join(struct.pack(">I32s", len(r), hashlib.sha256(r).digest()) + r for r in recs)
    return MAGIC_V1 + RUN + body


def test_v1_store_is_read_and_migrated(tmp_path: Path) -> None:
    p = tmp_path / "chain.log"
    p.write_bytes(_v1_bytes(MANY))
    s = ChainStore(p, RUN)
    assert s.records() == MANY and len(s) == 6 and s.dropped_tail_bytes == 0
    assert p.read_bytes().startswith(MAGIC + RUN)  # migrated on open
    s.append(b"v2 record")
    assert ChainStore(p, RUN).records() == [*MANY, b"v2 record"]
    # a v1 store with a torn tail: cut (v1 rules), then migrated
    p.write_bytes(_v1_bytes(MANY)[:-7])
    s = ChainStore(p, RUN)
    assert s.records() == MANY[:5] and s.dropped_tail_bytes > 0
    assert ChainStore(p, RUN).records() == MANY[:5]
    # another run's v1 store is refused, untouched
    p.write_bytes(_v1_bytes(MANY))
    with pytest.raises(StoreError, match="holds the chain of run"):
        ChainStore(p, b"X" * 32)
    assert p.read_bytes() == _v1_bytes(MANY)


# ---------------------------------------------------------------------------------------------
# the data dir lock


def test_data_dir_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    a = DataDirLock(tmp_path)
    a.acquire()
    with pytest.raises(DataDirInUse) as e:
        DataDirLock(tmp_path).acquire()
    assert e.value.pid == os.getpid()
    assert str(e.value) == (f"data dir {tmp_path} is in use by another seedswarm node (pid {os.getpid()}); "
                            "stop it or use another --data-dir")
    a.release()
    with DataDirLock(tmp_path) as b:
        assert b.held
    assert not b.held


def test_data_dir_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    code = ("import sys, time; from seedswarm.node.files import DataDirLock; "
            "DataDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(DataDirInUse) as e:
            DataDirLock(tmp_path).acquire()
        assert e.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    with DataDirLock(tmp_path) as lock:  # SIGKILL released it: no stale lock to clean up
        assert lock.held
