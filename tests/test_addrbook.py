"""The address book file (``peers.json``): what a node keeps of the peers it learned, so that it
finds the swarm again after its bootstrap peers are gone. Round trip, ranking and bound, and a
file that is corrupt, hostile or of another run (ignored with one reason, never a crash)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.node.daemon import addrbook
from seedswarm.node.daemon.addrbook import BookFileError, Entry

RUN = bytes(range(32))
OTHER_RUN = bytes(32)
ME = peer_id_of(Identity.from_seed(b"\x01" * 32).public)


def pid(i: int) -> str:
    return peer_id_of(Identity.from_seed(i.to_bytes(2, "big") * 16).public)


def addr(i: int, port: int = 4001) -> str:
    return f"/ip4/10.0.{i // 250}.{i % 250 + 1}/tcp/{port}/p2p/{pid(i)}"


def test_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / addrbook.BOOK_FILE
    relay = f"/ip4/10.9.9.9/tcp/4001/p2p/{pid(900)}/p2p-circuit/p2p/{pid(2)}"
    entries = [Entry(pid(1), (addr(1), f"/ip6/::1/tcp/4002/p2p/{pid(1)}"), 1000.5),
               Entry(pid(2), (relay,), 0.0)]
    addrbook.save(path, RUN, entries)
    assert addrbook.load(path, RUN, ME) == (entries, 0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [addrbook.BOOK_FILE]  # no temporary file left
    assert addrbook.load(tmp_path / "none.json", RUN, ME) == ([], 0)  # a first start: no book yet


def test_rank_puts_recent_peers_first_drops_bad_entries_and_is_bounded() -> None:
    book = {pid(i): [addr(i)] for i in range(2, 400)}
    book[ME] = [f"/ip4/127.0.0.1/tcp/1/p2p/{ME}"]
    book[pid(400)] = [addr(401)]  # an address naming another peer
    book[pid(402)] = [f"/ip4/999.1.1.1/tcp/1/p2p/{pid(402)}", "garbage", f"/ip4/1.2.3.4/tcp/x/p2p/{pid(402)}"]
    book["not-a-peer-id"] = ["/ip4/1.2.3.4/tcp/1/p2p/not-a-peer-id"]
    book[pid(403)] = [addr(403, p) for p in range(4001, 4011)]
    seen = {pid(7): 50.0, pid(300): 90.0, pid(9): 70.0, ME: 100.0}
    ranked = addrbook.rank(book, seen, ME)
    assert len(ranked) == addrbook.MAX_SAVED
    assert [e.peer_id for e in ranked[:3]] == [pid(300), pid(9), pid(7)]  # talked to, most recent first
    assert [e.peer_id for e in ranked[3:6]] == [pid(2), pid(3), pid(4)]  # then heard of, in learning order
    ids = {e.peer_id for e in ranked}
    assert ME not in ids and pid(400) not in ids and pid(402) not in ids and "not-a-peer-id" not in ids
    full = addrbook.rank(book, seen, ME, limit=1000)
    assert [len(e.addrs) for e in full if e.peer_id == pid(403)] == [addrbook.MAX_ADDRS]


def test_load_keeps_at_most_the_bound(tmp_path: Path) -> None:
    path = tmp_path / addrbook.BOOK_FILE
    addrbook.save(path, RUN, [Entry(pid(i), (addr(i),), float(i)) for i in range(2, 302)])
    entries, dropped = addrbook.load(path, RUN, ME)
    assert len(entries) == addrbook.MAX_SAVED and dropped == 300 - addrbook.MAX_SAVED
    assert entries[0].peer_id == pid(2)


@pytest.mark.parametrize(("content", "why"), [
    (b"", "not JSON"),
    (b'{"format": 1, "run_id": "', "not JSON"),  # a write cut short (never ours: we rename)
    (b"\xff\xfe garbage", "not JSON"),
    (b"[1, 2, 3]", "not a format-1 address book"),
    (json.dumps({"format": 2, "run_id": RUN.hex(), "peers": []}).encode(), "not a format-1"),
    (json.dumps({"format": 1, "run_id": RUN.hex(), "peers": {"a": 1}}).encode(), "not a format-1"),
    (json.dumps({"format": 1, "run_id": OTHER_RUN.hex(), "peers": []}).encode(), "another run"),
    (json.dumps({"format": 1, "peers": []}).encode(), "another run"),
    (b" " * (addrbook.MAX_FILE_BYTES + 1), "larger than"),
])
def test_an_unusable_file_is_one_clear_error(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / addrbook.BOOK_FILE
    path.write_bytes(content)
    with pytest.raises(BookFileError, match=why):
        addrbook.load(path, RUN, ME)


def test_hostile_entries_are_dropped_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / addrbook.BOOK_FILE
    good = {"id": pid(5), "addrs": [addr(5)], "seen": 3.0}
    peers = [
        good,
        {"id": ME, "addrs": [f"/ip4/127.0.0.1/tcp/1/p2p/{ME}"], "seen": 9.0},  # our own id
        {"id": pid(5), "addrs": [addr(5, 4999)], "seen": 1.0},  # a duplicate
        {"id": pid(6), "addrs": [addr(7)]},  # an address of someone else
        {"id": 12, "addrs": []}, {"id": pid(8), "addrs": "x"}, {"id": pid(9), "addrs": [addr(9)], "seen": True},
        {"id": pid(10), "addrs": [{"x": 1}, None, "/" * 300]}, "nonsense", None, [],
        {"id": pid(11), "addrs": [addr(11)]},  # no date: heard of only
    ]
    path.write_text(json.dumps({"format": 1, "run_id": RUN.hex(), "peers": peers}))
    entries, dropped = addrbook.load(path, RUN, ME)
    assert entries == [Entry(pid(5), (addr(5),), 3.0), Entry(pid(11), (addr(11),), 0.0)]
    assert dropped == len(peers) - 2


def test_a_file_of_junk_costs_a_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / addrbook.BOOK_FILE
    junk = [{"id": pid(5), "addrs": ["/ip4/1.2.3.4/tcp/1/p2p/x"] * 4}] * 3000
    path.write_text(json.dumps({"format": 1, "run_id": RUN.hex(), "peers": [*junk, {"id": pid(6), "addrs": [addr(6)]}]}))
    assert addrbook.load(path, RUN, ME) == ([], 3001)  # only the first 2 x 256 items are examined


def test_unreadable_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / addrbook.BOOK_FILE).mkdir()  # unreadable as a file, even for root
    with pytest.raises(BookFileError, match="cannot read"):
        addrbook.load(tmp_path / addrbook.BOOK_FILE, RUN, ME)
