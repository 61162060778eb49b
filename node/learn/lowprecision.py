"""Forward passes in bfloat16 or float16 over float32 master weights: ``autocast=bf16``.

Why: on a GPU a transformer's forward and backward run several times faster in bf16, and a
zeroth-order trainer needs only forward passes. But the weights must stay float32. Records are
applied as ``θ + Σ c_k z_k`` with coefficients around 1e-6; in bf16 (8 bits of mantissa) most of
those additions round away (4.6 % of parameters changed at 1e-6, issue 13), and replay would no
longer be the exact float32 arithmetic every node repeats. So only the *compute* is low
precision: ``torch.autocast`` casts inside the forward, the parameters, the directions and the
replay stay float32 (``replay.py`` is untouched, the genesis digest does not change), and the loss
comes back as float32. A loss computed in bf16 makes zeroth-order estimates all zero at
``eps = 1e-3`` (the two perturbed losses round to the same value); autocast runs the loss
functions (log-softmax, cross-entropy) in float32 on both CPU and CUDA, which keeps them apart.

What a node computes in low precision is its own estimate, never something another node must
reproduce: contributions are checked by their aggregate, not recomputed. So a swarm may mix
devices (bf16 on a GPU, the same option on a CPU, where it is usually slower but allowed).

Options, understood for every task (``load_task`` takes it off before the task's factory sees
it): ``autocast`` = ``off`` (the default), ``bf16`` or ``fp16`` (CUDA; on a CPU torch may
refuse it, which is reported when the first forward runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from seedswarm.node.learn.taskcommon import TaskWrapper
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["AUTOCAST_DTYPES", "AutocastTask", "split_autocast_option"]

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def split_autocast_option(options: Mapping[str, Any]) -> tuple[dict[str, Any], torch.dtype | None]:
    """``options`` without ``autocast``, and the dtype it asks for (None: off)."""
    rest = {k: v for k, v in options.items() if k != "autocast"}
    value = options.get("autocast", "off")
    if value == "off":
        return rest, None
    if not isinstance(value, str) or value not in AUTOCAST_DTYPES:
        raise TaskError(f"option 'autocast' must be one of off, {', '.join(AUTOCAST_DTYPES)}; not {value!r}")
    return rest, AUTOCAST_DTYPES[value]


def _device_type(model: Any) -> str:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device.type if p is not None else "cpu"


class AutocastTask(TaskWrapper):
    """A task whose loss and evaluation run under ``torch.autocast(dtype)`` on the model's device;
    the model, its parameters and the loss returned stay float32 (module docstring)."""

    def __init__(self, inner: Any, dtype: torch.dtype) -> None:
        super().__init__(inner)
        self.autocast_dtype = dtype

    def loss(self, model: Any, batch: Any) -> Any:
        with torch.autocast(_device_type(model), dtype=self.autocast_dtype):
            out = self.inner.loss(model, batch)
        return out.float() if isinstance(out, torch.Tensor) else out

    def evaluate(self, model: Any) -> dict[str, float]:
        with torch.autocast(_device_type(model), dtype=self.autocast_dtype):
            result: dict[str, float] = self.inner.evaluate(model)
        return result
