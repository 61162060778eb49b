"""Benchmark: how far the simulator scales on one machine (rounds per second, peak memory).

Each size runs in its own process, so each peak-memory figure is that run's own high-water mark
(``ru_maxrss``), not the largest run so far. The baseline is the smallest size, measured in the
same invocation: the printed ratios say what growing the swarm costs per round and in memory.
Every run has churn: a few joins early, a few graceful leaves late, and a crash of a tenth of
the nodes in the middle.

Why the simulator scales: honest nodes on one head share one parameter list, record checks are
memoised pure functions, and only the committee computes; what grows with N is delivering each
record to every node (N protocol-core calls per round) and the per-node state.

CLI: ``seedswarm bench scale [--sizes 100,1000,10000] [--rounds 40] [--json] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.progress import Progress
from seedswarm.sim.runner import SimConfig, run


def churn_config(nodes: int, rounds: int, seed: int) -> SimConfig:
    """The measured scenario for one size (small task, default protocol settings, churn)."""
    return SimConfig(
        nodes=nodes, rounds=rounds, seed=seed, eval_every=max(1, rounds // 4), quiet=True,
        join_nodes=max(1, nodes // 100), join_at=max(1, rounds // 4),
        leave_nodes=max(1, nodes // 100), leave_at=max(2, 3 * rounds // 4),
        crash_fraction=0.1, crash_at=max(2, rounds // 2),
    )


def measure(nodes: int, rounds: int, seed: int) -> dict[str, Any]:
    """One size, in this process (the parent calls it through a child process)."""
    s = run(churn_config(nodes, rounds, seed), log=sys.stderr)
    return {
        "nodes": nodes,
        "rounds": s["rounds"],
        "rounds_per_second": s["rounds_per_second"],
        "setup_seconds": s["setup_seconds"],
        "wall_seconds": s["wall_seconds"],
        "peak_rss_mb": s["peak_rss_mb"],
        "honest_digest_agreement": s["honest_digest_agreement"],
        "bytes_per_node_per_round": s["bytes_per_node_per_round"],
        "final_accuracy": s["final_accuracy"],
    }


def _child(nodes: int, rounds: int, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seedswarm.bench.scale", "--child", str(nodes), "--rounds", str(rounds),
           "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"scale run with {nodes} nodes failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| nodes | rounds/s | × vs smallest | peak RSS MB | × vs smallest | setup s | agreement |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['rounds_per_second']:.2f} | {r['rounds_per_second'] / base['rounds_per_second']:.3f} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {r['setup_seconds']:.1f} "
            f"| {r['honest_digest_agreement']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser("seedswarm bench scale",
               "How far the simulator scales on one machine: rounds per second and peak memory per swarm size, "
               "each size in its own process, with churn (joins, a crash of a tenth of the nodes, leaves).",
               ["seedswarm bench scale --sizes 100,1000,10000 --rounds 40 --json"])
    p.add_argument("--sizes", default="100,1000,10000", metavar="N,N,...",
                   help="comma-separated node counts; the first is the baseline of the ratios")
    p.add_argument("--rounds", type=int, default=40, help="rounds per size (at least 4)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rounds, args.seed)))
        return 0
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        print(f"seedswarm bench scale: --sizes expects integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 2 or args.rounds < 4:
        print("seedswarm bench scale: sizes must be at least 2 and --rounds at least 4", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    header = f"bench scale: sizes {', '.join(map(str, sizes))}, {args.rounds} rounds each, seed {args.seed}"
    with Progress(len(sizes), unit="size", header=header) as progress:
        for n in sizes:
            progress.update(len(rows), running=f"{n} nodes")
            rows.append(_child(n, args.rounds, args.seed))
            r = rows[-1]
            progress.note(f"{n} nodes: {r['rounds_per_second']:.2f} rounds/s, peak {r['peak_rss_mb']:.0f} MB, "
                          f"agreement {r['honest_digest_agreement']:.2f}")
        progress.update(len(rows), running=None)
    result = {"benchmark": "scale", "rounds": args.rounds, "seed": args.seed, "rows": rows}
    print(json.dumps(result, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
