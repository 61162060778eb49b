"""Finding the swarm beyond the bootstrap list, with real daemons (OS processes, real libp2p):

* on loopback, a node whose only bootstrap peer is gone finds the swarm again through the address
  book it saved (``peers.json``); a saved book that is corrupt or of another run is ignored with
  one log line;
* on a LAN (network namespaces on one bridge; needs root, skips and says why otherwise), ``--mdns``
  nodes find each other with no bootstrap list, and a node of another run is refused.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from seedswarm.bench.netns import Netns, netns_unavailable
from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.node.daemon import addrbook
from seedswarm.node.daemon.mdns import txt_addrs
from tests.benchproc import skip_unless_possible
from tests.test_daemon import ENV, PY, Node, init_swarm, status_of, wait_for

BOUND = 180.0  # seconds: four daemons importing torch on a busy 2-core machine


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
    # saved while it runs (every 10 s when changed: a SIGKILL loses little), then again at its stop
    book_d = data_d / addrbook.BOOK_FILE
    wait_for(lambda: book_d.exists() and {id_b, id_c} <= {e.peer_id for e in addrbook.load(book_d, bytes.fromhex(run_id), "")[0]},
             BOUND, "D's periodic save of its book")
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
    ph = st["phases"]
    print(f"restart with a dead bootstrap: first round applied {st['first_apply_at'] - st['started_at']:.1f} s "
          f"after process start ({st['first_apply_at'] - t0:.1f} s after spawn): listening at "
          f"{ph['listening'] - st['started_at']:.1f} s (imports), first peer {ph['first_peer'] - ph['listening']:.2f} s "
          f"and first round {st['first_apply_at'] - ph['listening']:.2f} s after it; book loaded "
          f"{st['discovery']['book_loaded']}, answered {st['discovery']['book_answered']}")
    for n in (b, c, d2):
        rc, took = n.stop(signal.SIGTERM)
        assert rc == 0, n.logs()[-3000:]


# A hostile host on the LAN: a real zeroconf responder announcing the service type the nodes
# browse, with TXT records no node should act on (argv: its address, a real peer id to name)
JUNK_ANNOUNCER = r"""
import asyncio, socket, sys
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
ip, victim = sys.argv[1], sys.argv[2].encode()
T = "_p2p._udp.local."
cases = [
    {b"dnsaddr": b"\xff\xfe\xfd"},
    {b"dnsaddr": b"/ip4/999.1.1.1/tcp/1/p2p/" + victim},
    {b"dnsaddr": b"/ip4/10.1.1.1/tcp/99999/p2p/" + victim},
    {b"dnsaddr": b"/ip4/10.1.1.1/tcp/1/p2p/notapeerid"},
    {b"dnsaddr": b"/ip4/10.1.1.1/tcp/1/p2p/12D3KooWA", b"dnsaddr2": b"/ip4/10.1.1.2/tcp/1/p2p/12D3KooWB"},
    {b"other": b"x" * 200},
    {b"dnsaddr": b"/" + b"a" * 200},
]
async def main():
    azc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    tasks = []
    for i, props in enumerate(cases * 2):
        info = ServiceInfo(T, f"junk{i}.{T}", port=1, properties=props, server=f"junk{i}.local.",
                           addresses=[socket.inet_aton(ip)])
        tasks.append(await azc.async_register_service(info))
    await asyncio.gather(*tasks)
    print("announced", len(tasks), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


@pytest.mark.slow
def test_mdns_finds_the_run_on_a_lan_without_bootstrap(tmp_path: Path) -> None:
    """Three hosts (network namespaces on one bridge), ``--mdns`` and no bootstrap list: the two
    founders of one run find each other and train to one head; a node of another run on the same
    LAN is heard too, dialled, and refused by the hello's run-id check; a hostile responder's
    announcements (garbage TXT records, bad addresses, a real node's peer id at bad addresses) are
    counted and ignored."""
    skip_unless_possible("mDNS test", netns_unavailable())
    data_b = tmp_path / "b"
    data_b.mkdir(mode=0o700)
    ident_b = Identity.generate()
    ident_b.save(data_b / "identity.key")
    genesis, data_a, run_id = init_swarm(tmp_path, "--min-round-time", "0.5", "--member", ident_b.public.hex())
    other = tmp_path / "other"
    other.mkdir()
    genesis_z, data_z, run_z = init_swarm(other, "--min-round-time", "0.5", "--seed", "7")
    assert run_z != run_id
    lan = Netns(3, prefix="ssm")
    procs: list[subprocess.Popen[bytes]] = []
    logs = [open(tmp_path / f"{n}.log", "wb") for n in ("a", "b", "z")]  # noqa: SIM115 - closed below
    try:
        lan.up()
        junk_log = open(tmp_path / "junk.log", "wb")  # noqa: SIM115 - closed below
        logs.append(junk_log)
        procs.append(subprocess.Popen(["ip", "netns", "exec", lan.ns(2), PY[0], "-c", JUNK_ANNOUNCER, lan.ip(2),
                                       peer_id_of(ident_b.public)], stdout=junk_log, stderr=junk_log, env=ENV))
        for i, (g, data, extra) in enumerate(((genesis, data_a, ["--min-peers", "1", "--sync-wait-s", "120"]),
                                              (genesis, data_b, ["--min-peers", "1", "--sync-wait-s", "120"]),
                                              (genesis_z, data_z, []))):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", lan.ns(i), *PY, "node", "--genesis", str(g), "--data-dir", str(data),
                 "--log-format", "json", "--listen", "/ip4/0.0.0.0/tcp/4001", "--mdns", "--halt-at", "40", *extra],
                stdout=logs[i], stderr=logs[i], env=ENV))

        def done() -> tuple[dict[str, Any], ...] | None:
            a, b, z = (status_of(d) for d in (data_a, data_b, data_z))
            if a and b and z and a["round"] >= 40 and b["round"] >= 40 and a["head"] == b["head"]:
                return a, b, z
            return None

        a, b, z = wait_for(done, BOUND, "A and B at round 40 on one head, found through mDNS alone")
        assert a["model_digest"] == b["model_digest"] and b["members"] == 2
        assert a["discovery"]["mdns_found"] >= 1 and b["discovery"]["mdns_found"] >= 1
        # Z (another run) was heard and dialled, and the hello refused it on both sides
        wait_for(lambda: all(f"refusing peer {z['peer_id']}" in (tmp_path / f"{n}.log").read_text() for n in "ab"),
                 BOUND, "A and B refuse the node of another run")
        assert z["peer_id"] not in a["peer_ids"] + b["peer_ids"]
        assert z["round"] > 0 and z["head"] != a["head"]  # Z trained alone in its own run
        assert b"announced 14" in (tmp_path / "junk.log").read_bytes(), (tmp_path / "junk.log").read_text()
        ignored = [s["discovery"]["mdns_ignored"] for s in (a, b)]
        assert min(ignored) >= 1, ignored  # heard, counted, and (above) never a reason to stop
        junk = procs.pop(0)
        junk.kill()
        junk.wait()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(15) for p in procs] == [0, 0, 0]
        assert all(b"Traceback" not in (tmp_path / f"{n}.log").read_bytes() for n in "abz")
        found = [json.loads(x)["ts"] for x in (tmp_path / "b.log").read_text().splitlines()
                 if "mDNS: found " + a["peer_id"] in x]
        print(f"mDNS: B found A {found[0] - b['phases']['listening']:.1f} s after it listened "
              f"({found[0] - b['started_at']:.1f} s after process start); both at round 40 on one head; "
              f"announcements ignored (A, B): {ignored}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        lan.down()


def test_mdns_txt_record_addresses() -> None:
    """A peer's TXT record as py-libp2p writes it: ``dnsaddr``, ``dnsaddr2``, ... in that order;
    other keys and non-text values are ignored (the LAN is untrusted)."""
    props: dict[bytes, bytes | None] = {b"dnsaddr10": b"/ip4/10.0.0.10/tcp/1", b"dnsaddr2": b"/ip4/10.0.0.2/tcp/1",
                                        b"dnsaddr": b"/ip4/10.0.0.1/tcp/1", b"id": b"x", b"dnsaddr3": None,
                                        b"dnsaddr4": b"\xff\xfe"}
    assert txt_addrs(props) == ["/ip4/10.0.0.1/tcp/1", "/ip4/10.0.0.2/tcp/1", "/ip4/10.0.0.10/tcp/1"]
    assert txt_addrs({f"dnsaddr{i}".encode(): b"/ip4/1.1.1.1/tcp/1" for i in range(2, 40)}) == ["/ip4/1.1.1.1/tcp/1"] * 8
