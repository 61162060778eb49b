"""`seedswarm bench byzantine`: final accuracy under attack, per aggregator and Byzantine share.

The grid is attack x aggregator x Byzantine share on ``digits``, each cell one full simulation on
the real protocol core (``sim.runner.run``), plus one clean run per aggregator (the clean run does
not depend on the share). A cell reports its final accuracy and its difference to the clean run of
the same aggregator, in accuracy points. The default attacks are the six value attacks of
:mod:`seedswarm.sim.attacks`; protocol attacks are rejected message by message
(``tests/test_protocol_attacks.py``) and can be added with ``--attacks``.

Why these sizes: the whole grid (6 attacks + clean, 5 aggregators, 3 shares: 95 simulations) has
to fit in minutes on 2 cores, so the grid runs 30 nodes and 200 rounds instead of ``seedswarm
sim``'s 100 nodes and 800 rounds (the committee, K, the batch, the learning rate, the
aggregator's trim and every protocol rule are the defaults). ``--quick`` (under a minute): the
default aggregator and the mean at 20 % only.

``--acceptance`` is the check of issue 4 at the real defaults: every value attack at 20 %
Byzantine (the six, plus ``ipm:8``, the strongest IPM we found against the mean, plus the attacks
tuned against one rule: ``adaptive`` against the default, ``scale_pump`` against the mean) on
``seedswarm sim``'s default configuration (100 nodes, 800 rounds), for the default aggregator and
the mean, every attack against both, over ``--seeds`` seeds (default 3: one final accuracy on 359
test images moves by a point or more from seed to seed, so one seed cannot tell a 2-point effect
from noise). It prints the verdict: the default aggregator must stay within 2 points of its clean
run on average for each of the issue's attacks (the six and ``ipm:8``; the tuned attacks are
reported, not judged), and at least one attack must cost the mean 10 points or more.
Runs are independent processes (``--jobs``), each deterministic in its seed, so the table is
reproducible whatever the parallelism.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.progress import Progress
from seedswarm.sampling.aggregators import DEFAULT_RULE, RULES
from seedswarm.sim.attacks import TUNED_AGAINST, VALUE_ATTACKS
from seedswarm.sim.runner import SimConfig

AGGREGATORS = RULES
_SIM = SimConfig()
ACCEPTANCE_ATTACKS = (*VALUE_ATTACKS, "ipm:8")
"""The issue's value attacks, plus IPM at eps = 8: the strength at which IPM breaks the mean."""
SHARES = (0.1, 0.2, 0.3)


def _cell(job: dict[str, Any]) -> dict[str, Any]:
    """One simulation (runs in a worker process): its config in, its key figures out."""
    import torch

    from seedswarm.sim.runner import run

    torch.set_num_threads(1)
    t0 = time.monotonic()
    s = run(SimConfig(**job))
    return {
        "aggregator": job["aggregator"], "byzantine": job["byzantine"], "attack": job["attack"],
        "seed": job["seed"], "final_accuracy": s["final_accuracy"], "rounds": s["rounds"],
        "honest_digest_agreement": s["honest_digest_agreement"],
        "reputation_honest": s.get("reputation_honest"), "reputation_byzantine": s.get("reputation_byzantine"),
        "byzantine_expelled": s.get("byzantine_expelled"), "byzantine_nodes": s.get("byzantine_nodes", 0),
        "wall_seconds": time.monotonic() - t0,
    }


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = dict(nodes=args.nodes, rounds=args.rounds, trainers=args.trainers, directions=args.directions,
                batch_size=args.batch_size,
                lr=args.lr, eval_every=max(10, args.rounds // 10), quiet=True, max_wall=args.max_wall)
    jobs: list[dict[str, Any]] = []
    for seed in range(args.seed, args.seed + args.seeds):
        for agg in args.aggregators:
            jobs.append(dict(base, seed=seed, aggregator=agg, byzantine=0.0, attack="none"))
            for share in args.shares:
                for attack in args.attacks:
                    jobs.append(dict(base, seed=seed, aggregator=agg, byzantine=share, attack=attack))
    return jobs


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(results: list[dict[str, Any]], attacks: list[str]) -> str:
    """Markdown: one line per (aggregator, share); clean accuracy, then each attack's delta."""
    def acc(agg: str, share: float, attack: str) -> float | None:
        xs = [r["final_accuracy"] for r in results if r["aggregator"] == agg and r["attack"] == attack
              and (attack == "none" or abs(r["byzantine"] - share) < 1e-9) and r["final_accuracy"] is not None]
        return _mean(xs) if xs else None

    aggs = list(dict.fromkeys(r["aggregator"] for r in results))
    shares = sorted({r["byzantine"] for r in results if r["attack"] != "none"})
    head = "| aggregator | Byzantine | clean | " + " | ".join(attacks) + " | worst |"
    lines = [head, "|---|---:|---:|" + "---:|" * (len(attacks) + 1)]
    for agg in aggs:
        clean = acc(agg, 0.0, "none")
        for share in shares:
            cells, deltas = [], []
            for a in attacks:
                v = acc(agg, share, a)
                if v is None or clean is None:
                    cells.append("-")
                    continue
                d = 100 * (v - clean)
                deltas.append(d)
                cells.append(f"{100 * v:.1f} ({d:+.1f})")
            worst = f"{min(deltas):+.1f}" if deltas else "-"
            c = f"{100 * clean:.1f}" if clean is not None else "-"
            lines.append(f"| {agg} | {share:.0%} | {c} | " + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 4's two value-attack criteria, on seed-averaged deltas (per-seed deltas shown too)."""
    def deltas(agg: str, attack: str) -> list[float]:
        clean = {r["seed"]: r["final_accuracy"] for r in results if r["aggregator"] == agg and r["attack"] == "none"}
        return [100 * (r["final_accuracy"] - clean[r["seed"]]) for r in results
                if r["aggregator"] == agg and r["attack"] == attack and r["seed"] in clean]

    present = list(dict.fromkeys(r["attack"] for r in results if r["attack"] != "none"))
    judged = [a for a in ACCEPTANCE_ATTACKS if a in present]
    lines = []
    for agg in (DEFAULT_RULE, "mean"):
        for a in present:
            ds = deltas(agg, a)
            if ds:
                extra = f"  (tuned against {TUNED_AGAINST[a]})" if a in TUNED_AGAINST else ""
                lines.append(f"{agg:12s} {a:10s} mean {_mean(ds):+5.1f}  per seed "
                             + " ".join(f"{d:+.1f}" for d in ds) + extra)
    # the default must hold against the attacks; the mean must break under at least one
    # attack, tuned against it or not (that is what shows the attacks are real)
    worst_default = min(_mean(deltas(DEFAULT_RULE, a)) for a in judged)
    worst_mean = min(_mean(ds) for ds in (deltas("mean", a) for a in present) if ds)
    ok_default, ok_mean = worst_default >= -2.0, worst_mean <= -10.0
    lines.append(f"{DEFAULT_RULE}: worst of the judged attacks {worst_default:+.1f} points (within 2): "
                 f"{'PASS' if ok_default else 'FAIL'}")
    lines.append(f"mean: worst attack {worst_mean:+.1f} points (10 or more): {'PASS' if ok_mean else 'FAIL'}")
    return {"worst_default": worst_default, "worst_mean": worst_mean, "pass": ok_default and ok_mean, "lines": lines}


def main(argv: list[str] | None = None) -> int:
    p = parser(
        "seedswarm bench byzantine",
        "Final accuracy under attack, per aggregator and share of Byzantine (attacking) nodes: one full "
        "simulation per cell, plus a clean run per aggregator; each cell shows the change from the clean run.",
        ["seedswarm bench byzantine --quick",
         "seedswarm bench byzantine --attacks sign_flip,alie --aggregators guarded_mean,mean --shares 0.2",
         "seedswarm bench byzantine --acceptance --out runs/byz"])
    p.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smaller grid in under a minute: {DEFAULT_RULE} and mean at 20%% Byzantine, at most 120 rounds")
    p.add_argument("--nodes", type=int, default=30, help="nodes per simulation")
    p.add_argument("--rounds", type=int, default=200, help="rounds per simulation")
    p.add_argument("--trainers", type=int, default=_SIM.trainers, help="trainers per round (the committee)")
    p.add_argument("--directions", type=int, default=_SIM.directions, help="K directions per round")
    p.add_argument("--batch-size", type=int, default=_SIM.batch_size, help="examples in a trainer's batch")
    p.add_argument("--lr", type=float, default=_SIM.lr, help="learning rate of the step every node applies")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per cell, averaged (default: 1; 3 with --acceptance)")
    p.add_argument("--acceptance", action="store_true",
                   help=f"the robustness check at `seedswarm sim`'s full size (100 nodes, 800 rounds): every "
                        f"value attack at 20%% Byzantine against {DEFAULT_RULE} and the mean, 3 seeds; PASS if "
                        f"{DEFAULT_RULE} loses at most 2 accuracy points on average to each (attacks tuned "
                        "against one rule are reported, not judged) and some attack costs the mean 10 or more")
    p.add_argument("--attacks", default=",".join(VALUE_ATTACKS), metavar="A,B,...",
                   help="comma-separated attacks (see `seedswarm sim --help`, --attack)")
    p.add_argument("--aggregators", default=",".join(AGGREGATORS), metavar="A,B,...",
                   help="comma-separated aggregation rules")
    p.add_argument("--shares", default=",".join(str(s) for s in SHARES), metavar="X,Y,...",
                   help="comma-separated shares of Byzantine nodes")
    p.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    p.add_argument("--max-wall", type=float, default=float("inf"), help="wall-clock seconds per simulation at most")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write results.json and table.md into this folder (default: none)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds files")
    args = p.parse_args(argv)
    if args.quick:
        args.aggregators, args.shares = f"{DEFAULT_RULE},mean", "0.2"
        args.nodes, args.rounds = min(args.nodes, 30), min(args.rounds, 120)
    if args.acceptance:
        args.aggregators, args.shares = f"{DEFAULT_RULE},mean", "0.2"
        args.nodes, args.rounds, args.trainers = _SIM.nodes, _SIM.rounds, _SIM.trainers
        args.directions, args.batch_size, args.lr = _SIM.directions, _SIM.batch_size, _SIM.lr
        args.attacks = ",".join((*ACCEPTANCE_ATTACKS, *TUNED_AGAINST))
    if args.seeds is None:
        args.seeds = 3 if args.acceptance else 1
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.aggregators = [a for a in args.aggregators.split(",") if a]
    args.shares = [float(s) for s in args.shares.split(",") if s]
    from seedswarm.sampling.aggregators import validate_rule
    from seedswarm.sim.attacks import get_attack

    try:
        for a in args.aggregators:
            validate_rule(a)
        for a in args.attacks:
            get_attack(a)
    except ValueError as e:
        print(f"seedswarm bench byzantine: {e}", file=sys.stderr)
        return 2
    out: Path | None = None
    if args.out:
        from seedswarm.node.files import OutPathError, prepare_out_dir

        try:
            out = prepare_out_dir(args.out, force=args.force)
        except OutPathError as e:
            print(f"seedswarm bench byzantine: {e}", file=sys.stderr)
            return 2
    jobs = _jobs(args)
    header = (f"bench byzantine: {len(jobs)} simulations ({args.nodes} nodes, {args.trainers} trainers, "
              f"K={args.directions}, {args.rounds} rounds), {args.jobs} at a time")
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    with Progress(len(jobs), unit="simulation", header=header) as progress, \
            ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as ex:
        progress.update(0)  # the rate counts from here
        for r in ex.map(_cell, jobs):
            results.append(r)
            progress.note(f"{r['aggregator']:12s} byz={r['byzantine']:.1f} {r['attack']:10s} "
                          f"acc={r['final_accuracy']:.3f} ({r['wall_seconds']:.0f}s)")
            progress.update(len(results))
    wall = time.monotonic() - t0
    md = table(results, args.attacks)
    config = {k: (None if v == float("inf") else v) for k, v in vars(args).items()
              if k not in ("json", "out", "force")}
    doc = {"config": config, "wall_seconds": wall, "results": results, "table": md}
    if out is not None:
        (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "table.md").write_text(md + "\n")
    if args.acceptance:
        v = verdict(results)
        doc["verdict"] = v
        md += "\n\n" + "\n".join(v["lines"])
    if args.json:
        print(md, file=sys.stderr)
        print(json.dumps(doc, indent=2))
    else:
        print(md)
        print(f"\n{len(jobs)} simulations in {wall:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
