"""`seedswarm sim`: configure a simulated swarm, run it, write summary.json, metrics.jsonl and plots."""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from seedswarm.crypto.projection import CACHE_BYTES_PER_ELEMENT, set_direction_cache
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.genesis import GenesisOptions
from seedswarm.node.core.protocol import CoreConfig
from seedswarm.node.learn.initial import build_genesis
from seedswarm.node.learn.replay import bind_
from seedswarm.node.learn.tasks import load_task, param_count, task_metric
from seedswarm.progress import Progress
from seedswarm.sim.engine import NetConfig, Simulation, identities
from seedswarm.sim.runlog import RunLog


@dataclass
class SimConfig(GenesisOptions):
    nodes: int = 100
    rounds: int = 800
    seed: int = 0
    task_options: dict[str, Any] = field(default_factory=dict)
    protocol: str = "seedswarm"
    byzantine: float = 0.0
    attack: str = "none"
    target: float | None = None  # in the task's metric; None: the task's default (digits: accuracy 0.9)
    eval_every: int = 10
    stop_at_target: bool = False
    crash_fraction: float = 0.0
    crash_at: int = -1
    join_nodes: int = 0
    join_at: int = -1
    leave_nodes: int = 0
    leave_at: int = -1
    latency_ms: float = 40.0
    loss: float = 0.0
    bandwidth_mbps: float = 100.0  # every node's link
    checkpoint_every: int = 20  # rounds between checkpoints nodes serve to joiners (0: joiners replay)
    checkpoint_chunk_bytes: int = 1 << 16
    max_wall: float = math.inf
    # Direction matrices kept for the round's other trainers (crypto.projection.set_direction_cache):
    # at most this many MiB, used only when every group's matrix fits (direction_budget), and only
    # by projections above 2 MiB (lm, large digits models).
    direction_cache_mb: int = 2048
    out: str | None = None
    quiet: bool = False


def build(cfg: SimConfig) -> Simulation:
    if cfg.protocol != "seedswarm":
        raise ValueError(f"build() is for the seedswarm protocol; {cfg.protocol!r} runs in sim/baselines.py")
    idents = identities(cfg.nodes, cfg.seed)
    genesis = build_genesis(
        [i.public for i in idents], task=cfg.task, task_options=cfg.task_options, seed=cfg.seed,
        **cfg.genesis_fields(), round_timeout=max(0.5, 8 * cfg.latency_ms / 1000.0), min_round_time=0.05,
    )
    task = load_task(cfg.task, cfg.task_options, seed=cfg.seed)
    net = NetConfig(latency_ms=cfg.latency_ms, loss=cfg.loss, bandwidth_mbps=cfg.bandwidth_mbps)
    core = CoreConfig(auto_join=True, checkpoint_gap=cfg.checkpoint_every)
    sim = Simulation.create(genesis, task, [], net, cfg.seed, core, checkpoint_every=cfg.checkpoint_every,
                            checkpoint_chunk_bytes=cfg.checkpoint_chunk_bytes)
    sim.shard_count = cfg.nodes + cfg.join_nodes
    root = ChainState.initial(genesis)
    for ident in idents:
        sim.add_node(ident, root)
    n_byz = int(round(cfg.byzantine * cfg.nodes))
    if n_byz:
        from seedswarm.sim.attacks import get_attack

        sim.attack = get_attack(cfg.attack)
        for i in np.random.default_rng([cfg.seed, 0xB1]).choice(cfg.nodes, n_byz, replace=False):
            sim.nodes[int(i)].byzantine = True
    return sim


def describe(cfg: SimConfig) -> str:
    """The header line of a run: its configuration in one sentence."""
    opts = ", ".join(f"{k}={v}" for k, v in cfg.task_options.items())
    parts = [f"{cfg.nodes} nodes", f"{cfg.rounds} rounds", f"task {cfg.task}" + (f" ({opts})" if opts else ""),
             f"seed {cfg.seed}"]
    if cfg.protocol == "seedswarm":
        parts += [f"estimator {cfg.estimator}", f"{cfg.trainers} trainers",
                  f"K={cfg.directions} directions" + (f" x {cfg.groups} groups" if cfg.groups > 1 else ""),
                  f"aggregator {cfg.aggregator}", f"lr {cfg.lr}"]
    else:
        parts += [f"{cfg.local_steps} local step(s) at lr {cfg.local_lr}"]
    parts.append(f"batch {cfg.batch_size}")
    if cfg.byzantine:
        parts.append(f"{cfg.byzantine:.0%} Byzantine ({cfg.attack})")
    if cfg.crash_fraction > 0 and cfg.crash_at >= 0:
        parts.append(f"{cfg.crash_fraction:.0%} crash at round {cfg.crash_at}")
    if cfg.join_nodes and cfg.join_at >= 0:
        parts.append(f"{cfg.join_nodes} join at round {cfg.join_at}")
    if cfg.leave_nodes and cfg.leave_at >= 0:
        parts.append(f"{cfg.leave_nodes} leave at round {cfg.leave_at}")
    parts.append(f"latency {cfg.latency_ms:g} ms" + (f", loss {cfg.loss:g}" if cfg.loss else ""))
    out = f" -> {cfg.out}" if cfg.out else ""
    return f"seedswarm sim ({cfg.protocol}): " + ", ".join(parts) + out


def run(cfg: SimConfig, log: TextIO | None = None) -> dict[str, Any]:
    """Run the simulation ``cfg`` with a progress bar on ``log`` (default: stderr at call time;
    plain lines when it is not a terminal; nothing with ``cfg.quiet``); returns the summary (also
    written to ``cfg.out``)."""
    log = sys.stderr if log is None else log
    torch.set_num_threads(1)  # tiny models: thread fan-out costs more than it saves
    with Progress(cfg.rounds, header=describe(cfg), stream=log, quiet=cfg.quiet) as progress:
        if cfg.protocol != "seedswarm":
            from seedswarm.sim.baselines import run_baseline

            return run_baseline(cfg, log, progress=progress)
        old = set_direction_cache(0)  # _run sets the budget once it knows the model's size
        try:
            return _run(cfg, progress)
        finally:
            set_direction_cache(old)


def direction_matrices_bytes(groups: int, directions: int, params: int) -> int:
    """What one round's direction matrices take when kept (one per group, float32)."""
    return groups * directions * params * CACHE_BYTES_PER_ELEMENT


def direction_budget(cfg: SimConfig, params: int) -> int:
    """Room for all of a round's direction matrices (one per group), or none at all.

    Trainers of different groups take turns, so a budget that holds fewer matrices than groups
    would evict and regenerate one for almost every trainer: slower than keeping none."""
    budget = cfg.direction_cache_mb << 20
    return budget if direction_matrices_bytes(cfg.groups, cfg.directions, params) <= budget else 0


def _run(cfg: SimConfig, progress: Progress) -> dict[str, Any]:
    wall0 = time.monotonic()
    sim = build(cfg)
    setup_seconds = time.monotonic() - wall0
    assert sim.model is not None
    set_direction_cache(direction_budget(cfg, param_count(sim.model)))
    out_dir = Path(cfg.out) if cfg.out else None
    runlog = RunLog(out_dir, cfg.target, cfg.eval_every, cfg.rounds, progress=progress,
                    metric=task_metric(sim.task))
    runlog.set_initial(sim.task.evaluate(sim.model))  # the genesis model: what the swarm starts from
    crash_round: list[int] = []
    expelled_online: list[tuple[int, int]] = []  # (round, node index): removed while online and not leaving

    def on_round(s: Simulation, st: ChainState) -> None:
        r = st.round
        for peer, at in st.departed.items():
            node = s.by_key.get(peer)
            if at == r - 1 and node is not None and node.online and not node.byzantine and not node.core.leaving:
                expelled_online.append((at, node.index))
        line: dict[str, Any] = {"round": r, "time": round(s.now, 4), "wall": round(time.monotonic() - wall0, 3),
                                "bytes_total": s.bytes_total, "online": sum(n.online for n in s.nodes),
                                "members": len(st.members)}

        def evaluate() -> dict[str, float] | None:
            params = s.states.get(st.head)
            return None if params is None else s.task.evaluate(bind_(s.model, params))  # type: ignore[arg-type]

        runlog.round(line, evaluate)
        # churn schedule (deterministic: drawn from the seeded RNG)
        if r == cfg.crash_at and cfg.crash_fraction > 0:
            alive = [n for n in s.nodes if n.online]
            k = int(len(alive) * cfg.crash_fraction)
            for i in s.rng.choice(len(alive), k, replace=False):
                s.crash(alive[int(i)])
            crash_round.append(r)
            progress.note(f"round {r}: crashed {k} of {len(alive)} nodes at once")
        if r == cfg.leave_at and cfg.leave_nodes > 0:
            alive = [n for n in s.nodes if n.online]
            for i in s.rng.choice(len(alive), min(cfg.leave_nodes, len(alive)), replace=False):
                node = alive[int(i)]
                s.handle(node, node.core.leave(s.now))
                s.push(s.now + 1.0, "call", 0, lambda s2, n=node: s2.crash(n))
            progress.note(f"round {r}: {min(cfg.leave_nodes, len(alive))} node(s) leave")
        if r == cfg.join_at and cfg.join_nodes > 0:
            # Joiners start from the genesis, as a new host does: they learn a few peers, sync the
            # records, download the newest checkpoint in chunks and gossip a Join, all through
            # their own core over the simulated links.
            for ident in identities(cfg.join_nodes, cfg.seed, offset=len(s.nodes)):
                node = s.add_node(ident, ChainState.initial(s.genesis))
                s.start_node(node, join=True)
            progress.note(f"round {r}: {cfg.join_nodes} node(s) start joining")

    byz_metrics = None
    if any(n.byzantine for n in sim.nodes):
        from seedswarm.sim.attacks import ByzantineMetrics

        byz_metrics = ByzantineMetrics()
        plain_on_round = on_round

        def on_round_byz(s: Simulation, st: ChainState) -> None:
            byz_metrics.on_round(s, st)
            plain_on_round(s, st)

        sim.on_round = on_round_byz
    else:
        sim.on_round = on_round
    sim.start()
    stop = (lambda s: runlog.bytes_to_target is not None) if cfg.stop_at_target else None
    sim.run(cfg.rounds, max_wall=cfg.max_wall, stop=stop)
    sim.settle(grace=5 * sim.genesis.round_timeout + 4 * sim.core_config.sync_after)
    # final evaluation on the majority head
    agreement, _ = sim.digest_agreement()
    heads = [n.core.head for n in sim.honest_online()]
    final_head = max(heads, key=lambda st: st.round) if heads else None
    if final_head is not None and (params := sim.states.get(final_head.head)) is not None:
        runlog.set_eval(sim.task.evaluate(bind_(sim.model, params)))
    progress.update(sim.best_round, acc=runlog.acc, loss=runlog.loss, bytes=sim.bytes_total)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    rounds_done = sim.best_round
    n_nodes = len(sim.nodes)
    contrib_bytes = sim.bytes_by_kind.get("Contribution", 0)
    trainer_rounds = max(1, sim.estimates)
    summary: dict[str, Any] = {
        "protocol": cfg.protocol,
        "task": cfg.task,
        "nodes": cfg.nodes,
        "nodes_total": n_nodes,
        "rounds": rounds_done,
        **runlog.outcome(),
        "bytes_per_trainer_per_round": contrib_bytes / trainer_rounds,
        "bytes_per_node_per_round": sum(n.bytes_received for n in sim.nodes) / max(1, n_nodes) / max(1, rounds_done),
        "total_bytes": sim.bytes_total,
        "bytes_by_kind": sim.bytes_by_kind,
        "honest_digest_agreement": agreement,
        "final_members": len(final_head.members) if final_head is not None else 0,
        "virtual_seconds": sim.now,
        "wall_seconds": time.monotonic() - wall0,
        "setup_seconds": setup_seconds,
        "rounds_per_second": rounds_done / max(1e-9, time.monotonic() - wall0 - setup_seconds),
        "peak_rss_mb": peak_rss_mb,  # the whole process, high-water mark
        "rejected": sim.rejected,
        "crash_round": crash_round[0] if crash_round else None,
        "expelled_online": len(expelled_online),  # honest members the records removed while they ran
        "expelled_online_at": expelled_online[:20],
        # per joiner: from start until caught up with the swarm with a model (sync and checkpoint
        # transfer included), and until a record made it a member
        "join_seconds": [round(n.synced_at - n.joined_at, 4) for n in sim.nodes[cfg.nodes:] if n.synced_at is not None],
        "join_member_seconds": [round(n.member_at - n.joined_at, 4) for n in sim.nodes[cfg.nodes:]
                                if n.member_at is not None],
        "join_checkpoint_rounds": [n.checkpoint_round for n in sim.nodes[cfg.nodes:]],
        "notices": sim.notices,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out",) and not (isinstance(v, float) and math.isinf(v))},
        "genesis_run_id": sim.genesis.run_id.hex(),
    }
    if byz_metrics is not None:
        summary["attack"] = cfg.attack
        summary.update(byz_metrics.summary(sim, final_head))
    runlog.close()
    if out_dir is not None:
        from seedswarm.sim.plots import write_outputs

        write_outputs(out_dir, summary)
    return summary
