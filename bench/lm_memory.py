"""Benchmark: peak memory of a zeroth-order round, a first-order projection and Adam on one GPT.

Issue 13's memory claim: a zeroth-order trainer (MeZO-style SPSA, what ``--estimator zo`` runs
each round) needs about what inference needs, because it never holds gradients, optimizer
moments or activations for a backward pass; Adam fine-tuning holds the parameters, their
gradients, two moment buffers and the activations. Measured here on the ``lm`` task's GPT
(``node/learn/gpt.py``, random initialisation, no pretraining) at 57M parameters by default.

Each measurement runs in a fresh Python process (``sys.executable -c``), so one peak cannot
hide another: peak resident memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` of that process
(Python, torch, the model and the step), read after the step. Every process first runs one Adam
step on a scalar, so the lazy imports of ``torch.optim`` (about 80 MB) are in every figure
alike rather than charged to Adam. The steps:

* ``baseline``: torch and seedswarm imported, the model built; nothing run.
* ``inference``: one forward of the loss under ``torch.no_grad()``.
* ``zo``: one ``zo_spsa(..., mode="auto")`` call on ``directions`` streams (two forwards each).
* ``fo``: one ``fo_project`` call (Ferret: a forward and backward, projected on the streams).
* ``adam``: two ``torch.optim.Adam`` steps (``foreach=False``), each a forward and backward.

The batch is random bytes (memory does not depend on their values). Seconds are the step's
wall time only (not the build), on ``threads`` torch threads.

CLI: ``seedswarm bench lm_memory [--layers 8 --width 768 --heads 12 --context 128 --batch 8
--directions 16] [--json]``, or ``python -m seedswarm.bench.lm_memory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.node.learn.gpt import GPTConfig, gpt_param_count

KINDS = ("baseline", "inference", "zo", "fo", "adam")
DEFAULT_CONFIG = GPTConfig(layers=8, width=768, heads=12, context=128)
assert gpt_param_count(DEFAULT_CONFIG) >= 50_000_000, "the claim is about a GPT of at least 50M parameters"

_CHILD = ("import json, sys\n"
          "from seedswarm.bench.lm_memory import _child\n"
          "print(json.dumps(_child(json.loads(sys.argv[1]))))\n")


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in its own process: build the model, run the step, report the peak."""
    import resource

    import numpy as np
    import torch

    from seedswarm.crypto.hashing import stream_seed
    from seedswarm.node.learn.estimators import fo_project, zo_spsa
    from seedswarm.node.learn.gpt import build_gpt
    from seedswarm.node.learn.lm import next_byte_loss

    torch.set_num_threads(int(spec["threads"]))
    # Adam's first step imports torch._dynamo and friends (about 80 MB and 2.6 s): done here in
    # every process, on one scalar, so that no step is charged for a one-time import.
    warm = torch.zeros(1, requires_grad=True)
    warm_opt = torch.optim.Adam([warm], foreach=False)
    (warm * 2.0).sum().backward()
    warm_opt.step()
    del warm, warm_opt
    cfg = GPTConfig(**spec["config"])
    model = build_gpt(cfg, np.random.default_rng(0))
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (int(spec["batch"]), cfg.context + 1), generator=gen, dtype=torch.int64)
    batch = (w[:, :-1], w[:, 1:])
    streams = [stream_seed(0x5EED, k) for k in range(int(spec["directions"]))]
    kind = spec["kind"]
    loss: float | None = None
    t0 = time.perf_counter()
    if kind == "inference":
        with torch.no_grad():
            loss = float(next_byte_loss(model, batch))
    elif kind == "zo":
        g = zo_spsa(model, lambda m: next_byte_loss(m, batch), streams, 1e-3, mode="auto")
        assert len(g) == len(streams)
    elif kind == "fo":
        g = fo_project(model, lambda m, t: next_byte_loss(m, batch), streams)
        assert len(g) == len(streams)
    elif kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            out = next_byte_loss(model, batch)
            out.backward()
            opt.step()
            loss = float(out.detach())
    elif kind != "baseline":
        raise ValueError(f"unknown measurement {kind!r}")
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return {"kind": kind, "peak_mb": peak_kb / 1024.0, "seconds": seconds, "params": params, "loss": loss}


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    # the child imports the same seedswarm as this process, however that was found
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # no idle thread pools beyond what is asked
        env[var] = str(spec["threads"])
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {spec['kind']!r} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def measure(layers: int = 8, width: int = 768, heads: int = 12, context: int = 128, batch: int = 8,
            directions: int = 16, threads: int = 1, timeout: float = 3600.0) -> dict[str, Any]:
    """Peak resident memory (MB) and seconds of each step in :data:`KINDS`, each in a fresh
    process, and the ratios of the zeroth-order and first-order peaks to Adam's."""
    cfg = GPTConfig(layers=layers, width=width, heads=heads, context=context)
    cfg.check()
    if batch < 1 or directions < 1 or threads < 1:
        raise ValueError("batch, directions and threads must be positive")
    params = gpt_param_count(cfg)
    runs: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        spec = {"kind": kind, "config": {"layers": layers, "width": width, "heads": heads, "context": context},
                "batch": batch, "directions": directions, "threads": threads}
        r = _run_child(spec, timeout)
        if r["params"] != params:
            raise RuntimeError(f"built {r['params']} parameters, gpt_param_count says {params}")
        runs[kind] = {"peak_mb": r["peak_mb"], "seconds": r["seconds"]}
    base = runs["baseline"]["peak_mb"]
    for r in runs.values():
        r["over_baseline_mb"] = r["peak_mb"] - base
    adam = runs["adam"]["peak_mb"]
    import torch

    return {
        "benchmark": "lm_memory",
        "config": {"layers": layers, "width": width, "heads": heads, "context": context, "mlp_ratio": cfg.mlp_ratio},
        "params": params,
        "params_mb": params * 4 / 2**20,
        "batch": batch,
        "directions": directions,
        "threads": threads,
        "torch_version": torch.__version__,
        "measurements": runs,
        "ratios": {
            "zo_over_adam": runs["zo"]["peak_mb"] / adam,
            "fo_over_adam": runs["fo"]["peak_mb"] / adam,
            "inference_over_adam": runs["inference"]["peak_mb"] / adam,
        },
    }


def _table(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"GPT {c['layers']} layers x {c['width']} wide, {c['heads']} heads, context {c['context']}: "
             f"{r['params']:,} parameters ({r['params_mb']:,.0f} MB float32); batch {r['batch']}, "
             f"{r['directions']} directions, {r['threads']} torch thread(s), torch {r['torch_version']}",
             "",
             f"{'step':<10} {'peak MB':>9} {'over baseline':>14} {'seconds':>8}"]
    for kind, m in r["measurements"].items():
        lines.append(f"{kind:<10} {m['peak_mb']:>9,.0f} {m['over_baseline_mb']:>14,.0f} {m['seconds']:>8.2f}")
    q = r["ratios"]
    lines += ["", f"zo / adam {q['zo_over_adam']:.2f}   fo / adam {q['fo_over_adam']:.2f}   "
                  f"inference / adam {q['inference_over_adam']:.2f}   (peak resident memory of each process)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench lm_memory`` (``argv`` excludes "bench lm_memory")."""
    d = DEFAULT_CONFIG
    ap = parser(
        "seedswarm bench lm_memory",
        "Peak memory of one zeroth-order round (SPSA), one first-order projection (Ferret) and two Adam "
        "steps on the same randomly initialised GPT, each in a fresh process, against the model alone and "
        "one forward (inference).",
        ["seedswarm bench lm_memory", "seedswarm bench lm_memory --layers 2 --width 256 --heads 4 --json"],
    )
    ap.add_argument("--layers", type=int, default=d.layers, help="transformer blocks")
    ap.add_argument("--width", type=int, default=d.width, help="model width (a multiple of --heads)")
    ap.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    ap.add_argument("--context", type=int, default=d.context, help="bytes per window")
    ap.add_argument("--batch", type=int, default=8, help="windows per batch")
    ap.add_argument("--directions", type=int, default=16, help="directions of the zo and fo steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        result = measure(args.layers, args.width, args.heads, args.context, args.batch, args.directions,
                         args.threads)
    except (ValueError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"seedswarm bench lm_memory: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
