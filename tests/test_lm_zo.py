"""Zeroth-order estimates on a GPT with a tied head (issue 13): exact, or refused, never biased.

A GPT whose head is written ``F.linear(x, self.tok.weight)`` in its own forward reads the
embedding's parameter outside ``tok``'s forward. The per-module perturbation used to miss that
read (the head saw the unperturbed weight, ``tok`` had been called, so no check fired) and the
estimate was about 30 % off. Now module mode refuses it, and ``auto`` (what every driver uses)
falls back to the functional path, which matches the exact directional derivative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seedswarm.crypto.directions import stream_seed
from seedswarm.node.learn import estimators, perturb
from seedswarm.node.learn.estimators import fo_project, local_estimate, zo_spsa
from seedswarm.node.learn.gpt import GPT, GPTConfig, build_gpt

CFG = GPTConfig(layers=2, width=32, heads=2, context=16)
STREAMS = [stream_seed(13, k) for k in range(32)]


class HeadInParent(GPT):
    """The tied head as many GPTs write it: the embedding matrix used directly by the parent."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        del self.head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.norm(x), self.tok.weight)


def head_in_parent() -> HeadInParent:
    model = HeadInParent(CFG)
    model.load_state_dict(build_gpt(CFG, np.random.default_rng(0)).state_dict(), strict=False)
    return model


def loss_fn(batch: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda m: F.cross_entropy(m(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(8, CFG.context + 1)))


def raw(model: torch.nn.Module) -> list[bytes]:
    return [p.detach().contiguous().view(torch.uint8).numpy().tobytes() for p in model.parameters()]


def old_per_module(model: torch.nn.Module, lf, streams: list[int], eps: float) -> list[float]:  # type: ignore[no-untyped-def]
    """The per-module path as it was (no check of reads outside a module's forward)."""
    params, offsets = estimators._flat_layout(model)
    out = []
    with torch.no_grad(), perturb.ModuleSwap(model, offsets) as swap:
        for s in streams:
            swap.stream, swap.zflat = s, None
            losses = []
            for c in (eps, -eps):
                swap.coeff = c
                losses.append(float(lf(model).double()))
            out.append((losses[0] - losses[1]) / (2 * eps))
    return out


def agreement(a: list[float], b: list[float]) -> tuple[float, float]:
    x, y = np.asarray(a), np.asarray(b)
    return float(np.corrcoef(x, y)[0, 1]), float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_tied_head_in_parent_exact_in_auto_refused_in_module_mode(batch: torch.Tensor) -> None:
    model = head_in_parent()
    lf = loss_fn(batch)
    before = raw(model)
    exact = fo_project(model, lambda m, t: lf(m), STREAMS)  # <grad, z_k>: the exact projection
    corr_old, err_old = agreement(old_per_module(model, lf, STREAMS, 1e-4), exact)
    assert corr_old < 0.99 and err_old > 0.1  # the bias the issue measured
    with pytest.raises(ValueError, match=r"tok\.weight.*functional"):
        zo_spsa(model, lf, STREAMS, 1e-4, mode="module")
    auto = zo_spsa(model, lf, STREAMS, 1e-4, mode="auto")
    assert auto == zo_spsa(model, lf, STREAMS, 1e-4, mode="functional")
    corr, err = agreement(auto, exact)
    assert corr > 0.9999 and err < 0.01
    assert raw(model) == before


def test_task_gpt_all_modes_agree_and_match_the_exact_projection(batch: torch.Tensor) -> None:
    """The lm task's GPT shares the Parameter between ``tok`` and ``head`` modules: per module
    it is perturbed in both, with the same slice, so every mode gives the same bits."""
    model = build_gpt(CFG, np.random.default_rng(0))
    lf = loss_fn(batch)
    a = zo_spsa(model, lf, STREAMS, 1e-4, mode="module")
    assert a == zo_spsa(model, lf, STREAMS, 1e-4, mode="functional") == zo_spsa(model, lf, STREAMS, 1e-4, mode="auto")
    corr, err = agreement(a, fo_project(model, lambda m, t: lf(m), STREAMS))
    assert corr > 0.9999 and err < 0.01


def test_parameters_captured_by_the_loss_are_refused(batch: torch.Tensor) -> None:
    model = build_gpt(CFG, np.random.default_rng(0))
    w = model.tok.weight

    def lf(m: torch.nn.Module) -> torch.Tensor:
        return loss_fn(batch)(m) + 1e-3 * w.square().sum()  # reads the stored tensor itself

    for mode in ("auto", "functional"):
        with pytest.raises(ValueError, match="no mode can perturb"):
            zo_spsa(model, lf, STREAMS[:2], 1e-4, mode=mode)  # type: ignore[arg-type]


def test_local_estimate_uses_auto(batch: torch.Tensor) -> None:
    from seedswarm.node.core.genesis import Genesis
    from seedswarm.node.learn.taskcommon import Shard

    model = head_in_parent()

    class Fixed:
        name = "fixed"

        def batch(self, shard: Shard, rng: np.random.Generator, size: int) -> torch.Tensor:
            return batch

        def loss(self, m: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
            return loss_fn(b)(m)

    g = Genesis(estimator="zo", eps=1e-4, directions=len(STREAMS))
    shard = Shard(0, 1, np.zeros(1, dtype=np.int64))
    values = local_estimate(Fixed(), g, model, shard, np.random.default_rng(0), STREAMS)
    assert values == zo_spsa(model, loss_fn(batch), STREAMS, 1e-4, mode="functional")
