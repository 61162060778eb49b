"""A joiner whose chosen checkpoint disappears from its servers mid-download (pruned while it was
slow: fast rounds, a slow link) asks again for the newest one instead of replaying the whole
chain (``node.core.syncing``, ``JoinPlan.unavailable``); the simulator drives the same core."""

from __future__ import annotations

from typing import Any

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import CheckpointChunk, CheckpointManifest
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.effects import InstallCheckpoint, Notice, Reply
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import CoreConfig
from seedswarm.node.learn.initial import build_genesis
from seedswarm.sim.engine import NetConfig, Simulation

FOUNDERS = [Identity.from_seed(bytes([0x50 + i]) * 32) for i in range(3)]
JOINER = Identity.from_seed(b"\x5f" * 32)
EVERY = 5


def _run(drop_first: bool) -> tuple[list[Any], int | None, bytes | None, Simulation, Any]:
    from seedswarm.node.learn.tasks import load_task

    g: Genesis = build_genesis([i.public for i in FOUNDERS], task="digits", task_options={"hidden": 16},
                               trainers=3, aggregators=2, directions=16, seed=7, min_round_time=1.0)
    task = load_task(g.task, dict(g.task_options), seed=g.seed)
    sim = Simulation.create(g, task, [], NetConfig(latency_ms=10.0), seed=3,
                            core_config=CoreConfig(auto_join=True, checkpoint_gap=EVERY),
                            checkpoint_every=EVERY, checkpoint_chunk_bytes=1024)
    sim.shard_count = 4
    root = ChainState.initial(g)
    for ident in FOUNDERS:
        sim.add_node(ident, root)
    sim.start()
    sim.run(22, max_time=600.0)
    joiner = sim.add_node(JOINER, root)
    seen: list[Any] = []
    gone: list[bytes] = []  # the digest of the first manifest the founders offered the joiner
    handle = sim.handle

    def spy(node: Any, effects: list[Any]) -> None:
        if node is joiner:
            seen.extend(effects)
        elif drop_first:
            kept = []
            for e in effects:
                if isinstance(e, Reply) and isinstance(e.msg, CheckpointManifest) and not gone:
                    gone.append(e.msg.state)
                if isinstance(e, Reply) and isinstance(e.msg, CheckpointChunk) and e.msg.digest in gone:
                    continue  # pruned: the server no longer has it (it answers nothing)
                kept.append(e)
            effects = kept
        handle(node, effects)

    sim.handle = spy  # type: ignore[method-assign]
    sim.start_node(joiner, join=True)
    sim.run(140, max_time=sim.now + 900.0)
    return seen, joiner.checkpoint_round, gone[0] if gone else None, sim, joiner


def test_a_joiner_asks_again_when_its_checkpoint_is_pruned_under_it() -> None:
    seen, installed_at, gone, sim, joiner = _run(drop_first=True)
    notices = [e.detail for e in seen if isinstance(e, Notice) and e.what == "checkpoint"]
    assert gone is not None, "no manifest was ever offered"
    assert any("asking for a newer checkpoint" in n for n in notices), notices
    assert not any("replaying instead" in n for n in notices), notices
    installs = [e for e in seen if isinstance(e, InstallCheckpoint)]
    assert len(installs) == 1 and installs[0].round >= 22, installs
    assert installed_at == installs[0].round
    assert joiner.core.is_member()
    assert "checkpoint-mismatch" not in sim.rejected, sim.rejected  # the install matched the shared model
    # the run stops mid-round (the joiner may hold a record the founders have not yet seen, or
    # the other way round): deliver what is in flight, then all four must share a head and a model
    sim.settle(30.0)
    assert {n.core.head.head for n in sim.nodes} == {joiner.core.head.head}
    assert sim.digest_agreement()[0] == 1.0


def test_without_pruning_the_first_checkpoint_is_installed() -> None:
    """Control: the same run without the drop installs the first manifest's checkpoint."""
    seen, installed_at, _, _, joiner = _run(drop_first=False)
    notices = [e.detail for e in seen if isinstance(e, Notice) and e.what == "checkpoint"]
    assert not notices, notices
    assert installed_at is not None and 20 <= installed_at < 22 + 10, installed_at
    assert joiner.core.is_member()
