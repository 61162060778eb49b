"""`seedswarm sim`: the simulator's command line (options map one to one onto SimConfig)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    from seedswarm.clihelp import (
        TASK_HELP,
        TASK_OPTION_HELP,
        add_learning_options,
        subcommand,
    )
    from seedswarm.sim.attacks import ATTACKS
    from seedswarm.sim.runner import SimConfig

    d = SimConfig()
    p = subcommand(
        sub, "sim", help="simulate a swarm on this machine (the main demo)",
        description="Train a model with N simulated nodes in virtual time, on the real protocol code, and "
                    "write summary.json, metrics.jsonl and plots of the task's metric. A header states the "
                    "configuration; a progress bar (plain lines when stderr is not a terminal) shows rounds, "
                    "rate, time left, accuracy, loss and bytes.\n"
                    "Built-in tasks: digits (an MLP on scikit-learn's 8x8 digits; metric: test accuracy, higher "
                    "is better) and lm (a byte-level GPT pretrained on the Python docs, fine-tuned on "
                    "standard-library sources; metric: validation loss in nats/byte, lower is better; "
                    "docs/lm.md). lm's --task-option keys: layers, width, heads, context, mlp_ratio (the "
                    "model; default 4 x 128 wide, 4 heads, 128 bytes: 842,496 parameters), pretrain_steps, "
                    "pretrain_batch, pretrain_lr (0 steps: no pretraining; the result is cached in "
                    "$SEEDSWARM_CACHE or ~/.cache/seedswarm), code_bytes, val_fraction, eval_windows, "
                    "min_shard, cache (false: neither read nor write the cache).",
        examples=["seedswarm sim                                  # 100 nodes, 800 rounds of digits",
                  "seedswarm sim --nodes 20 --rounds 200 --out runs/small",
                  "seedswarm sim --byzantine 0.2 --attack alie   # 20% attackers",
                  "seedswarm sim --crash-fraction 0.8 --crash-at 100",
                  "seedswarm sim --task ./wine_task.py:make --task-option hidden=16 --target 0.95",
                  "seedswarm sim --task lm --nodes 50 --rounds 100 --lr 0.03 --batch-size 8",
                  "seedswarm sim --task lm --task-option layers=2 --task-option width=64 --task-option context=64"])
    p.add_argument("--nodes", type=int, default=d.nodes, help="simulated nodes, all founding members")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds to run")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of everything random (keys, model, data shards, network): same seed, same run")
    p.add_argument("--task", default=d.task, help=TASK_HELP)
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE", help=TASK_OPTION_HELP)
    p.add_argument("--protocol", default=d.protocol, choices=["seedswarm", "modest", "dpsgd"],
                   help="seedswarm, or a baseline in the same harness: modest (sampled trainers send full "
                        "models) or dpsgd (every node averages full models with its neighbours)")
    add_learning_options(p, d)
    p.add_argument("--target", type=float, default=d.target,
                   help="value of the task's metric whose first crossing is reported (rounds and bytes to "
                        "target): test accuracy reached at >= X for digits, validation loss (nats/byte) "
                        "reached at <= X for lm (default: the task's, 0.9 for digits, 2.4 for lm)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate on the test split every N rounds")
    p.add_argument("--stop-at-target", action="store_true", help="stop once the task's metric reaches --target")
    p.add_argument("--byzantine", type=float, default=d.byzantine, metavar="FRACTION",
                   help="share of nodes that are Byzantine (they run --attack)")
    p.add_argument("--attack", default=d.attack, metavar="NAME",
                   help=f"Byzantine behaviour: {', '.join(ATTACKS)}; NAME:PARAM sets its strength, e.g. ipm:8 "
                        "(docs/byzantine.md)")
    p.add_argument("--crash-fraction", type=float, default=0.0,
                   help="share of the online nodes that crash at once at --crash-at")
    p.add_argument("--crash-at", type=int, default=-1, help="round of the crash (-1: none)")
    p.add_argument("--join-nodes", type=int, default=0,
                   help="new nodes that join at --join-at (they sync, fetch a checkpoint, ask to join)")
    p.add_argument("--join-at", type=int, default=-1, help="round the joining nodes start (-1: none)")
    p.add_argument("--leave-nodes", type=int, default=0, help="nodes that announce they leave, then stop")
    p.add_argument("--leave-at", type=int, default=-1, help="round they leave (-1: none)")
    p.add_argument("--latency-ms", type=float, default=d.latency_ms, help="median one-way network latency, ms")
    p.add_argument("--loss", type=float, default=d.loss, help="probability that a direct message is lost")
    p.add_argument("--bandwidth-mbps", type=float, default=d.bandwidth_mbps,
                   help="every node's link, Mbit/s (direct messages are serialised on it)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="rounds between the checkpoints nodes serve to joiners (0: joiners replay)")
    p.add_argument("--checkpoint-chunk-bytes", type=int, default=d.checkpoint_chunk_bytes,
                   help="size of one checkpoint chunk, bytes")
    p.add_argument("--max-wall", type=float, default=float("inf"), help="stop after this many wall-clock seconds")
    p.add_argument("--direction-cache-mb", type=int, default=d.direction_cache_mb, metavar="MIB",
                   help="memory for keeping each round's direction matrices (float32, directions x groups x "
                        "parameters x 4 bytes), so that every trainer projects with one matrix-vector product; "
                        "used only when all of a round's fit (K=4096 on the 842k lm model: 13,200) "
                        "(default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, refused if it holds files unless --force (default: a new runs/sim-<time>)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--quiet", action="store_true", help="no header, progress bar or notes on stderr")


def committee_note(cmd: str, trainers: int, nodes: int, joining: int = 0) -> str | None:
    """A note when ``--trainers`` exceeds the membership, or None.

    Not an error: a committee is the first ``trainers`` eligible members by rank (sampling/
    committee.py takes all of them when fewer are eligible), which is how every swarm starts and
    how it survives losing members; with ``2 f >= n`` the robust rules fall back to the median.
    But the run then measures a smaller committee than the option says, so say so.
    """
    if trainers <= nodes:
        return None
    grows = f", up to {min(trainers, nodes + joining)} as nodes join" if joining else ""
    return (f"seedswarm {cmd}: note: --trainers {trainers} is above --nodes {nodes}: every member "
            f"trains each round (committees of {nodes}{grows})")


def run_command(args: argparse.Namespace) -> int:
    from seedswarm.node.core.genesis import GenesisError
    from seedswarm.node.files import OutPathError, new_run_dir, prepare_out_dir
    from seedswarm.node.learn.initial import parse_task_options
    from seedswarm.node.learn.tasks import TaskError
    from seedswarm.sim.runner import SimConfig, run

    if args.nodes < 1 or args.rounds < 1:
        print("seedswarm sim: --nodes and --rounds must be positive", file=sys.stderr)
        return 2
    if not 0.0 <= args.byzantine < 1.0:
        print("seedswarm sim: --byzantine must be in [0, 1)", file=sys.stderr)
        return 2
    if args.direction_cache_mb < 0:
        print("seedswarm sim: --direction-cache-mb must be >= 0", file=sys.stderr)
        return 2
    try:
        task_options = parse_task_options(args.task_option)
    except TaskError as e:
        print(f"seedswarm sim: {e}", file=sys.stderr)
        return 2
    try:
        out = str(prepare_out_dir(args.out, force=args.force) if args.out
                  else new_run_dir(Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")))
    except OutPathError as e:
        print(f"seedswarm sim: {e}", file=sys.stderr)
        return 2
    if (note := committee_note("sim", args.trainers, args.nodes, args.join_nodes)) is not None:
        print(note, file=sys.stderr)
    cfg = SimConfig(
        nodes=args.nodes, rounds=args.rounds, seed=args.seed, task=args.task,
        task_options=task_options, protocol=args.protocol, estimator=args.estimator,
        trainers=args.trainers, directions=args.directions, groups=args.groups, aggregator=args.aggregator,
        lr=args.lr, lr_half_life=args.lr_half_life, local_lr=args.local_lr, batch_size=args.batch_size,
        target=args.target,
        eval_every=args.eval_every, stop_at_target=args.stop_at_target, crash_fraction=args.crash_fraction,
        crash_at=args.crash_at, join_nodes=args.join_nodes, join_at=args.join_at,
        leave_nodes=args.leave_nodes, leave_at=args.leave_at,
        latency_ms=args.latency_ms, loss=args.loss, bandwidth_mbps=args.bandwidth_mbps,
        checkpoint_every=args.checkpoint_every, checkpoint_chunk_bytes=args.checkpoint_chunk_bytes, max_wall=args.max_wall, out=out, quiet=args.quiet,
        direction_cache_mb=args.direction_cache_mb,
        byzantine=args.byzantine, attack=args.attack,
    )
    try:
        summary = run(cfg)
    except (GenesisError, TaskError, ValueError) as e:
        print(f"seedswarm sim: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder went away or filled up during the run
        print(f"seedswarm sim: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    from seedswarm.sim.plots import plot_names

    metric = summary.get("metric") or "accuracy"
    keys: tuple[str, ...] = ("final_accuracy", "rounds", "nodes", "bytes_per_trainer_per_round",
                             "bytes_per_node_per_round", "total_bytes", "bytes_to_target",
                             "honest_digest_agreement", "wall_seconds")
    if metric != "accuracy":
        keys = ("metric", "initial_metric", "final_metric", *keys)
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    print(f"wrote {out}/summary.json, metrics.jsonl, {', '.join(plot_names(metric))}, report.html", file=sys.stderr)
    return 0
