"""Tasks (node/learn/tasks.py): the digits task, sharding, determinism, and load_task."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from seedswarm.node.learn import tasks
from seedswarm.node.learn.tasks import (
    BaseTask,
    DigitsTask,
    Task,
    TaskError,
    digits_param_count,
    load_task,
    param_count,
)


def raw(model: torch.nn.Module) -> list[bytes]:
    return [p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for p in model.parameters()]


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask(seed=0)


def test_digits_shapes_split_and_params(task: DigitsTask) -> None:
    assert isinstance(task, Task) and task.name == "digits"
    assert task.num_train + task.x_test.shape[0] == 1797
    assert task.x_test.shape[0] == 359  # 20% of each class, rounded
    assert float(task.x_train.min()) >= 0.0 and float(task.x_train.max()) <= 1.0
    assert task.x_train.dtype == torch.float32 and task.y_train.dtype == torch.int64
    # stratified: every class is 20% +- 1 sample of the test split
    assert np.all(np.abs(np.bincount(task.y_test.numpy()) - 36) <= 1)
    model = task.build_model()
    assert param_count(model) == digits_param_count() == 2410
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert digits_param_count(4000) == 300_010
    assert digits_param_count(13334) == 1_000_060
    assert digits_param_count(1000, 2) == 1_076_010
    wide = DigitsTask({"hidden": 64, "layers": 3})
    assert param_count(wide.build_model()) == digits_param_count(64, 3)


def test_build_model_deterministic_and_free_of_global_rng(task: DigitsTask) -> None:
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = task.build_model()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    torch.manual_seed(99)
    b = DigitsTask(seed=0).build_model()
    assert raw(a) == raw(b)
    assert raw(DigitsTask(seed=1).build_model()) != raw(a)
    assert a is not b and all(p is not q for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_iid_shards_partition_and_scale(task: DigitsTask) -> None:
    n = task.num_train
    shards = [task.shard(i, 10) for i in range(10)]
    allidx = np.concatenate([s.indices for s in shards])
    assert sorted(allidx.tolist()) == list(range(n))  # an exact partition
    assert task.shard(3, 10).indices.tolist() == shards[3].indices.tolist()  # deterministic
    assert not shards[0].indices.flags.writeable
    t0 = time.perf_counter()
    big = [task.shard(i, 10_000) for i in range(10_000)]
    assert time.perf_counter() - t0 < 2.0
    assert all(len(s) == task.min_shard for s in big)
    covered = np.unique(np.concatenate([s.indices for s in big]))
    assert covered.shape[0] == n  # overlapping windows still cover every sample
    for bad in ((10, 10), (-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            task.shard(*bad)


def test_dirichlet_label_skew() -> None:
    skewed = DigitsTask({"partition": "dirichlet", "alpha": 0.05, "min_shard": 16})
    flat = DigitsTask({"partition": "dirichlet", "alpha": 1000.0, "min_shard": 16})

    def top_share(t: DigitsTask) -> float:
        shares = []
        for i in range(20):
            y = t.y_train.numpy()[t.shard(i, 20).indices]
            shares.append(np.bincount(y, minlength=10).max() / len(y))
        return float(np.mean(shares))

    assert top_share(skewed) > 0.7
    assert top_share(flat) < 0.3
    s = skewed.shard(5, 20)
    assert len(s) == skewed.num_train * 6 // 20 - skewed.num_train * 5 // 20
    assert s.indices.tolist() == skewed.shard(5, 20).indices.tolist()
    t0 = time.perf_counter()
    assert all(len(skewed.shard(i, 10_000)) == 16 for i in range(0, 10_000, 7))
    assert time.perf_counter() - t0 < 2.0


def test_batch_loss_evaluate(task: DigitsTask) -> None:
    shard = task.shard(2, 10)
    x, y = task.batch(shard, np.random.default_rng(5), 32)
    assert x.shape == (32, 64) and y.shape == (32,)
    x2, y2 = task.batch(shard, np.random.default_rng(5), 32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xa, _ = task.batch(shard, np.random.default_rng(5), 10_000)
    assert xa.shape[0] == len(shard)  # capped at the shard
    rows = {tuple(r) for r in task.x_train[torch.from_numpy(shard.indices.copy())].tolist()}
    assert all(tuple(r) in rows for r in x.tolist())
    model = task.build_model()
    before = raw(model)
    loss = task.loss(model, (x, y))
    assert loss.dim() == 0 and loss.requires_grad
    metrics = task.evaluate(model)
    assert set(metrics) >= {"accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 0.3 and abs(metrics["loss"] - np.log(10)) < 0.5
    assert raw(model) == before and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        task.batch(shard, np.random.default_rng(0), 0)


def test_pretrained_model() -> None:
    t = DigitsTask({"pretrain": True})
    m = t.build_model()
    metrics = t.evaluate(m)
    assert 0.44 <= metrics["accuracy"] <= 0.52, metrics
    with torch.no_grad():
        pred = m(t.x_test).argmax(1)
    seen = t.y_test < 5
    assert float((pred[seen] == t.y_test[seen]).float().mean()) > 0.95
    assert raw(t.build_model()) == raw(m)
    assert raw(DigitsTask({"pretrain": True}).build_model()) == raw(m)
    assert raw(DigitsTask().build_model()) != raw(m)


def test_pretraining_independent_of_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        tasks._digits_pretrained.cache_clear()
        torch.set_num_threads(2)
        a = raw(DigitsTask({"pretrain": True, "hidden": 48}).build_model())
        tasks._digits_pretrained.cache_clear()
        torch.set_num_threads(1)
        b = raw(DigitsTask({"pretrain": True, "hidden": 48}).build_model())
    finally:
        torch.set_num_threads(threads)
    assert a == b
    assert torch.get_num_threads() == threads


def test_digits_option_errors() -> None:
    for opts in (
        {"hiden": 3},
        {"hidden": 0},
        {"hidden": 2.5},
        {"layers": True},
        {"partition": "sorted"},
        {"alpha": -1.0},
        {"pretrain": "yes"},
        {"pretrain_classes": 11},
        {"min_shard": 0},
    ):
        with pytest.raises(TaskError):
            DigitsTask(opts)
    with pytest.raises(TaskError):
        DigitsTask(seed=-1)
    assert DigitsTask({"alpha": 2}).alpha == 2.0


# -- load_task --------------------------------------------------------------------------------

PLUGIN = '''
from __future__ import annotations
import torch
from seedswarm.node.learn.tasks import BaseTask


class Blobs(BaseTask):
    name = "blobs"

    def __init__(self, options, seed):
        g = torch.Generator().manual_seed(seed)
        n = int(options.get("n", 200))
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 2, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 3)[:, :2]
        super().__init__(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :], seed=seed)

    def build_model(self):
        torch.manual_seed(self.seed)
        return torch.nn.Linear(2, 3)


def make(options, seed):
    return Blobs(options, seed)


class Holder:
    @staticmethod
    def create(options, seed):
        return Blobs(options, seed)


def not_a_task(options, seed):
    return object()


NOT_CALLABLE = 3
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    pkg = tmp_path / "myplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(PLUGIN)
    (pkg / "broken.py").write_text("import no_such_dependency_xyz\n")
    (pkg / "raises.py").write_text("raise RuntimeError('bad plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m == "myplug" or m.startswith("myplug.")]:
        del sys.modules[name]


def test_load_builtin() -> None:
    t = load_task("digits", {"hidden": 16}, seed=4)
    assert isinstance(t, DigitsTask) and t.seed == 4 and t.hidden == 16
    assert load_task(" digits ").name == "digits"


def test_load_plugin(plugin_dir: Path) -> None:
    t = load_task("myplug.tasks:make", {"n": 100}, seed=2)
    assert t.name == "blobs" and isinstance(t, BaseTask)
    m = t.build_model()
    shard = t.shard(0, 4)
    loss = t.loss(m, t.batch(shard, np.random.default_rng(0), 8))
    assert loss.dim() == 0
    assert set(t.evaluate(m)) >= {"accuracy", "loss"}
    assert load_task("myplug.tasks:Holder.create").name == "blobs"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("mnist", "unknown task"),
        ("", "non-empty"),
        ("a:b:c", "bad task spec"),
        (":make", "bad task spec"),
        ("myplug.tasks:", "bad task spec"),
        ("myplug.nothere:make", "not found"),
        ("nosuchpkg_abc.mod:make", "not found"),
        ("myplug.broken:make", "failed to import"),
        ("myplug.raises:make", "failed to import"),
        ("myplug.tasks:missing", "no attribute"),
        ("myplug.tasks:NOT_CALLABLE", "not callable"),
        ("myplug.tasks:not_a_task", "not a Task"),
    ],
)
def test_load_errors(plugin_dir: Path, spec: str, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        load_task(spec)


def test_load_bad_options_and_seed() -> None:
    with pytest.raises(TaskError):
        load_task("digits", cast(Any, [1, 2]))
    with pytest.raises(TaskError):
        load_task("digits", seed=-3)
    with pytest.raises(TaskError, match="unknown digits option"):
        load_task("digits", {"widht": 3})


def _doc_block(marker: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "tasks.md").read_text()
    after = text.split(f"<!-- example: {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_worked_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plug-in example in docs/tasks.md is copied verbatim and must work as documented."""
    (tmp_path / "wine_task.py").write_text(_doc_block("wine_task.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        namespace: dict[str, Any] = {}
        exec(compile(_doc_block("use"), "docs/tasks.md", "exec"), namespace)
        task, model, g = namespace["task"], namespace["model"], namespace["g"]
        assert task.name == "wine" and len(namespace["contribution"]) == len(g) == 8
        assert np.corrcoef(g, namespace["g_fo"])[0, 1] > 0.99
        before = raw(model)
        assert raw(load_task("wine_task:make", {"hidden": 16}, seed=7).build_model()) == before
        assert all(len(task.shard(i, 1000)) == 8 for i in range(0, 1000, 97))
    finally:
        sys.modules.pop("wine_task", None)
