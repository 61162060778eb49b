"""Replayed momentum (node/learn/momentum.py): the option, the exact step, replay that is the same
bits however the vector is split, and a simulated swarm whose joiners install the buffers with
the checkpoint."""

from __future__ import annotations

import pytest
import torch

from seedswarm.node.core.chain import ChainState, next_state
from seedswarm.node.learn.momentum import (
    direction_momentum,
    replay_state,
    step_with_momentum_,
    with_buffers,
)
from seedswarm.node.learn.replay import apply_record_, bind_, model_digest
from seedswarm.node.learn.tasks import load_task
from seedswarm.node.learn.taskspec import TaskError
from tests.corenet import fresh_params, honest_records, make_genesis


@pytest.mark.parametrize("beta", [0.3, 0.9, 1.0, -0.5, True, "0.5", 1 - 2.0**-9])
def test_bad_momentum_is_one_clear_error(beta: object) -> None:
    with pytest.raises(TaskError, match="'momentum' must be 0 or 1 - 2\\*\\*-j"):
        load_task("digits", {"hidden": 16, "momentum": beta}, seed=0)


def test_the_option_reaches_the_model_and_the_replay_state() -> None:
    plain = load_task("digits", {"hidden": 16}, seed=0).build_model()
    model = load_task("digits", {"hidden": 16, "momentum": 0.75}, seed=0).build_model()
    assert direction_momentum(plain) == 0.0 and direction_momentum(model) == 0.75
    n = len(list(model.parameters()))
    state = replay_state(model)
    assert len(replay_state(plain)) == n and len(state) == 2 * n
    assert all(not t.any() for t in state[n:])  # the buffers start at zero
    assert bind_(plain, state) is plain  # a state binds its parameters, not its buffers
    assert all(p.data_ptr() == t.data_ptr() for p, t in zip(plain.parameters(), state[:n], strict=True))
    with pytest.raises(ValueError, match="tensors for a model of"):
        bind_(plain, state[: n + 1])


def test_the_step_is_the_definition_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    theta, m, delta = (torch.randn(1000, generator=g) for _ in range(3))
    state = [theta.clone(), m.clone()]
    step_with_momentum_(state, 0.75, lambda ts: ts[0].add_(delta))
    want_m = (m * 0.75) + delta  # two float32 roundings, in this order
    assert torch.equal(state[1], want_m)
    assert torch.equal(state[0], theta + want_m * 0.25)
    with pytest.raises(ValueError, match="power of two"):
        step_with_momentum_([theta.clone(), m.clone()], 0.7, lambda ts: None)


def test_a_constant_update_moves_theta_by_itself_per_round() -> None:
    """(1 - β) normalises the buffer: a steady update moves θ as far as without momentum."""
    theta, m = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    delta = torch.linspace(-1, 1, 10, dtype=torch.float64)
    state = [theta, m]
    for _ in range(80):
        before = state[0].clone()
        step_with_momentum_(state, 0.75, lambda ts: ts[0].add_(delta))
    assert torch.allclose(state[0] - before, delta, rtol=1e-9, atol=1e-12)


def _chain(n: int) -> list[tuple[ChainState, object]]:
    return honest_records(ChainState.initial(make_genesis()), n, seed=3)  # type: ignore[return-value]


def _replay(steps: list[tuple[ChainState, object]], beta: float, flat: bool = False) -> list[torch.Tensor]:
    ps = fresh_params()
    if flat:  # the same vector as one tensor: replay must not depend on how it is split
        ps = [torch.cat([p.reshape(-1) for p in ps])]
    state = with_buffers(ps, beta)
    for st, rec in steps:
        apply_record_(state, st, rec, None, beta)  # type: ignore[arg-type]
    return state


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_replay_with_momentum_is_exact_however_split_and_differs_from_plain() -> None:
    steps = _chain(6)
    split, flat = _replay(steps, 0.5), _replay(steps, 0.5, flat=True)
    n = len(split) // 2
    assert torch.equal(_flat(split[:n]), flat[0]) and torch.equal(_flat(split[n:]), flat[1])
    assert model_digest(_replay(steps, 0.5)) == model_digest(split)  # and again: the same bits
    plain = _replay(steps, 0.0)
    assert not torch.equal(_flat(plain), _flat(split[:n]))
    assert _flat(split[n:]).abs().sum() > 0


def test_a_zero_aggregate_still_moves_theta_by_the_buffer() -> None:
    from dataclasses import replace

    steps = _chain(3)
    state = _replay(steps, 0.5)
    st, rec = steps[-1]
    after = next_state(st, rec)
    zero = replace(rec, aggregate=b"\x00" * len(rec.aggregate))  # type: ignore[type-var]
    before = [t.clone() for t in state]
    apply_record_(state, after, zero, None, 0.5)  # type: ignore[arg-type]
    n = len(state) // 2
    for b, a in zip(before[n:], state[n:], strict=True):
        assert torch.equal(a, b * 0.5)  # the buffer decays...
    for b, bm, a in zip(before[:n], before[n:], state[:n], strict=True):
        assert torch.equal(a, b + (bm * 0.5) * 0.5)  # ...and θ keeps moving along it


def test_a_simulated_swarm_with_momentum_agrees_and_joiners_install_the_buffers() -> None:
    from seedswarm.sim.runner import SimConfig, run

    out = run(SimConfig(nodes=12, trainers=4, directions=16, rounds=40, eval_every=10, quiet=True, max_wall=300.0,
                        task_options={"hidden": 16, "momentum": 0.5}, seed=5, join_nodes=2, join_at=25,
                        checkpoint_every=10, checkpoint_chunk_bytes=2048))
    assert out["honest_digest_agreement"] == 1.0
    assert out["join_checkpoint_rounds"] == [20, 20] and out["final_members"] == 14
