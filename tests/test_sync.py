"""Chain sync in the core: a node that missed a record rejoins its peers' chain; a deep fork is
undone only on the word of several agreeing peers, never on one hostile peer's.

Every scenario runs real NodeCores on the deterministic in-memory network of ``tests.corenet``
(records, contributions, chain requests and responses cross it as bytes).
"""

from __future__ import annotations

from typing import Any

from seedswarm.gossip.wire import ChainRequest, ChainResponse, Message, Record
from seedswarm.node.core.chain import ChainState, build_record, checked_next_state, record_hash
from seedswarm.node.core.effects import Resync
from seedswarm.node.core.protocol import NodeCore
from tests.corenet import BY_PUB, IDS, Net, NetHistory, make_genesis


def _aggregator(st: ChainState, rank: int) -> bytes:
    return next(p for p in st.eligible if st.aggregator_rank(p) == rank)


def test_a_node_that_missed_the_winning_record_rejoins_within_a_few_rounds() -> None:
    """Round 3 has two valid records: the full one (rank 0) that everyone applies, and an empty
    fallback record (rank 1) that only X receives, because X missed the full one. X moves onto
    the fallback record; the others build on the full one. Asking for the chain from its own
    round, as the first version did, X never got the full record and stayed split for good; asked
    from the root of its window, the full record comes with the rest and fork choice moves X."""
    g = make_genesis()
    net = Net(g)
    x = IDS[7].public
    fork = 3
    state: dict[str, Any] = {}

    def inbound(net2: Net, key: bytes, m: tuple[Message, bytes | None]) -> list[Any] | None:
        msg, _ = m
        if "fallback" not in state:
            if isinstance(msg, Record) and msg.round == fork and net2.cores[key].head.round == fork:
                # X misses the round's record; it gets a fallback record of the same round, and
                # then hears nothing for a while, so it applies the fallback and moves on from it
                parent = net2.cores[key].head
                fb, _ = build_record(parent, BY_PUB[_aggregator(parent, 1)], [])
                state.update(fallback=record_hash(fb), winner=record_hash(msg), heal=net2.now + 2.5)
                return net2.cores[key].on_message(net2.now, fb, None)
            return None
        if net2.now < state["heal"] or (isinstance(msg, Record) and record_hash(msg) == state["winner"]):
            return []  # cut off; and the winner never reaches X by gossip
        return None

    net.inbound[x] = inbound
    net.run(fork + 12, max_time=40.0)
    net.settle()
    assert "fallback" in state
    assert net.cores[x].counters.get("heads.switched", 0) >= 1, "X never moved onto the fallback record and back"
    assert len(net.heads()) == 1, "the swarm did not reconverge"
    assert len(net.digests()) == 1
    assert net.chains[x] == net.chains[IDS[0].public]
    assert net.records[net.chains[x][fork]] is not None and net.chains[x][fork] == state["winner"]
    core = net.cores[x]
    assert core.counters.get("heads.switched", 0) >= 1 and core.counters.get("sync.requests", 0) >= 1


def _private_chain(base: ChainState, by: bytes, n: int) -> list[Record]:
    """``n`` valid empty records by one member (as a fallback aggregator), from ``base`` on."""
    out, st = [], base
    for _ in range(n):
        rec, _ = build_record(st, BY_PUB[by], [])
        out.append(rec)
        st = checked_next_state(st, rec)
    return out


def test_one_hostile_peer_cannot_make_a_node_undo_beyond_max_undo() -> None:
    """A member builds a private chain of valid (empty) records from round 1 and serves it to a
    node at round 12 as the answer to its chain requests: the node notes a deep fork, counts it
    against the peer, and keeps every stored round (no resync on one peer's word)."""
    g = make_genesis()
    net = Net(g)
    net.run(12, max_time=30.0)
    victim, liar = IDS[0].public, IDS[5].public
    before = list(net.chains[victim])
    root = ChainState.initial(g)
    first = checked_next_state(root, net.records[before[0]])
    fake = _private_chain(first, liar, 40)
    core = net.cores[victim]
    out = []
    for _ in range(4):  # it asks, the liar answers with its chain, the core probes back
        req = ChainRequest(run=g.run_id, start=core.tree.root().round, limit=256)
        core.sync.request(net.now, liar, req.start)
        resp = ChainResponse(run=g.run_id, start=req.start, head=41,
                             records=tuple(r.encode() for r in fake[req.start - 1:][:256]))
        out += core.on_message(net.now, resp, liar)
        probes = [e for e in out if getattr(e, "to", None) == liar and isinstance(e.msg, ChainRequest)]
        for p in probes[-1:]:
            start = p.msg.start
            recs = [net.records[h] for h in before[:1]] + fake  # their chain: our round 0 record, then theirs
            out += core.on_message(net.now, ChainResponse(run=g.run_id, start=start, head=41,
                                                          records=tuple(r.encode() for r in recs[start:][: p.msg.limit])), liar)
    assert not any(isinstance(e, Resync) for e in out)
    assert net.chains[victim][: len(before)] == before
    assert core.counters.get("rejected.deep-fork", 0) >= 1
    assert core.head.round >= 12


def _replay_states(g: Any, records: list[Record]) -> ChainState:
    st = ChainState.initial(g)
    for rec in records:
        st = checked_next_state(st, rec)
    return st


def test_a_node_on_a_deep_minority_fork_resyncs_when_its_peers_agree() -> None:
    """Y is cut off for long enough that its own chain (empty fallback records it publishes
    alone) leaves the swarm's further back than max_undo. When the link heals, its peers'
    records do not connect to its window; at least two of them agree on the chain that left
    Y's at the fork point, so Y archives its rounds after it and resyncs: one head again."""
    g = make_genesis()
    net = Net(g)
    y = IDS[7].public
    cut: dict[str, bool] = {"on": False}

    def partition(net2: Net, key: bytes, m: tuple[Message, bytes | None]) -> list[Any] | None:
        msg, frm = m
        if not cut["on"]:
            return None
        if key == y or frm == y:
            return []
        return None

    def outbound(net2: Net, key: bytes, e: Any) -> list[Any] | None:
        if cut["on"] and hasattr(e, "msg") and not hasattr(e, "to"):
            return []  # Y's gossip goes nowhere while cut off
        return None

    net.inbound[y] = partition
    for k in net.cores:
        if k != y:
            net.inbound[k] = partition
    net.outbound[y] = outbound
    resyncs: list[Resync] = []

    def handle_resync(net2: Net, key: bytes, e: Any) -> list[Any] | None:
        if isinstance(e, Resync):
            resyncs.append(e)
            records = [net2.records[h] for h in net2.chains[key][: e.fork_round]]
            net2.chains[key] = net2.chains[key][: e.fork_round]
            ident = BY_PUB[key]
            core = NodeCore(g, ident, net2.cores[key].cfg, base=_replay_states(g, records), history=NetHistory(net2, key))
            net2.cores[key] = core
            out = core.start(net2.now)
            for v in e.voters:
                out += core.on_peer(net2.now, v, len(net2.chains[v]))
            return out
        return outbound(net2, key, e)

    net.outbound[y] = handle_resync
    net.run(3, max_time=5.0)
    cut["on"] = True
    net.push(0.0, "call", None, lambda n: None)
    t_cut = net.now
    net.run(20, max_time=t_cut + 40.0)
    others = [k for k in net.cores if k != y]
    assert min(net.cores[k].head.round for k in others) >= 20
    fork_at = next(i for i, (a, b) in enumerate(zip(net.chains[y], net.chains[others[0]], strict=False)) if a != b)
    assert net.cores[y].head.round - fork_at > net.cores[y].cfg.max_undo or net.cores[y].head.round < fork_at + 1
    cut["on"] = False
    net.run(net.cores[others[0]].head.round + 6, max_time=net.now + 60.0)
    net.settle()
    assert resyncs, "the node on the minority fork never resynced"
    assert len(net.heads()) == 1 and len(net.digests()) == 1
