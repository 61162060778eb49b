"""Benchmark: the swarm's ``lm`` update with its projection noise drawn in closed form.

Why: a ``bench lm`` row at 842k parameters costs 20 to 80 minutes here, almost all of it
generating directions (K x 842k numbers per trainer, per round, twice). The question a sweep
asks is cheaper: how does the update ``-lr * s * (1/K) sum_k <h, z_k> z_k`` (``h = s * g`` the
group's mean gradient in the scaled space, ``s`` the genesis's direction scale, one group of
trainers sharing K directions) train, given its noise? For ``z_k ~ N(0, I)`` that update has
mean ``h`` and covariance ``(|h|^2 I + h h^T) / K``, so one Gaussian vector and one scalar per
group draw a sample with exactly those moments: ``h * (1 + eta / sqrt(K)) + |h| / sqrt(K) * xi``.
A 50-round run then costs a minute.

What it leaves out, so its figures are a guide and ``bench lm`` is the measurement: the one-byte
quantiser and its public scale (which clip large coefficients), the robust aggregate (a guarded
mean, not the mean), the quantiles of the direction table (not exact Gaussians), timeouts,
membership. Measured against the simulator at the same settings it came within 1 to 3 points
of the share of Adam's reduction (docs/lm.md).

The trainers of a round are ``--trainers`` distinct nodes drawn from ``--nodes``, each with its
task shard and a batch of ``--batch-size`` windows; trainer ``i`` is in group ``i % groups``, as
in the protocol. ``--noise-free`` applies the mean alone (K -> infinity).

CLI: ``seedswarm bench lm_proxy --lr X [options]``; ``--help`` lists them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seedswarm.clihelp import parser
from seedswarm.node.core.genesis import lr_schedule
from seedswarm.node.learn.initial import parse_task_options
from seedswarm.node.learn.momentum import direction_momentum, step_with_momentum_, with_buffers
from seedswarm.node.learn.replay import direction_scale
from seedswarm.node.learn.tasks import load_task


@dataclass
class Proxy:
    lr: float
    lr_half_life: int = 0
    task_options: dict[str, Any] = field(default_factory=dict)
    nodes: int = 50
    trainers: int = 16
    groups: int = 1
    directions: int = 256
    batch_size: int = 8
    rounds: int = 50
    eval_every: int = 10
    noise_free: bool = False
    seed: int = 0


def noisy_update(h: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """A sample of ``(1/k) sum_j <h, z_j> z_j`` for ``z_j ~ N(0, I)``: mean ``h``, covariance
    ``(|h|^2 I + h h^T) / k`` (module docstring), without drawing the k directions."""
    eta = float(torch.randn((), generator=gen, dtype=h.dtype))
    xi = torch.randn(h.shape, generator=gen, dtype=h.dtype)
    return h * (1.0 + eta / math.sqrt(k)) + (float(h.norm()) / math.sqrt(k)) * xi


def _add_flat_(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """``tensors += flat``, ``flat`` their concatenation's length, in order."""
    offset = 0
    for q in tensors:
        q.add_(flat[offset : offset + q.numel()].view_as(q))
        offset += q.numel()


def measure(p: Proxy, log: Any = sys.stderr) -> dict[str, Any]:
    if not 1 <= p.groups <= p.trainers <= p.nodes:
        raise ValueError(f"need 1 <= groups <= trainers <= nodes, not {p.groups}, {p.trainers}, {p.nodes}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bits on every run of this machine
    try:
        return _measure(p, log)
    finally:
        torch.set_num_threads(threads)


def _measure(p: Proxy, log: Any) -> dict[str, Any]:
    task = load_task("lm", p.task_options, seed=p.seed)
    model = task.build_model()
    params = list(model.parameters())
    scale = direction_scale(model)
    s = torch.cat([x.reshape(-1).float() for x in scale]) if scale is not None else None
    shards = [task.shard(i, p.nodes) for i in range(p.nodes)]
    rng = np.random.default_rng([p.seed, 0x9B0])
    gen = torch.Generator().manual_seed(p.seed)
    curve = [(0, float(task.evaluate(model)["loss"]))]
    beta = direction_momentum(model)
    state = with_buffers([q.detach() for q in params], beta)  # as replay keeps it (momentum.py)
    t0 = time.monotonic()
    for r in range(p.rounds):
        lr = lr_schedule(p.lr, p.lr_half_life, r)
        hs = []  # each trainer's gradient in the scaled space, in rank order
        for node in rng.choice(p.nodes, size=p.trainers, replace=False):
            loss = task.loss(model, task.batch(shards[int(node)], rng, p.batch_size))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                              for q, g in zip(params, grads, strict=True)])
            hs.append(flat * s if s is not None else flat)
        step = torch.zeros_like(hs[0])
        for group in range(p.groups):  # trainer ``rank`` measures group ``rank % groups``
            members = hs[group :: p.groups]
            mean = sum(members[1:], members[0]) / len(members)
            step += mean if p.noise_free else noisy_update(mean, p.directions, gen)
        step /= p.groups
        if s is not None:
            step *= s
        delta = step.mul_(-lr)
        with torch.no_grad():
            if beta:  # the protocol's own step: m = beta m + delta, theta += (1 - beta) m
                step_with_momentum_(state, beta, partial(_add_flat_, flat=delta))
            else:
                _add_flat_(state, delta)
        if (r + 1) % p.eval_every == 0 or r + 1 == p.rounds:
            loss_ = float(task.evaluate(model)["loss"])
            curve.append((r + 1, loss_))
            print(f"bench lm_proxy: round {r + 1}, validation loss {loss_:.4f}, {time.monotonic() - t0:.0f} s",
                  file=log, flush=True)
            if not math.isfinite(loss_) or loss_ > 2 * curve[0][1]:
                break  # diverged: the rest would only cost time
    return {"proxy": asdict(p), "curve": curve, "final_loss": curve[-1][1], "diverged": curve[-1][0] < p.rounds
            or not math.isfinite(curve[-1][1]), "wall_seconds": round(time.monotonic() - t0, 1)}


def share_of(result: dict[str, Any], adam_final: float) -> float | None:
    """``(initial - final) / (initial - adam_final)``, as ``bench lm`` reports it, with Adam's loss
    at the same round; None if the run diverged."""
    initial, final = result["curve"][0][1], result["final_loss"]
    if result["diverged"] or initial <= adam_final:
        return None
    return (initial - final) / (initial - adam_final)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench lm_proxy`` (``argv`` excludes "bench lm_proxy")."""
    ap = parser("seedswarm bench lm_proxy",
                "The lm task trained by the swarm's update with its projection noise drawn in closed form: a "
                "minute where bench lm takes an hour; a guide for sweeps, not the figure (docs/lm.md).",
                ["seedswarm bench lm_proxy --lr 10 --lr-half-life 25 --directions 4096 "
                 "--task-option precondition=16 --task-option precondition_cap=2 --adam-from lm.json"])
    d = Proxy(lr=0.0)
    ap.add_argument("--lr", type=float, required=True,
                    help="the swarm's step size (required, no default: the stable range depends on K, the groups "
                         "and the direction scale; docs/lm.md)")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an lm task option (repeatable), e.g. precondition=16")
    for name, what in (("lr-half-life", "rounds: lr / (1 + round / N); 0: constant"), ("nodes", "nodes"),
                       ("trainers", "trainers per round"), ("groups", "direction groups"),
                       ("directions", "K, directions per group"), ("batch-size", "windows per trainer"),
                       ("rounds", "rounds"), ("eval-every", "rounds between evaluations"), ("seed", "seed")):
        attr = name.replace("-", "_")
        ap.add_argument(f"--{name}", type=int, default=getattr(d, attr), help=f"{what} (default: %(default)s)")
    ap.add_argument("--noise-free", action="store_true", help="apply the mean update alone (K -> infinity)")
    ap.add_argument("--adam-from", default=None, metavar="FILE",
                    help="a bench lm --out result on the same task options and samples per round: report the "
                         "share of its best Adam's reduction at --rounds (default: none)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    args = ap.parse_args(argv)
    if min(args.nodes, args.trainers, args.groups, args.directions, args.batch_size, args.rounds, args.eval_every) < 1:
        ap.error("nodes, trainers, groups, directions, batch size, rounds and eval-every must be positive")
    if args.trainers > args.nodes or args.groups > args.trainers:
        ap.error("need groups <= trainers <= nodes")
    adam = None
    if args.adam_from:
        try:
            saved = json.loads(Path(args.adam_from).read_text())
            at = dict((int(r), float(x)) for r, x in saved["adam_curves"][str(saved["adam_best_lr"])])
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--adam-from: not a bench lm --out result ({e})")
        if args.rounds not in at:
            ap.error(f"--adam-from: its Adam curve has no evaluation at round {args.rounds}")
        adam = at[args.rounds]
    p = Proxy(lr=args.lr, lr_half_life=args.lr_half_life, task_options=parse_task_options(args.task_option),
              nodes=args.nodes, trainers=args.trainers, groups=args.groups, directions=args.directions,
              batch_size=args.batch_size, rounds=args.rounds, eval_every=args.eval_every,
              noise_free=args.noise_free, seed=args.seed)
    result = measure(p)
    if adam is not None:
        result["adam_final_loss"] = adam
        result["share_of_adam"] = share_of(result, adam)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        losses = " / ".join(f"{x:.3f}" for _, x in result["curve"][1:])
        print(f"lm proxy, lr {p.lr} (half-life {p.lr_half_life}), {p.groups} group(s) x K={p.directions}, "
              f"{p.trainers} trainers x batch {p.batch_size}: loss {result['curve'][0][1]:.3f} -> {losses}"
              + (" (diverged)" if result["diverged"] else ""))
        if result.get("share_of_adam") is not None:
            print(f"share of Adam's loss reduction ({adam:.4f}): {100 * result['share_of_adam']:.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
