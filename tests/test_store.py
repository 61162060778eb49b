"""ChainStore: append/reopen, torn-tail recovery, run-id check, truncate; atomic_write."""

from __future__ import annotations

import pytest

from seedswarm.node.daemon.store import MAGIC, ChainStore, StoreError
from seedswarm.node.files import atomic_write

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
