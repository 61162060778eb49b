"""`seedswarm bench sweep`: fault-free simulations over seeds and swarm sizes; nobody online is expelled.

The records expel a member that misses its committee duty ``expel_after`` times in a row. With no
fault at all that must never happen to a node that is running: if it does, an aggregator published
before honest contributions could arrive (a deadline learned too short, a lone member outrunning
the others) and the swarm shrinks for nothing. This bench runs the simulator (the real protocol
core) on every (nodes, seed) pair and reports, per size, expulsions of online members, the final
membership and ``honest_digest_agreement``; it exits 1 if any run expelled an online member or
ended without full agreement.

    seedswarm bench sweep --nodes 4,8,16 --seeds 20 --rounds 2000 --json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.progress import Progress


def _one(job: tuple[int, int, int]) -> dict[str, Any]:
    from seedswarm.sim.runner import SimConfig, run

    nodes, seed, rounds = job
    t0 = time.monotonic()
    s = run(SimConfig(nodes=nodes, seed=seed, rounds=rounds, eval_every=1 << 30, quiet=True))
    return {
        "nodes": nodes, "seed": seed, "rounds": s["rounds"], "final_members": s["final_members"],
        "expelled_online": s["expelled_online"], "expelled_online_at": s["expelled_online_at"],
        "honest_digest_agreement": s["honest_digest_agreement"], "final_accuracy": s["final_accuracy"],
        "virtual_seconds": round(s["virtual_seconds"], 1), "wall_seconds": round(time.monotonic() - t0, 1),
    }


def sweep(sizes: list[int], seeds: list[int], rounds: int, workers: int, log: Any = None,
          quiet: bool = False) -> dict[str, Any]:
    jobs = [(n, s, rounds) for n in sizes for s in seeds]
    header = (f"sweep: {len(jobs)} simulations (nodes {sizes}, seeds {seeds[0]}..{seeds[-1]}, {rounds} rounds), "
              f"{workers} worker(s)")
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with Progress(len(jobs), unit="run", header=header, stream=log, quiet=quiet) as progress, \
            ctx.Pool(workers) as pool:
        progress.update(0, failed=0)  # the rate counts from here
        for r in pool.imap_unordered(_one, jobs):
            runs.append(r)
            ok = r["expelled_online"] == 0 and r["honest_digest_agreement"] == 1.0
            progress.note(f"nodes={r['nodes']:3d} seed={r['seed']:3d} members={r['final_members']:3d} "
                          f"expelled_online={r['expelled_online']} agreement={r['honest_digest_agreement']:.3f} "
                          f"({r['wall_seconds']:.0f} s){'' if ok else '  <-- FAIL'}")
            failed = sum(not (x["expelled_online"] == 0 and x["honest_digest_agreement"] == 1.0) for x in runs)
            progress.update(len(runs), failed=failed)
    runs.sort(key=lambda r: (r["nodes"], r["seed"]))
    by_size = {}
    for n in sizes:
        rs = [r for r in runs if r["nodes"] == n]
        by_size[str(n)] = {
            "runs": len(rs),
            "runs_with_expulsion": sum(r["expelled_online"] > 0 for r in rs),
            "expelled_online": sum(r["expelled_online"] for r in rs),
            "runs_full_membership": sum(r["final_members"] == n for r in rs),
            "runs_full_agreement": sum(r["honest_digest_agreement"] == 1.0 for r in rs),
            "mean_final_accuracy": round(sum(r["final_accuracy"] or 0 for r in rs) / max(1, len(rs)), 4),
        }
    ok = all(r["expelled_online"] == 0 and r["honest_digest_agreement"] == 1.0 for r in runs)
    return {"ok": ok, "rounds": rounds, "by_size": by_size, "runs": runs,
            "wall_seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = parser("seedswarm bench sweep",
               "Fault-free simulations over seeds and swarm sizes: no running member may ever be expelled, "
               "and every honest node must end on the same model.",
               ["seedswarm bench sweep --nodes 4,8,16 --seeds 20 --rounds 2000 --json"],
               more="Exit code 1 if any run expelled a running member or ended without full agreement.")
    p.add_argument("--nodes", default="4,8,16", metavar="N,N,...", help="comma-separated swarm sizes")
    p.add_argument("--seeds", type=int, default=20, help="simulations per size, seeds FIRST..FIRST+N-1")
    p.add_argument("--first-seed", type=int, default=0, metavar="FIRST", help="first seed")
    p.add_argument("--rounds", type=int, default=2000, help="rounds per simulation")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="simulations run at once (at most the CPU count)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no header, progress or per-run lines on stderr")
    a = p.parse_args(argv)
    try:
        sizes = [int(x) for x in a.nodes.split(",") if x]
    except ValueError:
        print(f"seedswarm bench sweep: --nodes expects comma-separated integers, got {a.nodes!r}", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1 or a.seeds < 1 or a.rounds < 1 or a.workers < 1:
        print("seedswarm bench sweep: --nodes, --seeds, --rounds and --workers must be positive", file=sys.stderr)
        return 2
    res = sweep(sizes, list(range(a.first_seed, a.first_seed + a.seeds)), a.rounds, a.workers, quiet=a.quiet)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{'nodes':>5} {'runs':>5} {'expulsions':>10} {'full members':>12} {'agreement 1.0':>13} {'accuracy':>8}")
        for n, b in res["by_size"].items():
            print(f"{n:>5} {b['runs']:>5} {b['expelled_online']:>10} {b['runs_full_membership']:>12} "
                  f"{b['runs_full_agreement']:>13} {b['mean_final_accuracy']:>8.3f}")
        print("verdict:", "no online member expelled, full agreement everywhere" if res["ok"] else "FAIL")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
