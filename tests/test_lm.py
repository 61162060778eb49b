"""The ``lm`` task (node/learn/lm.py, gpt.py, lmdata.py): data, model, pretraining cache, metric,
and a small end-to-end simulation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seedswarm.node.learn import lm, lmdata
from seedswarm.node.learn.gpt import GPTConfig, gpt_param_count
from seedswarm.node.learn.replay import model_digest
from seedswarm.node.learn.tasks import Task, TaskError, load_task, param_count, task_metric

TINY: dict[str, Any] = {"layers": 1, "width": 32, "heads": 2, "context": 32, "pretrain_steps": 0,
                        "code_bytes": 100_000, "eval_windows": 16}


pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def digest(model: torch.nn.Module) -> bytes:
    return model_digest(list(model.parameters()))


def test_task_shape_determinism_and_metric() -> None:
    task = load_task("lm", TINY, seed=3)
    assert isinstance(task, Task) and task.name == "lm"
    m = task.build_model()
    cfg = GPTConfig(layers=1, width=32, heads=2, context=32)
    assert param_count(m) == gpt_param_count(cfg) == sum(p.numel() for p in m.parameters())
    assert m.head.weight is m.tok.weight  # type: ignore[union-attr]  # tied, counted once
    assert gpt_param_count(GPTConfig()) == 842_496  # the default model (docs/lm.md)
    state = torch.random.get_rng_state()
    assert digest(load_task("lm", TINY, seed=3).build_model()) == digest(m)  # another node
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves torch's RNG alone
    assert digest(load_task("lm", TINY, seed=4).build_model()) != digest(m)
    metric = task_metric(task)
    assert (metric.key, metric.higher_is_better) == ("loss", False)
    assert metric.reached(1.5, 1.9) and not metric.reached(2.0, 1.9)
    ev = task.evaluate(m)
    assert set(ev) >= {"loss", "accuracy", "perplexity", "bits_per_byte"}
    assert ev["loss"] == pytest.approx(np.log(256), abs=0.1)  # N(0, 0.02) init: near uniform
    assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"]))
    assert task.evaluate(m) == ev  # a fixed validation set


def test_data_split_by_file_and_disjoint_seeded_shards() -> None:
    train, val = lmdata.code(0, 100_000, 0.1)
    assert val.files and train.files and not set(train.files) & set(val.files)
    assert all(not f.startswith(("test/", "site-packages/")) for f in train.files + val.files)
    assert lmdata.code(0, 100_000, 0.1)[0].digest == train.digest
    assert lmdata.code(1, 100_000, 0.1)[0].files != train.files  # the selection is seeded
    assert len(lmdata.prose()) > 100_000
    task = load_task("lm", TINY, seed=0)
    count = task.num_train // 16  # at least min_shard windows each: an exact partition
    shards = [task.shard(i, count) for i in range(count)]
    flat = np.concatenate([s.indices for s in shards])
    assert len(flat) == len(np.unique(flat)) == task.num_train
    assert np.array_equal(task.shard(2, count).indices, shards[2].indices)
    other = load_task("lm", TINY, seed=1)
    assert not np.array_equal(other.shard(0, count).indices, shards[0].indices)
    x, y = task.batch(shards[0], np.random.default_rng(5), 8)
    x2, _ = task.batch(shards[0], np.random.default_rng(5), 8)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64 and torch.equal(x, x2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte
    loss = task.loss(task.build_model(), (x, y))
    assert loss.requires_grad and torch.isfinite(loss)


def test_bad_options_are_task_errors() -> None:
    for opts in ({"width": 30, "heads": 4}, {"layers": 0}, {"layres": 2}, {"pretrain_lr": -1.0},
                 {"cache": "yes"}, {"val_fraction": 1.5}):
        with pytest.raises(TaskError, match="lm"):
            load_task("lm", {**TINY, **opts})


def test_pretraining_is_deterministic_and_cached(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = {**TINY, "pretrain_steps": 3}
    task = load_task("lm", opts, seed=0)
    first = digest(task.build_model())
    assert first != digest(load_task("lm", TINY, seed=0).build_model())  # it trained
    files = list(private_cache.glob("lm-pretrain-*.pt"))
    assert len(files) == 1
    lm.pretrained.cache_clear()

    def no_training(*a: Any) -> Any:
        raise AssertionError("pretrained again despite the cache")

    monkeypatch.setattr(lm, "_pretrain", no_training)
    assert digest(task.build_model()) == first  # from the file
    monkeypatch.undo()
    monkeypatch.setenv("SEEDSWARM_CACHE", str(private_cache))
    files[0].write_bytes(b"torn")  # an unreadable file is recomputed, with the same bits
    lm.pretrained.cache_clear()
    assert digest(task.build_model()) == first
    lm.pretrained.cache_clear()
    no_cache = load_task("lm", {**opts, "cache": False, "pretrain_lr": 0.002}, seed=0)
    no_cache.build_model()
    assert len(list(private_cache.glob("lm-pretrain-*.pt"))) == 1  # cache=false wrote nothing


def test_sim_lm_end_to_end(tmp_path: Path) -> None:
    from seedswarm.sim.runner import SimConfig, run

    cfg = SimConfig(nodes=6, rounds=25, task="lm", task_options=dict(TINY), trainers=4, batch_size=8,
                    lr=0.05, eval_every=5, out=str(tmp_path / "run"), quiet=True)
    s = run(cfg)
    assert s["honest_digest_agreement"] == 1.0
    assert (s["metric"], s["higher_is_better"], s["target"]) == ("loss", False, 2.4)
    assert s["final_metric"] == s["final_loss"] < s["initial_metric"] - 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "loss" in r]
    assert evals and all("perplexity" in r for r in evals)
    for name in ("loss_vs_round.png", "loss_vs_bytes.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    # A loss target is reached at the first evaluation at or below it.
    cfg2 = SimConfig(**{**cfg.__dict__, "out": None, "target": evals[1]["loss"], "stop_at_target": True})
    s2 = run(cfg2)
    assert s2["rounds_to_target"] == evals[1]["round"] and s2["bytes_to_target"] == evals[1]["bytes_total"]


def test_task_check_passes_and_names_the_loss_metric() -> None:
    from seedswarm.node.taskcheck import OK, check_task

    checks = list(check_task("lm", TINY, 0, batch_size=8, directions=8))
    assert [c.status for c in checks] == [OK] * len(checks) and len(checks) == 8
    ev = next(c for c in checks if c.name == "evaluate")
    assert "compared with loss (lower is better" in ev.detail


def test_a_diverged_model_evaluates_to_an_infinite_perplexity_not_an_error() -> None:
    task = load_task("lm", TINY, seed=0)
    model = task.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e4)  # logits in the millions: a loss far past exp's range
    ev = task.evaluate(model)
    assert ev["loss"] > 709 and ev["perplexity"] == math.inf
