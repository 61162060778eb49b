"""Baseline protocols in the simulator harness: ``modest`` and ``dpsgd`` (``seedswarm sim --protocol``).

seedswarm's claim is about bytes: a round costs a trainer ``K + ~140`` bytes and every node one
small record, whatever the model size. That claim only means something next to the protocols it
replaces, run on the *same* task, the *same* nodes (identities, shards, seed) and the *same*
virtual-time network model, with bytes counted the same way. This module runs them:

``modest``
    MoDeST as published (de Vos et al., 2023): each round, ``trainers`` nodes and ``a = 2``
    aggregators are sampled by rendezvous hashing on a per-round beacon
    (:func:`~seedswarm.sampling.committee.select_committee`, the function seedswarm itself uses).
    Each trainer takes the model pushed to it by the previous round's aggregators (the first copy
    to arrive), runs ``local_steps`` steps of plain SGD at ``local_lr`` on its private shard and
    sends the full fp32 model to every aggregator; each aggregator averages what it received and
    pushes the average to every trainer of the next round. Only the sample ever holds the model:
    nodes outside it receive nothing (MoDeST's strength, and why its bytes do not grow with N).

``dpsgd``
    Decentralized parallel SGD (Lian et al., 2017): every node keeps its own model; each round it
    takes ``local_steps`` SGD steps on its shard, sends its full model to each neighbour on a fixed,
    seeded random ``degree``-regular graph, and replaces its model by the uniform average of its own
    and its neighbours' (a doubly stochastic mixing matrix). Memory and CPU grow with ``N`` (``N``
    models of ``d`` parameters live in this process): :data:`DPSGD_MAX_STATE_BYTES` bounds it.

What is counted, and how
    Every model travels as a real encoded :class:`ModelMessage` (a msgpack array: version, kind,
    run id, round, sender key, then the raw little-endian fp32 bytes of the flat parameter vector)
    and the receiver *decodes the bytes it was sent* to get the model it trains on or averages, so
    a baseline that did not move full models could not train. Bytes are ``len(encoded)`` summed
    over every (sender, receiver) delivery, exactly as the seedswarm simulator counts its direct
    messages; one encoding sent to three neighbours counts three times. No transport framing is
    added on either side.

Accuracy
    ``modest``: the rank-0 aggregator's average (the model the next sample trains from).
    ``dpsgd``: the *average* of all nodes' models, as in D-PSGD's convergence results; no node
    holds that model, so the summary also reports the mean and minimum accuracy of the nodes' own
    models at the end (``node_accuracy_mean``, ``node_accuracy_min``).

Not modelled: message loss, churn and Byzantine nodes (the options are refused with a clear
error rather than silently ignored). Runs are deterministic functions of the configuration:
all randomness comes from numpy generators seeded from ``cfg.seed`` and torch runs one thread.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from seedswarm.crypto.hashing import h, u64
from seedswarm.node.learn.replay import bind_, model_digest
from seedswarm.node.learn.tasks import Shard, Task, load_task, param_count, task_metric
from seedswarm.progress import Progress
from seedswarm.sampling.committee import select_committee
from seedswarm.sim.baselinenet import (
    KIND_AGGREGATED,
    KIND_NEIGHBOUR,
    KIND_TRAINED,
    BaselineNet,
    ModelMessage,
    SendHook,
    flat_params,
    param_views,
)
from seedswarm.sim.engine import NetConfig
from seedswarm.sim.runlog import RunLog

__all__ = [
    "BASELINES",
    "DPSGD_MAX_STATE_BYTES",
    "MODEST_AGGREGATORS",
    "ModelMessage",
    "regular_graph",
    "run_baseline",
]

BASELINES = ("modest", "dpsgd")
"""Protocols this module runs (``seedswarm`` itself runs in :mod:`seedswarm.sim.runner`)."""

MODEST_AGGREGATORS = 2
"""``a``: aggregators per MoDeST round (the seedswarm genesis default, so committees match)."""

DPSGD_DEGREE = 4
"""Neighbours per node in D-PSGD (a random 4-regular graph is an expander with high probability)."""

DPSGD_MAX_STATE_BYTES = 6_000_000_000
"""D-PSGD keeps ``N`` models plus ``N`` encoded messages in memory; refuse runs above this."""

class BaselineError(ValueError):
    """A configuration the baselines cannot run (the message says which option and why)."""


# ---------------------------------------------------------------------------------------------
# local training


class _Trainer:
    """Plain SGD on a model whose parameters are views of a flat vector (trained in place)."""

    def __init__(self, task: Task, cfg: Any) -> None:
        self.task = task
        self.model = task.build_model()
        self.shapes = [p.shape for p in self.model.parameters()]
        self.steps = cfg.local_steps
        self.lr = cfg.local_lr
        self.batch_size = cfg.batch_size

    def train_(self, flat: torch.Tensor, shard: Shard, rng: np.random.Generator) -> None:
        bind_(self.model, param_views(flat, self.shapes))
        params = list(self.model.parameters())
        for _ in range(self.steps):
            batch = self.task.batch(shard, rng, self.batch_size)
            with torch.enable_grad():
                loss = self.task.loss(self.model, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(g, alpha=self.lr)

    def evaluate(self, flat: torch.Tensor) -> dict[str, float]:
        return self.task.evaluate(bind_(self.model, param_views(flat, self.shapes)))


# ---------------------------------------------------------------------------------------------
# D-PSGD graph


def regular_graph(n: int, degree: int, seed: int) -> list[list[int]]:
    """A seeded random ``degree``-regular simple graph on ``n`` nodes (adjacency lists, sorted).

    Built as the union of ``degree / 2`` random Hamiltonian cycles, redrawn until no edge repeats
    (a random regular graph of this kind is an expander with high probability, which is what
    D-PSGD's mixing needs). With ``n <= degree`` every node is linked to every other.
    """
    if n < 1 or degree < 0:
        raise BaselineError(f"cannot build a {degree}-regular graph on {n} nodes")
    if n <= degree + 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    if degree % 2:
        raise BaselineError(f"the D-PSGD graph degree must be even, not {degree}")
    rng = np.random.default_rng([seed, 0xD95])
    for _ in range(1000):
        edges: set[tuple[int, int]] = set()
        ok = True
        for _ in range(degree // 2):
            order = rng.permutation(n)
            for i in range(n):
                a, b = int(order[i]), int(order[(i + 1) % n])
                e = (min(a, b), max(a, b))
                if e in edges:
                    ok = False
                    break
                edges.add(e)
            if not ok:
                break
        if ok:
            adj: list[list[int]] = [[] for _ in range(n)]
            for a, b in edges:
                adj[a].append(b)
                adj[b].append(a)
            return [sorted(x) for x in adj]
    raise BaselineError(f"no simple {degree}-regular graph found on {n} nodes")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# the runs


def _check(cfg: Any) -> None:
    if cfg.protocol not in BASELINES:
        raise BaselineError(
            f"unknown protocol {cfg.protocol!r}: choose 'seedswarm', {', '.join(repr(b) for b in BASELINES)}"
        )
    unsupported = [name for name, bad in (
        ("byzantine", cfg.byzantine > 0), ("crash_fraction", cfg.crash_fraction > 0),
        ("join_nodes", cfg.join_nodes > 0), ("leave_nodes", cfg.leave_nodes > 0), ("loss", cfg.loss > 0),
    ) if bad]
    if unsupported:
        raise BaselineError(f"protocol {cfg.protocol!r} does not model {', '.join(unsupported)} "
                            "(only seedswarm does); drop those options")
    if cfg.nodes < 1 or cfg.rounds < 1 or cfg.local_steps < 1 or cfg.batch_size < 1:
        raise BaselineError("nodes, rounds, local_steps and batch_size must be positive")
    if cfg.protocol == "modest" and cfg.trainers < 1:
        raise BaselineError("modest needs at least one trainer per round")
    if not (math.isfinite(cfg.local_lr) and cfg.local_lr > 0):
        raise BaselineError(f"local_lr must be positive, not {cfg.local_lr}")


def run_baseline(cfg: Any, log: TextIO = sys.stderr, on_send: SendHook | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Run ``cfg.protocol`` (``modest`` or ``dpsgd``); returns the summary ``runner.run`` returns.

    Writes ``summary.json``, ``metrics.jsonl`` and the plots to ``cfg.out`` when set. ``on_send``
    sees every delivered message (kind, source, destination, encoded bytes): tests use it to check
    that what is counted is what was sent. ``progress`` shows the rounds (``runner.run`` makes it).
    """
    from seedswarm.sim.engine import identities

    _check(cfg)
    torch.set_num_threads(1)
    wall0 = time.monotonic()
    tracemalloc.start()
    task = load_task(cfg.task, cfg.task_options, seed=cfg.seed)
    trainer = _Trainer(task, cfg)
    init = flat_params(list(trainer.model.parameters()))
    d = int(init.numel())
    assert d == param_count(trainer.model)
    idents = identities(cfg.nodes, cfg.seed)
    keys = [i.public for i in idents]
    shards = [task.shard(i, cfg.nodes) for i in range(cfg.nodes)]
    rngs = [np.random.default_rng([cfg.seed, 0xBA5E, i]) for i in range(cfg.nodes)]
    cfg_dict = {k: v for k, v in asdict(cfg).items()
                if k not in ("out",) and not (isinstance(v, float) and math.isinf(v))}
    run_id = h(b"seedswarm/baseline-run", json.dumps(cfg_dict, sort_keys=True).encode(),
               model_digest(list(trainer.model.parameters())))
    net = BaselineNet(cfg.nodes, NetConfig(latency_ms=cfg.latency_ms), np.random.default_rng([cfg.seed, 0x7E7]),
                      on_send)
    out_dir = Path(cfg.out) if cfg.out else None
    runlog = RunLog(out_dir, cfg.target, cfg.eval_every, cfg.rounds, progress=progress, metric=task_metric(task))
    runlog.set_initial(trainer.evaluate(init))
    st: dict[str, Any] = {"now": 0.0, "rounds": 0}

    def record(r: int, model_flat: Callable[[], torch.Tensor]) -> None:
        line: dict[str, Any] = {"round": r, "time": round(st["now"], 4),
                                "wall": round(time.monotonic() - wall0, 3), "bytes_total": net.total,
                                "online": cfg.nodes, "members": cfg.nodes}
        runlog.round(line, lambda: trainer.evaluate(model_flat()))

    def done() -> bool:
        return (time.monotonic() - wall0 > cfg.max_wall
                or (cfg.stop_at_target and runlog.bytes_to_target is not None))

    setup_seconds = time.monotonic() - wall0
    extra: dict[str, Any]
    if cfg.protocol == "modest":
        extra = _run_modest(cfg, trainer, init, keys, shards, rngs, run_id, net, st, record, done)
    else:
        extra = _run_dpsgd(cfg, trainer, init, keys, shards, rngs, run_id, net, st, record, done)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    rounds_done = st["rounds"]
    wall = time.monotonic() - wall0
    trainer_bytes = net.by_kind.get(extra.pop("trainer_kind"), 0)
    summary: dict[str, Any] = {
        "protocol": cfg.protocol,
        "task": cfg.task,
        "nodes": cfg.nodes,
        "nodes_total": cfg.nodes,
        "rounds": rounds_done,
        **runlog.outcome(),
        "bytes_per_trainer_per_round": trainer_bytes / max(1, extra["trainer_rounds"]),
        "bytes_per_node_per_round": sum(net.received) / max(1, cfg.nodes) / max(1, rounds_done),
        "total_bytes": net.total,
        "bytes_by_kind": dict(net.by_kind),
        "messages": net.messages,
        "params": d,
        "virtual_seconds": st["now"],
        "wall_seconds": wall,
        "setup_seconds": setup_seconds,
        "rounds_per_second": rounds_done / max(1e-9, wall - setup_seconds),
        "peak_traced_memory_mb": peak / 1e6,
        "peak_rss_mb": peak_rss_mb,  # the whole process, high-water mark
        "final_members": cfg.nodes,
        "rejected": {},
        "crash_round": None,
        "expelled_online": 0,  # baselines have no membership records
        "expelled_online_at": [],
        "join_seconds": [],
        "join_member_seconds": [],
        "join_checkpoint_rounds": [],
        "notices": {},
        "config": cfg_dict,
        "genesis_run_id": run_id.hex(),
        **extra,
    }
    runlog.close()
    if out_dir is not None:
        from seedswarm.sim.plots import write_outputs

        write_outputs(out_dir, summary)
    return summary


def _run_modest(cfg: Any, trainer: _Trainer, init: torch.Tensor, keys: list[bytes], shards: list[Shard],
                rngs: list[np.random.Generator], run_id: bytes, net: BaselineNet, st: dict[str, Any],
                record: Callable[[int, Callable[[], torch.Tensor]], None],
                done: Callable[[], bool]) -> dict[str, Any]:
    """MoDeST rounds; returns the protocol-specific summary fields."""
    d = int(init.numel())
    index = {k: i for i, k in enumerate(keys)}
    # inbox[node] = (arrival time, encoded AggregatedModel) pushed to it for the coming round
    inbox: dict[int, list[tuple[float, bytes]]] = {}
    agg_payloads: list[tuple[int, bytes]] = []  # (aggregator, encoded) of the previous round
    prev_ready: dict[int, float] = {}
    latest = init.clone()  # rank-0 aggregator's model (what is evaluated)
    trainer_rounds = 0
    agreement = 1.0
    work = torch.empty(d, dtype=torch.float32)
    for r in range(1, cfg.rounds + 1):
        beacon = h(b"seedswarm/baseline-beacon", run_id, u64(r))
        com = select_committee(beacon, keys, cfg.trainers, MODEST_AGGREGATORS)
        t_idx = [index[k] for k in com.trainers]
        a_idx = [index[k] for k in com.aggregators]
        # 1. the previous round's aggregators push their average to this round's trainers
        inbox = {t: [] for t in t_idx}
        for a, enc in agg_payloads:
            for t in t_idx:
                inbox[t].append((net.send("AggregatedModel", a, t, enc, prev_ready[a]), enc))
        # 2. trainers: decode the first copy to arrive (initial model in round 1), train, send
        arrivals: dict[int, list[tuple[float, bytes]]] = {a: [] for a in a_idx}
        round_start = st["now"]
        for t in t_idx:
            if inbox[t]:
                t_arr, enc = min(inbox[t], key=lambda x: x[0])
                work.numpy()[:] = ModelMessage.decode(enc, d).vector()
            else:
                t_arr = round_start
                work.copy_(init)
            trainer.train_(work, shards[t], rngs[t])
            trainer_rounds += 1
            ready = t_arr + net.compute_time(t, cfg.local_steps)
            enc = ModelMessage(KIND_TRAINED, run_id, r, keys[t], work.numpy().tobytes()).encode()
            for a in a_idx:
                arrivals[a].append((net.send("TrainedModel", t, a, enc, ready), enc))
        # 3. aggregators decode and average (in trainer-rank order: deterministic)
        agg_payloads = []
        prev_ready = {}
        digests: list[bytes] = []
        for rank, a in enumerate(a_idx):
            acc = np.zeros(d, dtype=np.float64)
            for _, enc in arrivals[a]:
                acc += ModelMessage.decode(enc, d).vector()
            avg = (acc / max(1, len(arrivals[a]))).astype(np.float32)
            prev_ready[a] = max((t for t, _ in arrivals[a]), default=round_start)
            agg_payloads.append((a, ModelMessage(KIND_AGGREGATED, run_id, r, keys[a], avg.tobytes()).encode()))
            digests.append(model_digest([torch.from_numpy(avg)]))
            if rank == 0:
                latest = torch.from_numpy(avg)
        agreement = max(digests.count(x) for x in digests) / len(digests)
        st["now"] = max(prev_ready.values(), default=round_start)
        st["rounds"] = r
        record(r, latest.detach)  # evaluated lazily, only on evaluation rounds
        if done():
            break
    return {"trainer_kind": "TrainedModel", "trainer_rounds": trainer_rounds,
            "honest_digest_agreement": agreement, "aggregators": MODEST_AGGREGATORS,
            "model_holders": MODEST_AGGREGATORS,
            "bytes_per_model_message": len(ModelMessage(KIND_TRAINED, run_id, 0, keys[0], bytes(4 * d)).encode())}


def _run_dpsgd(cfg: Any, trainer: _Trainer, init: torch.Tensor, keys: list[bytes], shards: list[Shard],
               rngs: list[np.random.Generator], run_id: bytes, net: BaselineNet, st: dict[str, Any],
               record: Callable[[int, Callable[[], torch.Tensor]], None],
               done: Callable[[], bool]) -> dict[str, Any]:
    """D-PSGD rounds; returns the protocol-specific summary fields."""
    n, d = cfg.nodes, int(init.numel())
    need = 2 * n * (4 * d + 128)
    if need > DPSGD_MAX_STATE_BYTES:
        raise BaselineError(f"dpsgd would hold {need / 1e9:.1f} GB of models ({n} nodes x {d:,} params); "
                            f"the limit is {DPSGD_MAX_STATE_BYTES / 1e9:.0f} GB: use fewer nodes")
    graph = regular_graph(n, DPSGD_DEGREE, cfg.seed)
    x = init.unsqueeze(0).repeat(n, 1)  # row i: node i's model
    ready = [0.0] * n
    for r in range(1, cfg.rounds + 1):
        # 1. local SGD on each node's own model, then encode it once
        encoded: list[bytes] = []
        for i in range(n):
            trainer.train_(x[i], shards[i], rngs[i])
            encoded.append(ModelMessage(KIND_NEIGHBOUR, run_id, r, keys[i], x[i].numpy().tobytes()).encode())
        # 2. send to every neighbour; 3. each node averages its own model with the decoded ones
        got: list[list[tuple[int, bytes]]] = [[] for _ in range(n)]
        arrive = [0.0] * n
        for i in range(n):
            t_i = ready[i] + net.compute_time(i, cfg.local_steps)
            for j in graph[i]:
                arrive[j] = max(arrive[j], net.send("NeighbourModel", i, j, encoded[i], t_i))
                got[j].append((i, encoded[i]))
        for j in range(n):
            acc = x[j].numpy().astype(np.float64)
            for _, enc in sorted(got[j]):
                acc += ModelMessage.decode(enc, d).vector()
            x[j].copy_(torch.from_numpy((acc / (1 + len(got[j]))).astype(np.float32)))
            ready[j] = max(arrive[j], ready[j])
        st["now"] = max(ready)
        st["rounds"] = r
        record(r, lambda: x.mean(dim=0))
        if done():
            break
    node_acc = [trainer.evaluate(x[i])["accuracy"] for i in range(n)]
    digests = [model_digest([x[i]]) for i in range(n)]
    return {"trainer_kind": "NeighbourModel", "trainer_rounds": n * st["rounds"],
            "honest_digest_agreement": max(digests.count(g) for g in digests) / n,
            "degree": len(graph[0]) if n > 1 else 0, "model_holders": n,
            "node_accuracy_mean": float(np.mean(node_acc)), "node_accuracy_min": float(np.min(node_acc)),
            "bytes_per_model_message": len(encoded[0]) if n else 0}
