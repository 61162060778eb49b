"""Small end-to-end simulations: determinism, crash tolerance, joining, plug-in tasks, outputs."""

from __future__ import annotations

import json

import pytest

from seedswarm.sim.runner import SimConfig, run

SMALL = dict(nodes=20, trainers=5, directions=16, rounds=15, eval_every=5, quiet=True, max_wall=60.0)


def _run(**kw):
    cfg = dict(SMALL)
    cfg.update(kw)
    return run(SimConfig(**cfg))


@pytest.fixture(scope="module")
def seed0_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("simout")
    a = _run(seed=0, out=str(out))
    b = _run(seed=0)
    return a, b, out


def test_same_seed_same_summary(seed0_pair):
    a, b, _ = seed0_pair
    assert a["rounds"] >= 15
    for k in ("final_accuracy", "total_bytes", "rounds", "genesis_run_id"):
        assert a[k] == b[k], k
    assert a["honest_digest_agreement"] == 1.0
    assert b["honest_digest_agreement"] == 1.0
    assert a["final_accuracy"] is not None


def test_different_seed_differs(seed0_pair):
    a, _, _ = seed0_pair
    c = _run(seed=1)
    assert c["genesis_run_id"] != a["genesis_run_id"]
    assert (c["total_bytes"], c["final_accuracy"]) != (a["total_bytes"], a["final_accuracy"])


def test_outputs_written(seed0_pair):
    a, _, out = seed0_pair
    files = {p.name for p in out.iterdir()}
    assert {"summary.json", "metrics.jsonl", "report.html"} <= files
    pngs = sorted(f for f in files if f.endswith(".png"))
    assert len(pngs) >= 2, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_bytes"] == a["total_bytes"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines and max(x["round"] for x in lines) >= 15
    assert any("accuracy" in x for x in lines)


def test_crash_half_still_progresses():
    s = _run(seed=2, rounds=20, crash_fraction=0.5, crash_at=5)
    assert s["crash_round"] == 5
    assert s["rounds"] >= 20
    assert s["honest_digest_agreement"] == 1.0


def test_join_nodes_become_members():
    s = _run(seed=3, join_nodes=2, join_at=3)
    assert s["nodes_total"] == 22
    assert len(s["join_seconds"]) == 2, s["join_seconds"]
    assert all(x >= 0 for x in s["join_seconds"])
    assert s["honest_digest_agreement"] == 1.0


def test_plugin_task(tmp_path, monkeypatch):
    (tmp_path / "seedswarm_test_plugmod.py").write_text(
        "from seedswarm.node.learn.tasks import DigitsTask\n"
        "CALLS = []\n"
        "def factory(options, seed):\n"
        "    CALLS.append(seed)\n"
        "    return DigitsTask(options, seed)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    s = _run(task="seedswarm_test_plugmod:factory", rounds=5, seed=4)
    import seedswarm_test_plugmod

    assert seedswarm_test_plugmod.CALLS, "the plug-in factory was never called"
    assert s["task"] == "seedswarm_test_plugmod:factory"
    assert s["rounds"] >= 5
    assert s["final_accuracy"] is not None


def test_eighty_percent_crash_is_expelled_and_the_chain_goes_on():
    """MoDeST's harshest churn: 80% of nodes crash at once. The records expel the silent members
    (their missed duties are on the chain), the survivors keep agreeing, and rounds go on."""
    s = _run(seed=5, nodes=30, rounds=45, crash_fraction=0.8, crash_at=8, eval_every=15)
    assert s["crash_round"] == 8
    assert s["rounds"] >= 45
    assert s["honest_digest_agreement"] == 1.0
    assert s["final_members"] <= 30 - 20, "crashed members were not expelled by the records"


def test_graceful_leaves_leave_the_membership():
    """A Leave is gossiped, an aggregator puts it in a record, and the chain drops the member:
    the leavers are gone from the final membership without any missed-duty expulsion."""
    # Five rounds after the leave: too few for four missed duties (the expulsion threshold).
    s = _run(seed=6, rounds=8, leave_nodes=3, leave_at=3)
    assert s["rounds"] >= 8
    assert s["bytes_by_kind"].get("Leave", 0) > 0
    assert s["final_members"] == 20 - 3
    assert s["honest_digest_agreement"] == 1.0


def test_joiners_sync_records_and_download_a_checkpoint_over_the_links():
    """A simulated joiner starts from the genesis, as a new host does: it syncs the records from
    its peers, downloads the newest checkpoint in hash-checked chunks, announces its Join and
    becomes a member, all through its own core; its join time is made of that traffic."""
    s = _run(seed=7, rounds=40, join_nodes=2, join_at=25, checkpoint_every=10, checkpoint_chunk_bytes=2048)
    assert s["nodes_total"] == 22 and s["honest_digest_agreement"] == 1.0
    assert len(s["join_seconds"]) == 2 and all(t > 0 for t in s["join_seconds"])
    assert s["join_checkpoint_rounds"] == [20, 20]
    assert len(s["join_member_seconds"]) == 2
    kinds = s["bytes_by_kind"]
    assert kinds.get("ChainResponse", 0) > 0 and kinds.get("CheckpointChunk", 0) > 0 and kinds.get("Join", 0) > 0
    assert s["final_members"] == 22


def test_a_bigger_model_joins_more_slowly_on_a_slower_link():
    small = _run(seed=8, rounds=30, join_nodes=2, join_at=22, checkpoint_every=10)
    big = _run(seed=8, rounds=30, join_nodes=2, join_at=22, checkpoint_every=10, bandwidth_mbps=5.0,
               task_options={"hidden": 1024})
    assert small["join_checkpoint_rounds"] == big["join_checkpoint_rounds"] == [20, 20]
    t_small = sum(small["join_seconds"]) / 2
    t_big = sum(big["join_seconds"]) / 2
    # about 0.27 MB of parameters at 5 Mbit/s: the chunk transfer alone is ~0.4 s per joiner
    assert t_big > t_small + 0.3, (t_small, t_big)


def test_a_lying_peer_cannot_make_a_simulated_node_undo_beyond_max_undo():
    """In the simulator, through the same core: a member serves a private chain that leaves the
    swarm's at the genesis (valid empty records it signed as a fallback aggregator) and claims it
    is far ahead. The node it lures notes a deep fork, and keeps every round it had."""
    from seedswarm.node.core.chain import ChainState, build_record, checked_next_state
    from seedswarm.sim.runner import build

    sim = build(SimConfig(**{**SMALL, "rounds": 40, "seed": 9}))
    sim.start()
    sim.run(15)
    liar, victim = sim.nodes[5], sim.nodes[0]
    st, fake = ChainState.initial(sim.genesis), []
    for _ in range(200):
        rec, _ = build_record(st, liar.identity, [])
        fake.append(rec.encode())
        st = checked_next_state(st, rec)

    class Lies:
        def length(self) -> int:
            return len(fake)

        def record(self, r: int) -> bytes | None:
            return fake[r] if 0 <= r < len(fake) else None

        def head_at(self, r: int) -> bytes | None:
            return None

        def manifest(self) -> None:
            return None

        def chunk(self, digest: bytes, index: int) -> None:
            return None

    liar.core.history = Lies()  # type: ignore[assignment]
    before = sim.index.path(victim.core.head.head)[0]
    sim.handle(victim, victim.core.on_peer(sim.now, liar.key, len(fake)))
    sim.run(35)
    after = sim.index.path(victim.core.head.head)[0]
    assert after[: len(before) - victim.core.cfg.max_undo] == before[: len(before) - victim.core.cfg.max_undo]
    assert victim.core.counters.get("rejected.deep-fork", 0) >= 1
    assert victim.core.counters.get("sync.resyncs", 0) == 0
    assert victim.core.head.round >= sim.best_round - 1  # and it kept up with the swarm
