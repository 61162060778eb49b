"""Benchmark: the swarm fine-tunes the ``lm`` task's pretrained GPT, against centralized Adam and
MoDeST on the same samples.

Three arms, one run, one seed, one task (``node/learn/lm.py``):

* ``adam``: one process fine-tunes the same pretrained model with Adam on batches of exactly as
  many windows per step as the swarm consumes per round (trainers x batch x local steps), drawn
  from the whole training split, for the same number of rounds. Several learning rates are tried
  (``--adam-lr``) and the best final loss is the reference: the baseline gets its best shot.
* ``seedswarm``: ``seedswarm sim`` with the given protocol settings (every node runs the real
  protocol; a trainer uploads K one-byte projections plus its signed envelope).
* ``modest``: ``seedswarm sim --protocol modest`` (sampled trainers send full fp32 models), with
  the same trainers, batch and local steps, until it reaches the loss target or the round cap.

Reported: the initial validation loss, each arm's final one, **share of Adam's reduction**
``(initial - seedswarm) / (initial - adam)`` at the same round and samples, the target (default:
halfway from the initial loss to Adam's final, unless ``--target``), bytes to that target for
seedswarm and modest and their ratio, and bytes each trainer sent per round against ``K + 160``.
Every figure comes from this run; nothing is compared with a number measured elsewhere.

CLI: ``seedswarm bench lm [--quick] [--json] [--out FILE] [options]``; ``--help`` lists them.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seedswarm.bench.protocols import _bytes
from seedswarm.clihelp import parser
from seedswarm.node.files import OutPathError, atomic_write, check_out_file
from seedswarm.node.learn.initial import parse_task_options
from seedswarm.node.learn.precondition import PRECONDITION_OPTIONS
from seedswarm.node.learn.tasks import load_task, param_count
from seedswarm.sim.runner import SimConfig, direction_matrices_bytes, run

QUICK_OPTIONS: dict[str, Any] = {"layers": 1, "width": 32, "heads": 2, "context": 32, "pretrain_steps": 60,
                                 "code_bytes": 60_000}
"""A 22k-parameter GPT whose pretraining takes seconds: the smoke test's model, not a figure."""


QUICK_RUN: dict[str, int] = {"nodes": 12, "rounds": 20, "trainers": 6, "eval_every": 5, "directions": 64}


@dataclass
class LMBench:
    """One comparison: the task, the swarm's settings and the baselines' budgets."""

    task_options: dict[str, Any] = field(default_factory=dict)
    nodes: int = 50
    rounds: int = 100
    trainers: int = 16
    batch_size: int = 8
    estimator: str = "fo"
    directions: int = 256
    groups: int = 1
    lr: float = 0.03
    lr_half_life: int = 0
    local_steps: int = 1
    local_lr: float = 0.1
    aggregator: str = "guarded_mean"
    eval_every: int = 10
    adam_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    modest_rounds: int | None = None  # None: as many as seedswarm
    target: float | None = None  # None: halfway from the initial loss to Adam's final
    seed: int = 0
    modest: bool = True
    direction_cache_mb: int = 8192  # at most this much for the round's kept direction matrices

    @property
    def samples_per_round(self) -> int:
        return self.trainers * self.batch_size * (self.local_steps if self.estimator == "fo" else 1)


def adam_curve(b: LMBench, lr: float) -> list[tuple[int, float]]:
    """Centralized Adam on the swarm's per-round sample count: ``[(round, validation loss)]``.

    One thread and a seeded generator, so the curve is the same on every run of this machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = load_task("lm", b.task_options, seed=b.seed)
        model = task.build_model()
        opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
        everything = task.shard(0, 1)
        rng = np.random.default_rng([b.seed, 0xADA])
        curve = [(0, float(task.evaluate(model)["loss"]))]
        for r in range(1, b.rounds + 1):
            loss = task.loss(model, task.batch(everything, rng, b.samples_per_round))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r % b.eval_every == 0 or r == b.rounds:
                curve.append((r, float(task.evaluate(model)["loss"])))
        return curve
    finally:
        torch.set_num_threads(threads)


def _sim(b: LMBench, protocol: str, target: float, out: Path, params: int) -> dict[str, Any]:
    cfg = SimConfig(task="lm", task_options=dict(b.task_options), nodes=b.nodes, seed=b.seed, protocol=protocol,
                    trainers=b.trainers, batch_size=b.batch_size, local_steps=b.local_steps, local_lr=b.local_lr,
                    eval_every=b.eval_every, target=target, quiet=True, out=str(out))
    if protocol == "seedswarm":
        cfg.rounds, cfg.estimator, cfg.directions, cfg.groups = b.rounds, b.estimator, b.directions, b.groups
        cfg.lr, cfg.lr_half_life, cfg.aggregator = b.lr, b.lr_half_life, b.aggregator
        # Room for every group's direction matrix (they alternate between trainers), up to the cap.
        need = (direction_matrices_bytes(b.groups, b.directions, params) >> 20) + 1
        cfg.direction_cache_mb = max(cfg.direction_cache_mb, min(b.direction_cache_mb, need))
    else:
        cfg.rounds, cfg.estimator, cfg.stop_at_target = b.modest_rounds or b.rounds, "fo", True
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary = run(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = [(0, summary["initial_metric"])] + [(x["round"], x["loss"]) for x in lines if x.get("loss") is not None]
    keys = ("final_metric", "rounds", "rounds_to_target", "bytes_to_target", "bytes_per_trainer_per_round",
            "bytes_per_node_per_round", "total_bytes", "honest_digest_agreement")
    row = {k: summary.get(k) for k in keys}
    # The simulator may close a round or two past the last one asked for (nodes finish the round
    # in flight); the comparison is at exactly cfg.rounds, where an evaluation always happens.
    at = [loss for r, loss in curve if r <= cfg.rounds]
    row.update(final_metric=at[-1], curve=curve, wall_seconds=round(time.monotonic() - t0, 1))
    return row


class ReuseError(ValueError):
    """A saved arm that does not belong to this run (--adam-from, --swarm-from)."""


ADAM_KEYS = ("task_options", "rounds", "eval_every", "seed")


def adam_reusable(b: LMBench, saved: dict[str, Any]) -> dict[str, Any]:
    """The Adam curves of a saved result that ran on exactly this task, data and sample budget.

    Adam's arm depends only on these, not on the swarm's settings, and it is deterministic: a
    sweep over swarm settings need not rerun it (it costs as much as the swarm at this size)."""
    old = dict(saved.get("bench", {}))
    now = asdict(b)
    for d in (old, now):  # the direction scale changes the swarm's directions, not Adam's arm
        d["task_options"] = {k: v for k, v in (d.get("task_options") or {}).items() if k not in PRECONDITION_OPTIONS}
    if any(old.get(k) != v for k, v in now.items() if k in ADAM_KEYS) or \
            saved.get("samples_per_round") != b.samples_per_round:
        raise ReuseError("--adam-from: that result ran Adam on other settings (task options, rounds, "
                         "eval_every, seed or samples per round differ)")
    return dict(saved.get("adam_curves", {}))


#: Settings the swarm's arm does not read: a saved arm stays valid when only these differ.
SWARM_FREE_KEYS = ("modest", "modest_rounds", "adam_lrs", "direction_cache_mb")


def swarm_reusable(b: LMBench, saved: dict[str, Any]) -> dict[str, Any]:
    """The swarm's arm of a saved result that ran exactly these swarm settings (and its target).

    Deterministic like Adam's, and at 4,096 directions it costs an hour here: a run that adds the
    MoDeST arm, or more Adam learning rates, to a finished swarm run need not redo it. The target
    must come out the same in the new run (:func:`measure` checks), since the arm's bytes to it
    are part of the row."""
    old = dict(saved.get("bench", {}))
    now = asdict(b)
    if "seedswarm" not in saved or any(old.get(k) != v for k, v in now.items() if k not in SWARM_FREE_KEYS):
        raise ReuseError("--swarm-from: that result ran the swarm on other settings (or has no swarm arm)")
    return {"target": saved.get("target"), "row": saved["seedswarm"]}


def measure(b: LMBench, log: Any = sys.stderr, reuse: dict[str, Any] | None = None,
            swarm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the three arms and compare them (see the module docstring); ``reuse``: Adam curves by
    learning rate from :func:`adam_reusable`, not recomputed; ``swarm``: the swarm's arm from
    :func:`swarm_reusable`, not rerun."""
    task = load_task("lm", b.task_options, seed=b.seed)
    params = param_count(task.build_model())
    t0 = time.monotonic()
    adam: dict[str, Any] = {}
    saved = reuse or {}
    for lr in b.adam_lrs:
        if f"{lr:g}" in saved:
            adam[f"{lr:g}"] = saved[f"{lr:g}"]
            continue
        print(f"bench lm: Adam at lr {lr:g}, {b.rounds} steps of {b.samples_per_round} windows", file=log)
        adam[f"{lr:g}"] = adam_curve(b, lr)
    best = min(adam, key=lambda k: adam[k][-1][1])
    initial, adam_final = adam[best][0][1], adam[best][-1][1]
    target = b.target if b.target is not None else round(initial - 0.5 * (initial - adam_final), 4)
    out: dict[str, Any] = {"bench": asdict(b), "params": params, "samples_per_round": b.samples_per_round,
                           "initial_loss": initial, "adam_best_lr": float(best), "adam_final_loss": adam_final,
                           "adam_curves": adam, "adam_seconds": round(time.monotonic() - t0, 1), "target": target}
    if swarm is not None:
        if swarm["target"] != target:
            raise ReuseError(f"--swarm-from: that swarm arm was measured against the target {swarm['target']}, "
                             f"this run's is {target} (Adam's curves or --target differ)")
        out["seedswarm"] = dict(swarm["row"], reused=True)
    with tempfile.TemporaryDirectory(prefix="seedswarm-bench-lm-") as tmp:
        protocols = (["seedswarm"] if swarm is None else []) + (["modest"] if b.modest else [])
        for p in protocols:
            print(f"bench lm: {p}, {b.nodes} nodes, up to {b.modest_rounds or b.rounds if p == 'modest' else b.rounds} "
                  f"rounds", file=log)
            out[p] = _sim(b, p, target, Path(tmp) / p, params)
    ss = out["seedswarm"]
    gain = initial - adam_final
    out["share_of_adam"] = (initial - ss["final_metric"]) / gain if gain > 0 else None
    out["trainer_bytes_budget"] = b.directions + 160
    md = out.get("modest")
    if md and ss["bytes_to_target"] and md["bytes_to_target"]:
        out["modest_bytes_ratio"] = md["bytes_to_target"] / ss["bytes_to_target"]
    elif md and ss["bytes_to_target"]:
        out["modest_bytes_ratio_at_least"] = md["total_bytes"] / ss["bytes_to_target"]
    return out


def report(r: dict[str, Any]) -> str:
    """The human-readable summary of :func:`measure`'s result."""
    b, ss, md = r["bench"], r["seedswarm"], r.get("modest")
    share = "-" if r["share_of_adam"] is None else f"{100 * r['share_of_adam']:.0f}%"
    lines = [
        f"lm fine-tuning, {r['params']:,} parameters, {b['nodes']} nodes, {b['rounds']} rounds, "
        f"{r['samples_per_round']} windows per round (seed {b['seed']})",
        f"  seedswarm: {b['estimator']}, K={b['directions']}, G={b['groups']}, lr {b['lr']}, local steps "
        f"{b['local_steps']}, {b['trainers']} trainers x batch {b['batch_size']}, {b['aggregator']}",
        f"  validation loss: initial {r['initial_loss']:.4f}; Adam (best lr {r['adam_best_lr']:g}) "
        f"{r['adam_final_loss']:.4f}; seedswarm {ss['final_metric']:.4f}",
        f"  share of Adam's loss reduction at equal samples: {share}",
        f"  target {r['target']:.4f}: seedswarm {_reach(ss)}" + (f"; modest {_reach(md)}" if md else ""),
    ]
    if "modest_bytes_ratio" in r:
        lines.append(f"  modest / seedswarm bytes to target: {r['modest_bytes_ratio']:.0f}x")
    elif "modest_bytes_ratio_at_least" in r:
        lines.append(f"  modest / seedswarm bytes to target: at least {r['modest_bytes_ratio_at_least']:.0f}x "
                     "(modest did not reach it)")
    lines.append(f"  bytes a trainer sent per round: {ss['bytes_per_trainer_per_round']:.0f} "
                 f"(budget K+160 = {r['trainer_bytes_budget']}); honest_digest_agreement "
                 f"{ss['honest_digest_agreement']}")
    lines.append(f"  wall: Adam {r['adam_seconds']} s, seedswarm {ss['wall_seconds']} s"
                 + (" (an earlier run's arm, --swarm-from)" if ss.get("reused") else "")
                 + (f", modest {md['wall_seconds']} s" if md else ""))
    return "\n".join(lines)


def _reach(row: dict[str, Any]) -> str:
    if row["rounds_to_target"] is None:
        return f"not reached in {row['rounds']} rounds"
    return f"round {row['rounds_to_target']}, {_bytes(row['bytes_to_target'])}"


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench lm`` (``argv`` excludes "bench lm")."""
    d = LMBench()
    ap = parser("seedswarm bench lm",
                "The swarm fine-tunes the lm task's pretrained GPT; centralized Adam (best of several learning "
                "rates) and MoDeST get the same samples per round. Prints the share of Adam's loss reduction "
                "and bytes to a loss target (docs/lm.md).",
                ["seedswarm bench lm --quick", "seedswarm bench lm --rounds 100 --directions 256 --out lm.json",
                 "seedswarm bench lm --estimator zo --directions 64 --lr 0.01 --no-modest"])
    ap.add_argument("--quick", action="store_true",
                    help="a 22k-parameter GPT, 12 nodes, 20 rounds: a smoke run of a minute, not a figure")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="also write the JSON result here (default: none; an existing file needs --force)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an lm task option (repeatable), e.g. width=160 (default: the task's)")
    for name, kind, what in (("nodes", int, "simulated nodes"), ("rounds", int, "rounds (Adam: steps)"),
                             ("trainers", int, "trainers per round"), ("batch-size", int, "windows per trainer batch"),
                             ("directions", int, "K, shared directions per round"), ("groups", int, "direction groups"),
                             ("lr", float, "the swarm's step size"),
                             ("lr-half-life", int, "rounds: the swarm's lr decays as lr / (1 + round / N); 0: constant"),
                             ("local-steps", int, "fo: local SGD steps"),
                             ("local-lr", float, "fo: local SGD learning rate"),
                             ("eval-every", int, "rounds between evaluations"), ("seed", int, "seed of everything")):
        attr = name.replace("-", "_")
        quick = f"; {QUICK_RUN[attr]} with --quick" if attr in QUICK_RUN else ""
        ap.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: {getattr(d, attr)}{quick})")
    ap.add_argument("--estimator", choices=("fo", "zo"), default=d.estimator, help="(default: %(default)s)")
    ap.add_argument("--aggregator", default=d.aggregator, help="(default: %(default)s)")
    ap.add_argument("--adam-lr", type=float, nargs="+", default=list(d.adam_lrs),
                    help="Adam learning rates to try; the best final loss is the reference (default: %(default)s)")
    ap.add_argument("--modest-rounds", type=int, default=None, help="MoDeST's round cap (default: --rounds)")
    ap.add_argument("--no-modest", action="store_true", help="skip the MoDeST arm")
    ap.add_argument("--adam-from", default=None, metavar="FILE",
                    help="take Adam's curves from a saved --out result with the same task options, rounds, "
                         "eval-every, seed and samples per round instead of recomputing them (default: none)")
    ap.add_argument("--swarm-from", default=None, metavar="FILE",
                    help="take the swarm's arm from a saved --out result with the same swarm settings and target "
                         "instead of rerunning it, e.g. to add the MoDeST arm (default: none)")
    ap.add_argument("--target", type=float, default=None,
                    help="loss target (default: halfway from the initial loss to Adam's final)")
    ap.add_argument("--direction-cache-mb", type=int, default=d.direction_cache_mb, metavar="MIB",
                    help="memory for the round's direction matrices, kept so that each trainer projects with one "
                         "matrix-vector product (float32: K x parameters x 4 bytes per group; a round whose "
                         "matrices do not fit regenerates them per trainer, far slower) (default: %(default)s)")
    args = ap.parse_args(argv)
    opts: dict[str, Any] = dict(QUICK_OPTIONS) if args.quick else {}
    opts.update(parse_task_options(args.task_option))
    numeric = ("nodes", "rounds", "trainers", "batch_size", "directions", "groups", "lr", "lr_half_life", "local_steps",
               "local_lr", "eval_every", "seed")
    given = {k: getattr(args, k) for k in numeric if getattr(args, k) is not None}
    b = LMBench(task_options=opts, estimator=args.estimator, aggregator=args.aggregator,
                adam_lrs=tuple(args.adam_lr), modest_rounds=args.modest_rounds, target=args.target,
                modest=not args.no_modest, direction_cache_mb=args.direction_cache_mb, **{**(QUICK_RUN if args.quick else {}), **given})
    if min(b.nodes, b.rounds, b.trainers, b.batch_size, b.directions, b.eval_every) < 1 or not math.isfinite(b.lr):
        ap.error("nodes, rounds, trainers, batch size, directions and eval-every must be positive")
    if b.direction_cache_mb < 0:
        ap.error("--direction-cache-mb must be >= 0")
    if args.out:
        try:
            check_out_file(args.out, force=args.force)  # before an hour of work, not after
        except OutPathError as e:
            ap.error(str(e))
    reuse = swarm = None
    try:
        if args.adam_from:
            reuse = adam_reusable(b, json.loads(Path(args.adam_from).read_text()))
        if args.swarm_from:
            swarm = swarm_reusable(b, json.loads(Path(args.swarm_from).read_text()))
    except (OSError, ValueError) as e:
        ap.error(str(e))
    try:
        result = measure(b, reuse=reuse, swarm=swarm)
    except ReuseError as e:
        ap.error(str(e))
    result["command"] = "seedswarm bench lm " + " ".join(sys.argv[3:] if argv is None else argv)
    if args.out:
        atomic_write(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
