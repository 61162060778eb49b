"""``autocast=bf16``: forward passes in bfloat16 over float32 master weights (node/learn/lowprecision.py).

The parameters, the replay and the genesis digest stay float32; the loss comes back float32;
zeroth-order estimates stay informative (a bf16 loss made them all zero, issue 13); a swarm on
the option trains and agrees; bad values are one clear error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from seedswarm.node.learn.estimators import fo_project, zo_spsa
from seedswarm.node.learn.replay import initial_digest
from seedswarm.node.learn.tasks import TaskError, load_task

TINY: dict[str, Any] = {"layers": 1, "width": 32, "heads": 2, "context": 32, "pretrain_steps": 0,
                        "code_bytes": 100_000, "eval_windows": 16}

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def _batch(task: Any, seed: int = 0) -> Any:
    return task.batch(task.shard(0, 1), np.random.default_rng(seed), 8)


def test_the_loss_is_float32_close_to_full_precision_and_the_weights_stay_float32() -> None:
    full = load_task("lm", TINY, seed=3)
    low = load_task("lm", {**TINY, "autocast": "bf16"}, seed=3)
    m_full, m_low = full.build_model(), low.build_model()
    assert initial_digest(m_full) == initial_digest(m_low)  # same genesis model: the option is compute only
    batch = _batch(full)
    a, b = full.loss(m_full, batch), low.loss(m_low, batch)
    assert b.dtype == torch.float32 and all(p.dtype == torch.float32 for p in m_low.parameters())
    assert a.item() != b.item()  # it did run in bf16 ...
    assert abs(a.item() - b.item()) < 0.02 * a.item()  # ... and is close
    b.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in m_low.parameters())
    ev = low.evaluate(m_low)
    assert set(ev) == set(full.evaluate(m_full)) and np.isfinite(ev["loss"])


def test_zeroth_order_estimates_stay_informative_under_bf16() -> None:
    """The issue's failure: a bf16 loss rounds both perturbed losses to the same value at eps
    1e-3. Under autocast the loss is float32: the estimates are non-zero and follow the
    full-precision ones (and the exact projection of the gradient)."""
    full = load_task("lm", TINY, seed=3)
    low = load_task("lm", {**TINY, "autocast": "bf16"}, seed=3)
    model = full.build_model()
    batch = _batch(full, 1)
    streams = list(range(100, 132))
    ref = zo_spsa(model, lambda m: full.loss(m, batch), streams, 1e-3, mode="functional")
    got = zo_spsa(model, lambda m: low.loss(m, batch), streams, 1e-3, mode="functional")
    exact = fo_project(model, lambda m, t: full.loss(m, batch), streams)
    assert sum(1 for v in got if v != 0.0) >= 30, got
    assert np.corrcoef(got, ref)[0, 1] > 0.9
    assert np.corrcoef(got, exact)[0, 1] > 0.9


def test_a_swarm_on_bf16_runs_and_agrees() -> None:
    from seedswarm.sim.runner import SimConfig, run

    out = run(SimConfig(nodes=8, trainers=4, rounds=6, directions=16, task="digits",
                        task_options={"hidden": 16, "autocast": "bf16"}, seed=2, quiet=True))
    assert out["honest_digest_agreement"] == 1.0 and out["rounds"] >= 6


@pytest.mark.parametrize("value", ["bf8", 16, True, "BF16"])
def test_a_bad_value_is_one_clear_error(value: object) -> None:
    with pytest.raises(TaskError, match="autocast"):
        load_task("digits", {"hidden": 16, "autocast": value}, seed=0)
