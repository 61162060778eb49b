"""Finding the swarm beyond the bootstrap list, with real daemons (OS processes, libp2p on
loopback): a node whose only bootstrap peer is gone finds the swarm again through the address
book it saved (``peers.json``), and a saved book that is corrupt or of another run is ignored
with one log line."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.node.daemon import addrbook
from tests.test_daemon import Node, init_swarm, wait_for

BOUND = 180.0  # seconds: four daemons importing torch on a busy 2-core machine


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for n in started:
        if n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()


def heads(data: Path) -> dict[int, str]:
    """Round -> the head the node last applied for it (``rounds.jsonl``: a fork switch rewrites a round)."""
    out: dict[int, str] = {}
    for line in (data / "rounds.jsonl").read_text().splitlines():
        with_head = json.loads(line)
        out[with_head["round"]] = with_head["head"]
    return out


@pytest.mark.slow
def test_restarted_node_finds_the_swarm_through_its_saved_book(tmp_path: Path, nodes: list[Node]) -> None:
    genesis, data_a, run_id = init_swarm(tmp_path, "--min-round-time", "0.5")
    a = Node(genesis, data_a)
    nodes.append(a)
    addr_a = wait_for(lambda: (s := a.status()) and s["round"] >= 2 and s["listen"] and s["listen"][0],
                      BOUND, "the founder's first rounds")
    # B starts with a book of another run, C with a corrupt one: each is one log line, then ignored
    data_b, data_c, data_d = tmp_path / "b", tmp_path / "c", tmp_path / "d"
    for d in (data_b, data_c):
        d.mkdir(mode=0o700)
    stranger = peer_id_of(Identity.from_seed(b"\x09" * 32).public)
    addrbook.save(data_b / addrbook.BOOK_FILE, bytes(32),
                  [addrbook.Entry(stranger, (f"/ip4/127.0.0.1/tcp/9/p2p/{stranger}",), 1.0)])
    (data_c / addrbook.BOOK_FILE).write_bytes(b'{"format": 1, "peers": [\x00')
    b = Node(genesis, data_b, "--bootstrap", addr_a)
    c = Node(genesis, data_c, "--bootstrap", addr_a)
    nodes += [b, c]
    # B and C must be members: the swarm goes on without A only if they train and aggregate
    for n in (b, c):
        wait_for(lambda n=n: (s := n.status()) and s["member"], BOUND, "B and C members")
    id_b, id_c = b.status()["peer_id"], c.status()["peer_id"]  # type: ignore[index]
    for n in (b, c):
        assert n.logs().count("ignoring the saved address book") == 1, n.logs()[-3000:]
    assert "another run" in b.logs() and "not JSON" in c.logs()
    assert b.status()["discovery"]["book_loaded"] == 0  # type: ignore[index]

    # D joins through A alone and learns B and C from A's hello
    d = Node(genesis, data_d, "--bootstrap", addr_a)
    nodes.append(d)
    wait_for(lambda: (s := d.status()) and {id_b, id_c} <= set(s["peer_ids"]) and s["round"] > 3, BOUND,
             "D connected to B and C")
    rc, _ = d.stop(signal.SIGTERM)
    assert rc == 0, d.logs()[-3000:]
    saved, dropped = addrbook.load(data_d / addrbook.BOOK_FILE, bytes.fromhex(run_id), "")
    id_d = json.loads((data_d / "status.json").read_text())["peer_id"]
    ids = [e.peer_id for e in saved]
    assert dropped == 0 and {id_b, id_c} <= set(ids[:3]) and id_d not in ids, saved
    assert all(e.seen > 0 for e in saved[:3])  # the peers D talked to come first

    # A, D's only bootstrap peer, leaves; B and C go on
    rc, _ = a.stop(signal.SIGTERM)
    assert rc == 0
    r_gone = b.status()["round"]  # type: ignore[index]
    wait_for(lambda: (s := b.status()) and s["round"] >= r_gone + 3, BOUND, "rounds without A")

    # D restarts with the same data dir and the same (dead) bootstrap list
    d2 = Node(genesis, data_d, "--bootstrap", addr_a)
    nodes.append(d2)
    t0 = time.time()
    st = wait_for(lambda: (s := d2.status()) and {id_b, id_c} <= set(s["peer_ids"]) and s["first_apply_at"] and s,
                  BOUND, "the restarted D reconnected to B and C and applied a round")
    assert st["discovery"]["book_loaded"] >= 2 and st["discovery"]["book_answered"] >= 2, st["discovery"]
    r_restart = b.status()["round"]  # type: ignore[index]
    wait_for(lambda: (s := d2.status()) and s["round"] >= r_restart + 5, BOUND, "D follows the live rounds")
    # the rounds D applied after its restart are the swarm's: same head as B for every round
    hb, hd = heads(data_b), heads(data_d)
    common = [r for r in hd if r > r_restart and r in hb]
    assert len(common) >= 3, (sorted(hd)[-10:], sorted(hb)[-10:])
    assert all(hd[r] == hb[r] for r in common), [(r, hd[r], hb[r]) for r in common if hd[r] != hb[r]]
    assert addr_a.rsplit("/p2p/", 1)[1] not in st["peer_ids"]
    print(f"restart with a dead bootstrap: first round applied {st['first_apply_at'] - st['started_at']:.1f} s "
          f"after process start ({st['first_apply_at'] - t0:.1f} s after spawn); book loaded "
          f"{st['discovery']['book_loaded']}, answered {st['discovery']['book_answered']}")
    for n in (b, c, d2):
        rc, took = n.stop(signal.SIGTERM)
        assert rc == 0, n.logs()[-3000:]
