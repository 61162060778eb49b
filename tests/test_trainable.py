"""Trainable subsets and LoRA (node/learn/trainable.py): what is trained, what stays frozen, and
that directions, estimators, replay and checkpoints cover exactly the trainable parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seedswarm.crypto.directions import fill_normal
from seedswarm.crypto.hashing import stream_seed
from seedswarm.crypto.projection import add_directions_, project
from seedswarm.node.learn.checkpoint import decode_params, encode_params
from seedswarm.node.learn.estimators import fo_project, zo_spsa
from seedswarm.node.learn.replay import ModelStates, model_digest
from seedswarm.node.learn.tasks import TaskError, load_task, param_count
from seedswarm.node.learn.trainable import LoRA, SubsetTask, trainable_summary

TINY: dict[str, Any] = {"layers": 2, "width": 32, "heads": 2, "context": 32, "pretrain_steps": 0,
                        "code_bytes": 100_000, "eval_windows": 16}


pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_name_patterns_select_the_trainable_parameters() -> None:
    full = load_task("lm", TINY).build_model()
    names = dict(full.named_parameters())
    task = load_task("lm", {**TINY, "trainable": "blocks.1.*, norm.*"})
    assert isinstance(task, SubsetTask) and task.name == "lm" and task.metric == "loss"
    m = task.build_model()
    want = [n for n in names if n.startswith(("blocks.1.", "norm."))]
    assert [n for n, _ in m.named_parameters()] == want
    assert param_count(m) == sum(names[n].numel() for n in want) == 12_768
    s = trainable_summary(m)
    assert s["trainable"] + s["frozen"] == param_count(full) == 34_688
    assert not any(b.requires_grad for b in m.buffers())
    assert set(m.state_dict()) == set(full.state_dict())  # frozen weights are still in the state
    assert all(torch.equal(m.state_dict()[k], v) for k, v in full.state_dict().items())
    # a tied parameter follows any of its names (the head is the token embedding)
    tied = load_task("lm", {**TINY, "trainable": ["head.weight"]}).build_model()
    assert [n for n, _ in tied.named_parameters()] == ["tok.weight"]
    assert tied.head.weight is tied.tok.weight  # type: ignore[union-attr]
    # the genesis commits to the trainable parameters only
    assert model_digest(list(m.parameters())) == model_digest([names[n] for n in want])


def test_directions_estimators_and_replay_cover_only_the_trainable_parameters() -> None:
    task = load_task("lm", {**TINY, "trainable": "blocks.0.attn.*,norm.*"})
    m = task.build_model()
    params = [p.detach() for p in m.parameters()]
    n = sum(p.numel() for p in params)
    before = full_state(m)
    # one direction with coefficient 1 from zero moves the flat trainable vector by exactly z
    zeros = [torch.zeros_like(p) for p in params]
    s = stream_seed(0x5EED, 3)
    add_directions_(zeros, [s], [1.0])
    assert torch.equal(torch.cat([z.reshape(-1) for z in zeros]), fill_normal(s, 0, n))
    # the estimators: K values, nothing written, fo = <grad of the trainable parameters, z_k>
    shard = task.shard(0, 4)
    batch = task.batch(shard, np.random.default_rng(0), 4)
    streams = [stream_seed(7, k) for k in range(8)]
    g = fo_project(m, lambda mod, t: task.loss(mod, batch), streams)
    grads = torch.autograd.grad(task.loss(m, batch), list(m.parameters()))
    assert g == pytest.approx(project(list(grads), streams), rel=1e-6, abs=1e-9)
    zm = zo_spsa(m, lambda mod: task.loss(mod, batch), streams, 1e-3, mode="module")
    zf = zo_spsa(m, lambda mod: task.loss(mod, batch), streams, 1e-3, mode="functional")
    assert zm == zf and np.corrcoef(zm, g)[0, 1] > 0.999
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # a record's update moves only the trainable tensors, and two replays agree bit for bit
    coeffs = [0.01 * (k + 1) for k in range(8)]
    out = []
    for _ in range(2):
        other = load_task("lm", {**TINY, "trainable": "blocks.0.attn.*,norm.*"}).build_model()
        ps = [p.detach() for p in other.parameters()]
        add_directions_(ps, streams, coeffs)
        out.append(full_state(other))
    trainable = {k for k, _ in m.named_parameters()}
    for k, v in out[0].items():
        assert torch.equal(v, out[1][k])
        assert torch.equal(v, before[k]) == (k not in trainable), k
    # a checkpoint holds the trainable tensors only
    blob = encode_params(3, b"h" * 32, params)
    assert len(decode_params(blob, params)[2]) == len(params) == 6


def test_lora_adapters_start_at_the_base_model_and_alone_are_trained() -> None:
    base_task = load_task("lm", TINY)
    base = base_task.build_model()
    task = load_task("lm", {**TINY, "lora": 4})
    m = task.build_model()
    adapted = [n for n, mod in m.named_modules() if isinstance(mod, LoRA)]
    assert adapted == [f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "fc", "out")]
    # rank 4: r * (in + out) per layer: qkv 32->96, proj 32->32, fc 32->128, out 128->32
    assert param_count(m) == trainable_summary(m)["trainable"] == 2 * 4 * (128 + 64 + 160 + 160) == 4096
    assert all(n.endswith(("lora_A", "lora_B")) for n, _ in m.named_parameters())
    x, _ = task.batch(task.shard(0, 2), np.random.default_rng(1), 4)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))  # B = 0: exactly the base model
    assert task.evaluate(m) == base_task.evaluate(base)
    again = load_task("lm", {**TINY, "lora": 4}).build_model()
    assert model_digest(list(again.parameters())) == model_digest(list(m.parameters()))  # seeded A
    other_seed = load_task("lm", {**TINY, "lora": 4}, seed=1).build_model()
    assert model_digest(list(other_seed.parameters())) != model_digest(list(m.parameters()))
    # an update moves the adapters only, and then the output
    before = full_state(m)
    add_directions_([p.detach() for p in m.parameters()], [stream_seed(1, 0)], [0.1])
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {n for n, _ in m.named_parameters()}
    with torch.no_grad():
        assert not torch.equal(m(x), base(x))
    # targets, alpha and an extra trainable norm
    t2 = load_task("lm", {**TINY, "lora": 2, "lora_targets": "*.attn.*", "lora_alpha": 8, "trainable": "norm.*"})
    m2 = t2.build_model()
    assert trainable_summary(m2) == {"trainable": 2 * 2 * (128 + 64) + 64, "frozen": 34_688 - 64, "lora_layers": 4}
    assert m2.blocks[0].attn.qkv.scale == 4.0  # type: ignore[index,union-attr]


def test_lora_zo_modes_agree_and_fo_matches_autograd() -> None:
    task = load_task("lm", {**TINY, "lora": 2, "trainable": "norm.*"})
    m = task.build_model()
    add_directions_([p.detach() for p in m.parameters()], [stream_seed(2, 0)], [0.5])  # B != 0
    batch = task.batch(task.shard(0, 2), np.random.default_rng(2), 4)
    streams = [stream_seed(9, k) for k in range(8)]
    g = fo_project(m, lambda mod, t: task.loss(mod, batch), streams)
    zm = zo_spsa(m, lambda mod: task.loss(mod, batch), streams, 1e-4, mode="module")
    assert zm == zo_spsa(m, lambda mod: task.loss(mod, batch), streams, 1e-4, mode="functional")
    assert np.corrcoef(zm, g)[0, 1] > 0.999


def test_bad_subset_options_are_task_errors() -> None:
    for opts, msg in (({"trainable": "nothing.*"}, "matches no parameter"),
                      ({"trainable": ""}, "names no pattern"),
                      ({"trainable": 3}, "name patterns"),
                      ({"lora": -1}, "rank"), ({"lora": "4"}, "rank"), ({"lora": True}, "rank"),
                      ({"lora_targets": "*.fc"}, "need 'lora'"),
                      ({"lora": 2, "lora_targets": "*.nope"}, "matches no linear layer"),
                      ({"lora": 2, "lora_alpha": 0}, "lora_alpha")):
        with pytest.raises(TaskError, match=msg):
            load_task("lm", {**TINY, **opts}).build_model()


def test_sim_with_a_trainable_subset_replays_bit_exactly(tmp_path: Path) -> None:
    from seedswarm.sim.runner import SimConfig, build

    opts = {**TINY, "trainable": "blocks.1.*,norm.*"}
    cfg = SimConfig(nodes=4, rounds=4, task="lm", task_options=opts, trainers=3, batch_size=4, lr=0.05,
                    directions=16, eval_every=2, quiet=True)
    sim = build(cfg)
    sim.start()
    sim.run(cfg.rounds)
    sim.settle(grace=5 * sim.genesis.round_timeout + 4 * sim.core_config.sync_after)
    agreement, _ = sim.digest_agreement()
    assert agreement == 1.0
    head = max((n.core.head for n in sim.nodes), key=lambda st: st.round)
    assert head.round >= 3
    steps = []
    st = head
    while st.round > 0:
        parent, rec = sim.index.by_head[st.head]
        steps.append((parent, rec))
        st = parent
    steps.reverse()
    final = sim.states.get(head.head)
    assert final is not None
    genesis = load_task("lm", opts).build_model()
    init = full_state(genesis)
    root = steps[0][0]
    for _ in range(2):  # two nodes replaying the records from their own genesis model
        other = load_task("lm", opts).build_model()
        got = ModelStates(root, list(other.parameters())).advance(root, steps)
        assert all(torch.equal(a, b) for a, b in zip(got, final, strict=True))
    trainable = {n for n, _ in genesis.named_parameters()}
    from seedswarm.node.learn.replay import bind_

    moved = full_state(bind_(genesis, final))
    for k, v in moved.items():
        assert torch.equal(v, init[k]) == (k not in trainable), k


def test_task_check_reports_the_trainable_split() -> None:
    from seedswarm.node.taskcheck import OK, check_task

    checks = list(check_task("lm", {**TINY, "lora": 2}, 0, batch_size=4, directions=4))
    assert [c.status for c in checks] == [OK] * len(checks) == [OK] * 8
    assert "LMTask (a trainable subset)" in checks[0].detail
    assert checks[1].detail.startswith("2,048 trainable float32 parameters (34,688 frozen, LoRA on 8 layers)")
