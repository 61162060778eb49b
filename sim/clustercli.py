"""The `seedswarm cluster` command line: its options, the output folder, signals and the summary
printed; :mod:`seedswarm.sim.cluster` is the launcher it drives."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from seedswarm.node.core.genesis import default
from seedswarm.sim.bytestable import table
from seedswarm.sim.cluster import Cluster, ClusterConfig


def add_parser(sub: Any) -> None:
    from seedswarm.clihelp import (
        TASK_HELP,
        TASK_OPTION_HELP,
        add_learning_options,
        subcommand,
    )

    d = ClusterConfig()
    p = subcommand(
        sub, "cluster", help="run N real daemon processes on loopback (local multi-node mode)",
        description="Start N `seedswarm node` processes on 127.0.0.1 (real libp2p over TCP), train until every "
                    "node reaches --rounds on one head, stop them, and write summary.json, metrics.jsonl and "
                    "report.html (the dashboard with every node side by side). Node logs: OUT/nodes/node-I/node.log.",
        examples=["seedswarm cluster --nodes 8 --rounds 60 --out runs/c8",
                  "seedswarm cluster --nodes 3 --rounds 200 --metrics-port 9100   # live pages at :9100-9102",
                  "seedswarm cluster --nodes 6 --rounds 80 --join-nodes 2 --join-at 20 --kill-nodes 2 --kill-at 40"])
    p.add_argument("--nodes", type=int, default=d.nodes, help="node processes started at once (founding members)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="every node stops taking duties at this round")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the model and the data shards")
    p.add_argument("--task", default=d.task, help=TASK_HELP)
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE", help=TASK_OPTION_HELP)
    add_learning_options(p, d)
    p.add_argument("--round-timeout", type=float, default=None,
                   help="seconds an aggregator waits for contributions at most (default: 3x a trainer's round "
                        f"as measured here, at least {default('round_timeout')})")
    p.add_argument("--join-nodes", type=int, default=0, help="node processes started later, at --join-at")
    p.add_argument("--join-at", type=int, default=-1, help="round at which the joining nodes start (-1: none)")
    p.add_argument("--kill-nodes", type=int, default=0,
                   help="SIGKILL this many founding nodes (never node 0 or 1, the bootstrap peers) ...")
    p.add_argument("--kill-at", type=int, default=-1, help="... when the swarm reaches this round (-1: none)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="rounds between the model checkpoints that joining nodes download")
    p.add_argument("--checkpoint-chunk-bytes", type=int, default=d.checkpoint_chunk_bytes,
                   help="size of one checkpoint download chunk")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="every node evaluates its model every N rounds, for status and the charts (0: when halting)")
    p.add_argument("--metrics-port", type=int, default=0, metavar="P",
                   help="node I serves /metrics, /status and a live dashboard at http://127.0.0.1:P+I/ (0: none)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="give up after this many seconds (0: automatic, from the rounds and the round timeout)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, refused if it holds files unless --force (default: a new runs/cluster-<time>)")
    p.add_argument("--force", action="store_true",
                   help="reuse an --out folder that already holds files (its nodes/ data dirs are deleted)")
    p.add_argument("--quiet", action="store_true", help="no header, progress bar or notes on stderr")


def run_command(args: argparse.Namespace) -> int:
    from seedswarm.node.files import (
        DataDirInUse,
        DataDirLock,
        OutPathError,
        new_run_dir,
        prepare_out_dir,
    )
    from seedswarm.sim.cli import committee_note

    if args.nodes < 1 or args.rounds < 1:
        print("seedswarm cluster: --nodes and --rounds must be positive", file=sys.stderr)
        return 2
    if args.kill_nodes > max(0, args.nodes - 2):
        print("seedswarm cluster: --kill-nodes must leave nodes 0 and 1 (the bootstrap peers) running", file=sys.stderr)
        return 2
    if args.join_nodes and not 0 <= args.join_at < args.rounds:
        print("seedswarm cluster: --join-at must be a round below --rounds", file=sys.stderr)
        return 2
    try:
        out_dir = (prepare_out_dir(args.out, force=args.force) if args.out
                   else new_run_dir(Path("runs") / time.strftime("cluster-%Y%m%d-%H%M%S")))
    except OutPathError as e:
        print(f"seedswarm cluster: {e}", file=sys.stderr)
        return 2
    # A previous run's node data dirs hold its identities and chains: reused, its nodes would
    # resume that chain or refuse this run's genesis. (Only --force gets here with them.) Never
    # from under a node that is still running: its data dir lock says so.
    try:
        if (out_dir / "nodes").is_dir():
            for d in sorted((out_dir / "nodes").iterdir()):
                if d.is_dir():
                    with DataDirLock(d):
                        pass
            shutil.rmtree(out_dir / "nodes")
    except DataDirInUse as e:
        print(f"seedswarm cluster: --force: a node of the old run is still running in {e.data_dir} "
              f"(pid {e.pid}): stop it first", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"seedswarm cluster: cannot clear {out_dir / 'nodes'}: {e.strerror or e}", file=sys.stderr)
        return 2
    out = str(out_dir)
    if (note := committee_note("cluster", args.trainers, args.nodes, args.join_nodes)) is not None:
        print(note, file=sys.stderr)
    cfg = ClusterConfig(
        nodes=args.nodes, rounds=args.rounds, seed=args.seed, task=args.task, task_options=args.task_option,
        estimator=args.estimator, trainers=args.trainers, directions=args.directions, groups=args.groups,
        aggregator=args.aggregator, lr=args.lr, lr_half_life=args.lr_half_life, local_lr=args.local_lr,
        batch_size=args.batch_size,
        round_timeout=args.round_timeout, join_nodes=args.join_nodes, join_at=args.join_at,
        kill_nodes=args.kill_nodes, kill_at=args.kill_at, checkpoint_every=args.checkpoint_every,
        checkpoint_chunk_bytes=args.checkpoint_chunk_bytes, timeout=args.timeout, out=out, quiet=args.quiet,
        eval_every=args.eval_every, metrics_port=args.metrics_port,
    )
    cluster = Cluster(cfg)

    def on_signal(signum: int, _frame: Any) -> None:
        cluster.stop_requested = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = cluster.run()
    except Exception as e:  # noqa: BLE001 - report, stop children, exit 2
        cluster.stop_all(grace=5.0)
        print(f"seedswarm cluster: {e}", file=sys.stderr)
        return 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    keys = ("honest_digest_agreement", "rounds", "running_nodes", "final_accuracy", "join_seconds",
            "round_latency_p50_s", "round_latency_p95_s", "bytes_per_node_per_round", "wall_seconds")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    if (kinds := summary.get("bytes_per_node_per_round_by_kind")) and not args.quiet:
        print("bytes sent per node per round at the sockets, by kind:\n" + table(kinds), file=sys.stderr)
    print(f"wrote {out}/summary.json, metrics.jsonl, report.html; node logs in {out}/nodes/*/node.log",
          file=sys.stderr)
    if summary["interrupted"]:
        return 130
    return 0 if summary["finished"] else 1
