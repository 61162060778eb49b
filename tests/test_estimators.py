"""Projected-gradient estimators (node/learn/estimators.py): exactness, correctness, unbiasedness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.crypto.directions import fill_normal, stream_seed
from seedswarm.crypto.projection import project
from seedswarm.node.learn import estimators
from seedswarm.node.learn.estimators import fo_project, zo_spsa
from seedswarm.node.learn.tasks import DigitsTask

STREAMS = [stream_seed(2024, k) for k in range(16)]


def raw(model: nn.Module) -> list[bytes]:
    """The exact bytes of every parameter and buffer."""
    ts = list(model.parameters()) + list(model.buffers())
    return [t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in ts]


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask({"hidden": 32}, seed=3)


@pytest.fixture(scope="module")
def batch(digits: DigitsTask) -> Any:
    return digits.batch(digits.shard(0, 8), np.random.default_rng(0), 32)


def mezo_inplace(model: nn.Module, loss_fn: Callable[[nn.Module], Any], streams: list[int], eps: float) -> None:
    """MeZO's in-place +eps, -2eps, +eps (the drift this module avoids)."""
    ps = list(model.parameters())
    with torch.no_grad():
        for s in streams:
            zs, off = [], 0
            for p in ps:
                zs.append(fill_normal(s, off, p.numel()).view(p.shape))
                off += p.numel()
            for c in (eps, -2 * eps, eps):
                for p, z in zip(ps, zs, strict=True):
                    p.add_(z, alpha=c)
                loss_fn(model)


def test_zo_restores_exact_bits_where_mezo_does_not(digits: DigitsTask, batch: Any) -> None:
    model = digits.build_model()
    before = raw(model)
    objs = [p for p in model.parameters()]
    g = zo_spsa(model, lambda m: digits.loss(m, batch), STREAMS, 1e-3)
    assert len(g) == len(STREAMS) and all(isinstance(x, float) for x in g)
    assert raw(model) == before
    assert [p for p in model.parameters()] == objs  # same Parameter objects back in place
    assert all(p.grad is None for p in model.parameters())
    mezo = digits.build_model()
    mezo_inplace(mezo, lambda m: digits.loss(m, batch), STREAMS, 1e-3)
    assert raw(mezo) != before  # the in-place round trip drifts


def test_zo_modes_and_cache_paths_agree_bit_for_bit(
    digits: DigitsTask, batch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = digits.build_model()
    lf = lambda m: digits.loss(m, batch)  # noqa: E731
    a = zo_spsa(model, lf, STREAMS, 1e-3)
    b = zo_spsa(model, lf, STREAMS, 1e-3, mode="functional")
    monkeypatch.setattr(estimators, "_Z_CACHE_ELEMS", 0)  # per-module generation (big models)
    c = zo_spsa(model, lf, STREAMS, 1e-3)
    d = zo_spsa(model, lf, STREAMS, 1e-3, mode="functional")
    assert a == b == c == d
    assert zo_spsa(model, lf, STREAMS[:3], 1e-3) == a[:3]  # each direction is independent


def test_zo_matches_mezo_values_and_first_order(digits: DigitsTask, batch: Any) -> None:
    """Same numbers as an explicit perturbed copy; close to the exact projection <grad, z>."""
    model = digits.build_model()
    lf = lambda m: digits.loss(m, batch)  # noqa: E731
    g = zo_spsa(model, lf, STREAMS, 1e-3)
    ref = []
    for s in STREAMS[:4]:
        losses = []
        for c in (1e-3, -1e-3):
            m2 = digits.build_model()
            off = 0
            with torch.no_grad():
                for p in m2.parameters():
                    z = fill_normal(s, off, p.numel()).view(p.shape)
                    p.copy_(z * c + p)
                    off += p.numel()
                losses.append(float(lf(m2)))
        ref.append((losses[0] - losses[1]) / 2e-3)
    assert g[:4] == ref
    fo = fo_project(model, lambda m, t: digits.loss(m, batch), STREAMS)
    assert np.corrcoef(g, fo)[0, 1] > 0.99


class Quadratic(nn.Module):
    """L(theta) = 1/2 theta^T A theta + b^T theta; grad = A theta + b."""

    A: torch.Tensor
    b: torch.Tensor

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / d + torch.eye(d, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=gen, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(d, generator=gen, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def grad(self) -> torch.Tensor:
        return (self.A @ self.theta + self.b).detach()


def test_unbiased_on_a_quadratic() -> None:
    d, k = 8, 3000
    q = Quadratic(d)
    streams = [stream_seed(7, i) for i in range(k)]
    zs = torch.stack([fill_normal(s, 0, d).to(torch.float64) for s in streams])
    true = q.grad()
    for g in (
        zo_spsa(q, lambda m: m(), streams, 1e-2),
        fo_project(q, lambda m, t: m(), streams),
    ):
        est = (torch.tensor(g, dtype=torch.float64)[:, None] * zs).mean(dim=0)
        rel = float((est - true).norm() / true.norm())
        assert rel < 0.15, rel  # ~ sqrt((d + 1) / K) = 0.055 expected
    # On a quadratic the central difference is exact: every g_k is <grad, z_k> up to rounding.
    zo = zo_spsa(q, lambda m: m(), streams[:50], 1e-2)
    exact = project([true], streams[:50])
    assert np.allclose(zo, exact, rtol=1e-6, atol=1e-9)


def test_fo_steps_and_original_untouched(digits: DigitsTask) -> None:
    model = digits.build_model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # must survive untouched
    before = raw(model)
    rng = np.random.default_rng(1)
    shard = digits.shard(1, 8)
    batches = [digits.batch(shard, rng, 16) for _ in range(3)]
    lf = lambda m, t: digits.loss(m, batches[t])  # noqa: E731
    g1 = fo_project(model, lf, STREAMS, steps=1, lr=0.5)
    g3 = fo_project(model, lf, STREAMS, steps=3, lr=0.5)
    assert raw(model) == before
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters() if p.grad is not None)
    # steps=1: exactly the projection of the gradient on batch 0.
    loss = digits.loss(model, batches[0])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert np.allclose(g1, project(grads, STREAMS), rtol=1e-5, atol=1e-7)
    # steps=3: the projection of (theta_0 - theta_3) / (lr * steps) of explicit SGD.
    ref = digits.build_model()
    for t in range(3):
        gs = torch.autograd.grad(digits.loss(ref, batches[t]), list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), gs, strict=True):
                p.sub_(0.5 * g)
    delta = [
        (p0.detach().double() - p3.detach().double()) / 1.5
        for p0, p3 in zip(model.parameters(), ref.parameters(), strict=True)
    ]
    assert np.allclose(g3, project(delta, STREAMS), rtol=1e-3, atol=1e-4)
    assert not np.allclose(g1, g3)


def test_fo_on_frozen_params_and_under_no_grad(digits: DigitsTask, batch: Any) -> None:
    model = digits.build_model().requires_grad_(False)
    with torch.no_grad():
        g = fo_project(model, lambda m, t: digits.loss(m, batch), STREAMS[:2])
    assert len(g) == 2 and all(np.isfinite(g))
    with pytest.raises(ValueError, match="no_grad"):

        def detached(m: nn.Module, t: int) -> torch.Tensor:
            with torch.no_grad():
                return digits.loss(m, batch)

        fo_project(model, detached, STREAMS[:1])


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def test_buffers_restored_exactly() -> None:
    torch.manual_seed(0)
    m = WithBatchNorm().train()
    x = torch.randn(8, 4)
    before = raw(m)
    zo_spsa(m, lambda mm: mm(x).square().mean(), STREAMS[:3], 1e-2)
    assert raw(m) == before
    fo_project(m, lambda mm, t: mm(x).square().mean(), STREAMS[:3], steps=2)
    assert raw(m) == before
    assert m.training


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight  # one Parameter owned by two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_tied_parameters_counted_once_and_consistent() -> None:
    torch.manual_seed(1)
    m = Tied()
    assert len(list(m.parameters())) == 2
    x = torch.randn(6, 5)
    lf = lambda mm: mm(x).square().mean()  # noqa: E731
    before = raw(m)
    a = zo_spsa(m, lf, STREAMS[:4], 1e-3)
    b = zo_spsa(m, lf, STREAMS[:4], 1e-3, mode="functional")
    assert a == b
    assert raw(m) == before
    fo = fo_project(m, lambda mm, t: lf(mm), STREAMS[:4])
    assert np.allclose(a, fo, rtol=2e-2, atol=2e-3)


class UsesChildWeightDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.emb.weight)  # the child's forward is never called


def test_parameters_used_outside_their_module_are_detected() -> None:
    torch.manual_seed(2)
    m = UsesChildWeightDirectly()
    x = torch.randn(4, 3)
    lf = lambda mm: mm(x).square().mean()  # noqa: E731
    before = raw(m)
    with pytest.raises(ValueError, match="functional"):
        zo_spsa(m, lf, STREAMS[:2], 1e-3)
    assert raw(m) == before
    g = zo_spsa(m, lf, STREAMS[:2], 1e-3, mode="functional")
    assert np.allclose(g, fo_project(m, lambda mm, t: lf(mm), STREAMS[:2]), rtol=1e-2, atol=1e-3)


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if y.sum() > -1e9:
            raise RuntimeError("boom")
        return y


def test_exception_in_forward_restores_everything() -> None:
    m = Boom()
    before = raw(m)
    objs = list(m.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        zo_spsa(m, lambda mm: mm(torch.ones(1, 2)).sum(), STREAMS[:2], 1e-3)
    assert raw(m) == before and list(m.parameters()) == objs
    assert m.lin._parameters["weight"] is objs[0]
    assert not m.lin._forward_hooks and not m.lin._forward_pre_hooks


def test_bad_arguments(digits: DigitsTask, batch: Any) -> None:
    model = digits.build_model()
    lf = lambda m: digits.loss(m, batch)  # noqa: E731
    for eps in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            zo_spsa(model, lf, STREAMS, eps)
    with pytest.raises(ValueError, match="no parameters"):
        zo_spsa(nn.ReLU(), lambda m: torch.tensor(0.0), STREAMS, 1e-3)
    with pytest.raises(ValueError, match="no parameters"):
        fo_project(nn.ReLU(), lambda m, t: torch.tensor(0.0), STREAMS)
    with pytest.raises(ValueError, match="streams"):
        zo_spsa(model, lf, [-1], 1e-3)
    with pytest.raises(ValueError, match="mode"):
        zo_spsa(model, lf, STREAMS, 1e-3, mode=cast(Any, "inplace"))
    with pytest.raises(ValueError, match="steps"):
        fo_project(model, lambda m, t: lf(m), STREAMS, steps=0)
    with pytest.raises(ValueError, match="lr"):
        fo_project(model, lambda m, t: lf(m), STREAMS, lr=0.0)
    with pytest.raises(ValueError, match="scalar"):
        zo_spsa(model, lambda m: m(batch[0]), STREAMS, 1e-3)
    assert zo_spsa(model, lf, [], 1e-3) == []
    assert fo_project(model, lambda m, t: lf(m), []) == []


def test_nan_loss_gives_nan_not_garbage(digits: DigitsTask, batch: Any) -> None:
    model = digits.build_model()
    g = zo_spsa(model, lambda m: digits.loss(m, batch) * float("nan"), STREAMS[:2], 1e-3)
    assert all(np.isnan(g))
