"""Benchmark: how fast a node regenerates and applies a round's directions.

Replaying a record costs ``K`` directions of the model's size (``add_directions_``); this is the
per-round CPU price of the seed-based protocol, and catching up is a loop over it. The baseline
is what a node would pay with torch's own (non-portable, non-seekable) generator: for each of
the ``K`` directions ``torch.randn(N)`` and ``p.add_(z, alpha=c)``, timed in the same process on
the same sizes, interleaved with ours so that machine noise hits both alike.

CLI: ``seedswarm bench replay --params N --directions K [--json] [--device cpu|cuda] [--repeats R]``.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from seedswarm.clihelp import parser
from seedswarm.crypto.directions import stream_seed
from seedswarm.crypto.projection import add_directions_


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(params: int, directions: int, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Time ``add_directions_`` against the torch.randn baseline; returns the result record.

    Throughputs count parameters touched per second (``params * directions / seconds``); the
    headline figures are the best of ``repeats`` (least disturbed by other load), medians are
    reported next to them.
    """
    if params <= 0 or directions <= 0 or repeats <= 0:
        raise ValueError("params, directions and repeats must be positive")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is false")
    rng = random.Random(20240501)
    round_seed = rng.getrandbits(64)
    streams = [stream_seed(round_seed, k) for k in range(directions)]
    coeffs = [rng.uniform(-1e-3, 1e-3) for _ in range(directions)]
    p_ours = torch.zeros(params, dtype=torch.float32, device=dev)
    p_base = torch.zeros(params, dtype=torch.float32, device=dev)

    def ours() -> None:
        add_directions_([p_ours], streams, coeffs)

    def baseline() -> None:
        for c in coeffs:
            z = torch.randn(params, device=dev)
            p_base.add_(z, alpha=c)

    # Warm-up: allocator, workspaces, tables, thread pools, CUDA kernels.
    ours()
    baseline()
    t_ours: list[float] = []
    t_base: list[float] = []
    for _ in range(repeats):
        t_ours.append(_timed(ours, dev))
        t_base.append(_timed(baseline, dev))
    work = params * directions
    best = work / min(t_ours)
    best_base = work / min(t_base)
    return {
        "benchmark": "replay",
        "params": params,
        "directions": directions,
        "repeats": repeats,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "params_per_second": best,
        "baseline_params_per_second": best_base,
        "ratio": best / best_base,
        "params_per_second_median": work / statistics.median(t_ours),
        "baseline_params_per_second_median": work / statistics.median(t_base),
        "seconds": t_ours,
        "baseline_seconds": t_base,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _table(r: dict[str, Any]) -> str:
    rows = [
        ("device", f"{r['device']} ({r['device_name']}), {r['torch_threads']} torch threads"),
        ("size", f"{r['params']:,} params x {r['directions']} directions, best of {r['repeats']}"),
        (
            "seedswarm directions",
            f"{r['params_per_second'] / 1e6:,.1f} M params/s"
            f"  (median {r['params_per_second_median'] / 1e6:,.1f})",
        ),
        (
            "torch.randn baseline",
            f"{r['baseline_params_per_second'] / 1e6:,.1f} M params/s"
            f"  (median {r['baseline_params_per_second_median'] / 1e6:,.1f})",
        ),
        ("ratio", f"{r['ratio']:.2f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench replay`` (``argv`` excludes the words "bench replay")."""
    ap = parser(
        "seedswarm bench replay",
        "Throughput of regenerating and applying a round's directions (what replaying one record costs), "
        "against torch.randn plus add_ on the same sizes.",
        ["seedswarm bench replay --params 1000000 --directions 64 --json",
         "seedswarm bench replay --device cuda"],
    )
    ap.add_argument("--params", type=int, default=1_000_000, help="model size in parameters")
    ap.add_argument("--directions", type=int, default=64, help="directions K applied per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is reported)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the parameters live")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        result = run(args.params, args.directions, args.repeats, args.device)
    except (ValueError, RuntimeError) as e:
        print(f"seedswarm bench replay: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
