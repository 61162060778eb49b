"""The daemon's LocalChain under a memory budget: fewer kept states, same bits; checkpoints
served from their files, not from blobs held in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seedswarm.gossip.wire import Record
from seedswarm.node.core.chain import ChainState, next_state
from seedswarm.node.core.effects import Apply
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.joinplan import assemble
from seedswarm.node.daemon.localchain import MAX_SERVED, SUPERSEDED_GRACE_S, LocalChain
from seedswarm.node.daemon.store import ChainStore, CheckpointDir
from seedswarm.node.learn.checkpoint import decode_params
from seedswarm.node.learn.momentum import with_buffers
from seedswarm.node.learn.replay import ModelStates, apply_record_, model_digest, params_bytes
from tests.corenet import fresh_params, honest_records, make_genesis


def _after(steps: list[tuple[ChainState, Record]]) -> ChainState:
    st, rec = steps[-1]
    return next_state(st, rec)


def _chain(tmp: Path, g: Genesis, params: list[torch.Tensor], every: int, **kw: object) -> LocalChain:
    store = ChainStore(tmp / "chain.log", g.run_id)
    ckdir = CheckpointDir(tmp / "checkpoints", g.run_id, 256, keep=2)
    return LocalChain(g, store, ckdir, params, every, **kw)  # type: ignore[arg-type]


def _one_by_one(chain: LocalChain, steps: list[tuple[ChainState, Record]]) -> None:
    """As the daemon does: apply each record, then maybe write a checkpoint."""
    for st, rec in steps:
        params = chain.apply(Apply(base=st, steps=((st, rec),), head=next_state(st, rec)))
        chain.maybe_checkpoint(params)


def test_model_states_budget_bounds_the_copies_kept() -> None:
    g = make_genesis()
    root = ChainState.initial(g)
    params = fresh_params()
    one = params_bytes(params)
    assert ModelStates(root, params, keep=16).keep == 16
    assert ModelStates(root, params, keep=16, budget_bytes=10 * one).keep == 10
    assert ModelStates(root, params, keep=16, budget_bytes=100 * one).keep == 16
    assert ModelStates(root, params, keep=16, budget_bytes=0).keep == 2  # never fewer than 2
    states = ModelStates(root, params, keep=16, budget_bytes=3 * one + 1)
    steps = honest_records(root, 6, seed=1)
    states.advance(root, steps)
    assert len(states) == 3 and not states.has(root.head) and states.has(_after(steps).head)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_a_fork_switch_deeper_than_the_kept_states_ends_on_the_same_bits(tmp_path: Path, momentum: float) -> None:
    """A budget of 2 states, a switch 5 rounds deep: the base is gone, so the chain rebuilds from
    its round-4 checkpoint and replays; it must end exactly where an unbounded chain (which
    still holds the base) and a plain replay end. With momentum the state and the checkpoints
    carry the buffers too (node/learn/momentum.py)."""
    g = make_genesis()
    root = ChainState.initial(g)

    def fresh_state() -> list[torch.Tensor]:
        return with_buffers(fresh_params(), momentum)

    one = params_bytes(fresh_state())
    ours = honest_records(root, 10, seed=1)  # rounds 0..9: checkpoints at rounds 4 and 8
    fork_at = ours[5][0]  # the common ancestor: after 5 records
    theirs = ours[:5] + honest_records(fork_at, 7, seed=2)  # 12 records, apart from round 5 on
    assert record_heads(theirs)[5] == fork_at.head and record_heads(theirs)[6] != record_heads(ours)[6]

    bounded = _chain(tmp_path / "bounded", g, fresh_state(), 4, state_budget_bytes=2 * one + 1, momentum=momentum)
    unbounded = _chain(tmp_path / "unbounded", g, fresh_state(), 4, keep_states=64, state_budget_bytes=None,
                       momentum=momentum)
    assert bounded.states.keep == 2 and unbounded.states.keep == 64
    for chain in (bounded, unbounded):
        _one_by_one(chain, ours)
        assert chain.checkpoint is not None and chain.checkpoint.round == 8
    assert not bounded.states.has(fork_at.head) and unbounded.states.has(fork_at.head)

    switch = Apply(base=fork_at, steps=tuple(theirs[5:]), head=_after(theirs))
    got = {name: chain.apply(switch) for name, chain in (("bounded", bounded), ("unbounded", unbounded))}
    assert bounded.base_round == 4  # rebuilt: from the checkpoint on the common prefix, not the genesis
    assert unbounded.base_round == 0  # advanced from the kept base, no rebuild
    assert len(bounded.states) <= 2

    want = fresh_state()
    for st, rec in theirs:
        apply_record_(want, st, rec, None, momentum)
    assert got["bounded"] is not None and got["unbounded"] is not None
    assert model_digest(got["bounded"]) == model_digest(got["unbounded"]) == model_digest(want)
    assert all(torch.equal(a, b) for a, b in zip(got["bounded"], want, strict=True))

    # and a restart on the same data dir agrees
    bounded.close()
    again = _chain(tmp_path / "bounded", g, fresh_state(), 4, state_budget_bytes=2 * one + 1, momentum=momentum)
    assert again.head.head == _after(theirs).head
    assert model_digest(again.params(again.head.head) or []) == model_digest(want)
    again.close()
    unbounded.close()


def record_heads(steps: list[tuple[ChainState, Record]]) -> list[bytes]:
    return [st.head for st, _ in steps]


def test_checkpoints_are_served_from_their_files(tmp_path: Path) -> None:
    """No blob stays in memory; the chunks read back assemble to the checkpoint; a checkpoint
    whose file was pruned is still served while it is recent, and for SUPERSEDED_GRACE_S after
    (a slow joiner's download), up to MAX_SERVED; a damaged chunk is not served."""
    g = make_genesis()
    root = ChainState.initial(g)
    torch.manual_seed(3)
    params = [p.detach().clone() for p in torch.nn.Linear(24, 20).parameters()]  # 2,000 bytes: 9 chunks
    now = [0.0]
    chain = _chain(tmp_path, g, params, 2, clock=lambda: now[0])
    steps = honest_records(root, 30, seed=5)
    _one_by_one(chain, steps[:2])
    first = chain.manifest()
    assert first is not None and first.round == 2 and len(first.chunks) >= 8
    assert not hasattr(chain.checkpoint, "blob")

    def served(m: object) -> bytes | None:
        chunks = [chain.chunk(m.state, i) for i in range(len(m.chunks))]  # type: ignore[attr-defined]
        return None if any(c is None for c in chunks) else assemble(m, chunks)  # type: ignore[arg-type]

    want = params
    for st, rec in steps[:2]:
        want = [p.clone() for p in want]
        apply_record_(want, st, rec)
    blob = served(first)
    assert blob is not None
    assert all(torch.equal(a, b) for a, b in zip(decode_params(blob, params)[2], want, strict=True))

    _one_by_one(chain, steps[2:6])  # checkpoints of rounds 4 and 6: round 2's file is deleted
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(files) == 2 and not any(f.startswith("0000000002-") for f in files)
    assert served(first) == blob  # still recent: served from the open file
    assert chain.chunk(first.state, len(first.chunks)) is None

    now[0] = 10.0
    _one_by_one(chain, steps[6:8])  # round 8: round 2 is beyond the count, superseded 10 s ago
    assert served(first) == blob
    now[0] = 10.0 + SUPERSEDED_GRACE_S
    _one_by_one(chain, steps[8:10])  # round 10: round 2 was superseded long ago, round 4 too
    assert chain.chunk(first.state, 0) is None
    assert len(chain.recent) == 3
    eighth = [m for m in (c.manifest for c in chain.recent.values()) if m.round == 8][0]
    assert served(eighth) is not None

    for i in range(10, 30, 2):  # fast rounds within the grace: the count is capped all the same
        _one_by_one(chain, steps[i : i + 2])
        assert len(chain.recent) <= MAX_SERVED
    newest = chain.manifest()
    assert newest is not None and newest.round == 30 and served(newest) is not None
    assert len(chain.recent) == MAX_SERVED and chain.chunk(eighth.state, 0) is None

    path = next((tmp_path / "checkpoints").glob("0000000030-*.ckpt"))
    with open(path, "r+b") as f:  # damage chunk 3 of the file being served, in place
        f.seek(3 * 256 + 10)
        byte = f.read(1)
        f.seek(3 * 256 + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert chain.chunk(newest.state, 3) is None
    assert chain.chunk(newest.state, 2) is not None
    chain.close()
    assert chain.chunk(newest.state, 2) is None


def test_the_node_setting_defaults_to_the_chains_budget() -> None:
    from seedswarm.node.daemon.config import ConfigError, NodeConfig
    from seedswarm.node.daemon.localchain import STATE_BUDGET_BYTES

    assert NodeConfig().state_cache_mb << 20 == STATE_BUDGET_BYTES
    with pytest.raises(ConfigError, match="state_cache_mb"):
        NodeConfig(state_cache_mb=-1)
