"""Preconditioned directions (node/learn/precondition.py, the ``scale`` of add_directions_):
exact scaled replay, estimators that measure exactly the scaled directions, the task option,
and a simulated swarm that agrees on its model."""

from __future__ import annotations

import math

import pytest
import torch

from seedswarm.crypto import directions as gen
from seedswarm.crypto.directions import fill_normal
from seedswarm.crypto.projection import add_directions_, project
from seedswarm.node.learn.estimators import fo_project, zo_spsa
from seedswarm.node.learn.precondition import Precondition, compute_scale
from seedswarm.node.learn.replay import SCALE_ATTR, direction_scale, initial_digest
from seedswarm.node.learn.tasks import TaskError, load_task, param_count

STREAMS = [11, 2**63 + 5, 977]
COEFFS = [3.1e-3, -7.7e-4, 1.3e-2]


def _pow2(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.randint(-5, 6, shape, generator=g).to(torch.float32)).to(torch.bfloat16)


def _reference(p: torch.Tensor, s: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """p + fl(c z) * s, one direction after another, elementwise in float32."""
    out = p.clone().reshape(-1)
    for stream, c in zip(STREAMS, COEFFS, strict=True):
        z = fill_normal(stream, offset, out.numel())
        cz = z * torch.tensor(c, dtype=torch.float64).to(torch.float32)
        out = out + cz * s.reshape(-1).to(torch.float32)
    return out.view(p.shape)


@pytest.mark.parametrize("n", [1000, 300_000])  # the small path (one pass) and several chunks
def test_scaled_add_equals_the_elementwise_definition(n: int) -> None:
    assert n < gen._SMALL or n > 2 * gen._CPU_CHUNK
    p = torch.randn(n, generator=torch.Generator().manual_seed(1))
    s = _pow2((n,), 2)
    want = _reference(p, s)
    got = p.clone()
    add_directions_([got], STREAMS, COEFFS, [s])
    assert torch.equal(got, want)
    plain = p.clone()
    add_directions_([plain], STREAMS, COEFFS)
    assert not torch.equal(plain, got)  # the scale did something


def test_scaled_add_is_the_same_however_the_vector_is_split() -> None:
    n = 200_000
    p = torch.randn(n, generator=torch.Generator().manual_seed(3))
    s = _pow2((n,), 4)
    whole = p.clone()
    add_directions_([whole], STREAMS, COEFFS, [s])
    cuts = [0, 17, 70_000, 70_100, n]
    parts = [p[a:b].clone() for a, b in zip(cuts, cuts[1:], strict=False)]
    scales = [s[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    add_directions_(parts, STREAMS, COEFFS, scales)
    assert torch.equal(torch.cat(parts), whole)
    ones = p.clone()
    add_directions_([ones], STREAMS, COEFFS, [torch.ones(n, dtype=torch.bfloat16)])
    none = p.clone()
    add_directions_([none], STREAMS, COEFFS)
    assert torch.equal(ones, none)


def test_a_scale_of_the_wrong_size_is_refused() -> None:
    p = torch.zeros(10)
    with pytest.raises(ValueError, match="scale 0 has 9"):
        add_directions_([p], STREAMS, COEFFS, [torch.ones(9)])
    with pytest.raises(ValueError, match="2 scale tensors for 1"):
        add_directions_([p], STREAMS, COEFFS, [torch.ones(10), torch.ones(10)])
    assert torch.equal(p, torch.zeros(10))


def _scaled_digits() -> tuple[object, torch.nn.Module, object]:
    task = load_task("digits", {"hidden": 16, "precondition": 4}, seed=0)
    model = task.build_model()
    return task, model, task.batch(task.shard(0, 1), __import__("numpy").random.default_rng(0), 32)


def test_fo_projection_is_onto_the_scaled_directions() -> None:
    task, model, batch = _scaled_digits()
    scale = direction_scale(model)
    assert scale is not None
    params = list(model.parameters())
    grads = torch.autograd.grad(task.loss(model, batch), params)  # type: ignore[attr-defined]
    got = fo_project(model, lambda m, t: task.loss(m, batch), STREAMS)  # type: ignore[attr-defined]
    flat_g = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
    flat_s = torch.cat([s.reshape(-1) for s in scale]).to(torch.float64)
    for k, stream in enumerate(STREAMS):
        z = fill_normal(stream, 0, flat_g.numel()).to(torch.float64)
        assert math.isclose(got[k], float((flat_g * flat_s * z).sum()), rel_tol=1e-9, abs_tol=1e-12)
    assert got == project([g * s for g, s in zip(grads, scale, strict=True)], STREAMS)
    delattr(model, SCALE_ATTR)
    assert fo_project(model, lambda m, t: task.loss(m, batch), STREAMS) != got  # type: ignore[attr-defined]


def test_zo_estimates_along_the_scaled_directions_in_both_modes() -> None:
    task, model, batch = _scaled_digits()
    loss = lambda m: task.loss(m, batch)  # type: ignore[attr-defined]  # noqa: E731
    module = zo_spsa(model, loss, STREAMS, 1e-3, mode="module")
    functional = zo_spsa(model, loss, STREAMS, 1e-3, mode="functional")
    assert module == functional
    # the definition, by hand: L(p + eps * (s * z)) - L(p - eps * (s * z)) over 2 eps
    scale = direction_scale(model)
    assert scale is not None
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    x, y = batch  # type: ignore[misc]
    want = []
    for stream in STREAMS:
        losses = []
        for c in (1e-3, -1e-3):
            pert, off = {}, 0
            for n, p, sc in zip(names, params, scale, strict=True):
                z = fill_normal(stream, off, p.numel()).mul_(sc.reshape(-1))
                pert[n] = z.mul_(c).add_(p.detach().reshape(-1)).view(p.shape)
                off += p.numel()
            with torch.no_grad():
                out = torch.func.functional_call(model, pert, (x,))
            losses.append(float(torch.nn.functional.cross_entropy(out, y).to(torch.float64)))
        want.append((losses[0] - losses[1]) / 2e-3)
    assert module == want
    delattr(model, SCALE_ATTR)
    assert zo_spsa(model, loss, STREAMS, 1e-3, mode="module") != want


def test_the_task_option_gives_a_deterministic_power_of_two_scale() -> None:
    task = load_task("digits", {"hidden": 16, "precondition": 4}, seed=0)
    model = task.build_model()
    scale = direction_scale(model)
    assert scale is not None and len(scale) == len(list(model.parameters()))
    for s, p in zip(scale, model.parameters(), strict=True):
        assert s.dtype == torch.bfloat16 and s.shape == p.shape
        e = torch.log2(s.to(torch.float64))
        assert torch.equal(e, e.round())  # powers of two: products by them are exact
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scale])
    assert 0.5 <= float((flat**2).mean()) <= 2.0  # D normalised to mean 1, up to the rounding
    assert float(flat.max()) / float(flat.min()) >= 4  # and it does scale coordinates differently
    again = direction_scale(load_task("digits", {"hidden": 16, "precondition": 4}, seed=0).build_model())
    assert again is not None and all(torch.equal(a, b) for a, b in zip(scale, again, strict=True))
    plain = load_task("digits", {"hidden": 16}, seed=0).build_model()
    assert direction_scale(plain) is None
    assert initial_digest(plain) != initial_digest(model)  # the genesis commits to the scale


def test_the_cap_bounds_the_scale_and_leaves_the_rest_alone() -> None:
    opts = {"hidden": 16, "precondition": 4}
    free = direction_scale(load_task("digits", opts, seed=0).build_model())
    capped = direction_scale(load_task("digits", {**opts, "precondition_cap": 1}, seed=0).build_model())
    assert free is not None and capped is not None
    f = torch.cat([s.reshape(-1).float() for s in free])
    c = torch.cat([s.reshape(-1).float() for s in capped])
    assert float(f.max()) > 1.0  # so the cap has something to do
    assert torch.equal(c, f.clamp(max=1.0))  # the largest scales cut to the cap, every other one kept


def test_the_scale_covers_exactly_the_trainable_parameters() -> None:
    task = load_task("digits", {"hidden": 16, "lora": 2, "precondition": 2}, seed=0)
    model = task.build_model()
    scale = direction_scale(model)
    assert scale is not None
    assert [s.shape for s in scale] == [p.shape for p in model.parameters()]
    assert sum(s.numel() for s in scale) == param_count(model)


def test_no_signal_means_no_scale() -> None:
    task = load_task("digits", {"hidden": 16}, seed=0)
    model = task.build_model()

    class Flat:
        def shard(self, i: int, n: int) -> object:
            return task.shard(i, n)

        def batch(self, shard: object, rng: object, size: int) -> object:
            return task.batch(shard, rng, size)  # type: ignore[arg-type]

        def loss(self, m: torch.nn.Module, b: object) -> torch.Tensor:
            return sum(p.sum() for p in m.parameters()) * 0.0  # type: ignore[return-value]

    scale = compute_scale(Flat(), model, Precondition(2), seed=0)
    assert all(torch.equal(s, torch.ones_like(s)) for s in scale)


@pytest.mark.parametrize("opts, match", [
    ({"precondition": -1}, "number of batches"),
    ({"precondition": True}, "number of batches"),
    ({"precondition": "8"}, "number of batches"),
    ({"precondition_batch": 8}, "need 'precondition'"),
    ({"precondition": 2, "precondition_power": 3}, "in \\[-2, 2\\]"),
    ({"precondition": 2, "precondition_batch": 0}, "positive integer"),
    ({"precondition": 2, "precondition_floor": 0}, "positive number"),
    ({"precondition": 2, "precondition_floor": float("nan")}, "positive number"),
    ({"precondition": 2, "precondition_cap": 3}, "power of two"),
    ({"precondition": 2, "precondition_cap": 0.5}, "power of two"),
    ({"precondition": 2, "precondition_cap": 0}, "power of two"),
    ({"precondition": 2, "precondition_cap": True}, "power of two"),
    ({"precondition": 2, "precondition_cap": "2"}, "power of two"),
    ({"precondition": 2, "precondition_cap": 2.0**17}, "power of two"),
    ({"precondition_cap": 2}, "need 'precondition'"),
])
def test_bad_precondition_options_are_one_clear_error(opts: dict[str, object], match: str) -> None:
    with pytest.raises(TaskError, match=match):
        load_task("digits", {"hidden": 16, **opts}, seed=0)


def test_a_preconditioned_simulated_swarm_agrees_and_learns() -> None:
    from seedswarm.sim.runner import SimConfig, run

    out = run(SimConfig(nodes=12, trainers=4, directions=16, rounds=12, eval_every=6, quiet=True,
                        max_wall=120.0, task_options={"hidden": 16, "precondition": 4}, seed=5))
    assert out["honest_digest_agreement"] == 1.0
    curve = [m for _, m in out["curve"]] if "curve" in out else None
    if curve:
        assert curve[-1] >= curve[0]
