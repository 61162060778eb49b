"""Tasks (node/learn/tasks.py): the digits task, sharding, determinism, and load_task."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from seedswarm.node.learn import digits
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


def test_digits_arrays_equal_scikit_learns_loader() -> None:
    from sklearn.datasets import load_digits

    pixels, labels = digits.digits_arrays()
    ref = load_digits()
    assert pixels.dtype == np.float64 and labels.dtype == np.int64
    assert np.array_equal(pixels, ref.data) and np.array_equal(labels, ref.target)


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
        digits._digits_pretrained.cache_clear()
        torch.set_num_threads(2)
        a = raw(DigitsTask({"pretrain": True, "hidden": 48}).build_model())
        digits._digits_pretrained.cache_clear()
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


# -- task files and `seedswarm task check` -------------------------------------------------------

# A tiny plug-in task, written to a file; BAD selects a defect for `task check` to find.
TASK_FILE = '''
import numpy as np
import torch
from seedswarm.node.learn.tasks import BaseTask

BAD = "{bad}"


class Tiny(BaseTask):
    name = "tiny"

    def __init__(self, options, seed):
        self.width = options.get("width", 4)
        assert isinstance(self.width, int), "width arrives JSON-typed"
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (120,), generator=g)
        x = torch.randn(120, 3, generator=g) + y[:, None].float()
        super().__init__(x[:80], y[:80], x[80:], y[80:], seed=seed, min_shard=8)

    def build_model(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return torch.nn.Sequential(torch.nn.Linear(3, self.width), torch.nn.Tanh(), torch.nn.Linear(self.width, 2))

    def shard(self, index, count):
        s = super().shard(index, count)
        if BAD == "shards":  # fresh global randomness on every call: not a function of (index, count)
            return type(s)(index, count, np.random.default_rng().permutation(s.indices))
        return s

    def evaluate(self, model):
        ev = super().evaluate(model)
        if BAD == "metric":
            ev["acc"] = ev.pop("accuracy")
        return ev


def make(options, seed):
    return Tiny(options, seed)
'''


def task_file(tmp_path: Path, bad: str = "") -> str:
    path = tmp_path / f"tiny_{bad or 'good'}.py"
    path.write_text(TASK_FILE.replace("{bad}", bad))
    return f"{path}:make"


def test_task_file_spec(tmp_path: Path) -> None:
    spec = task_file(tmp_path)
    t = load_task(spec, {"width": 6}, seed=3)
    assert t.name == "tiny" and param_count(t.build_model()) == 3 * 6 + 6 + 6 * 2 + 2
    assert type(load_task(spec, {}, seed=3)) is type(t)  # the file is loaded once per process
    with pytest.raises(TaskError, match=r"task file '.*nothere.py' not found"):
        load_task(str(tmp_path / "nothere.py") + ":make")
    with pytest.raises(TaskError, match="has no attribute 'nope'"):
        load_task(spec.replace(":make", ":nope"))
    (tmp_path / "syntax.py").write_text("def broken(:\n")
    with pytest.raises(TaskError, match="failed to import: SyntaxError"):
        load_task(f"{tmp_path / 'syntax.py'}:make")
    with pytest.raises(TaskError, match="name its factory"):
        load_task("my_task.py")


def test_task_file_runs_a_tiny_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from seedswarm.cli import main

    task_file(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative path, as a user types it
    rc = main(["sim", "--task", "./tiny_good.py:make", "--task-option", "width=5", "--nodes", "4", "--rounds", "3",
               "--trainers", "2", "--directions", "4", "--eval-every", "1", "--quiet", "--out", "run"])
    assert rc == 0, capsys.readouterr().err
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "./tiny_good.py:make" and summary["final_accuracy"] is not None
    assert summary["config"]["task_options"] == {"width": 5}


def _check(capsys: pytest.CaptureFixture[str], spec: str, *extra: str) -> tuple[int, str]:
    from seedswarm.cli import main

    rc = main(["task", "check", spec, "--directions", "4", "--batch-size", "8", *extra])
    return rc, capsys.readouterr().out


def test_task_check_passes_a_good_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(capsys, task_file(tmp_path), "--task-option", "width=3")
    assert rc == 0, out
    for name in ("load", "model", "shards", "batches", "loss", "evaluate", "estimate fo", "estimate zo"):
        assert re.search(rf"^  ok    {name} ", out, re.M), (name, out)
    assert "ready to train" in out


@pytest.mark.parametrize(("bad", "check", "says"), [
    ("shards", "shards", "gave different data on two calls"),
    ("metric", "evaluate", "without 'accuracy'"),
])
def test_task_check_finds_a_bad_task(bad: str, check: str, says: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(capsys, task_file(tmp_path, bad))
    assert rc == 1, out
    line = next(ln for ln in out.splitlines() if ln.startswith(f"  FAIL  {check} "))
    assert says in line
    assert "problem(s) found" in out


def test_task_check_of_a_missing_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(capsys, f"{tmp_path / 'nope.py'}:make")
    assert rc == 1 and "FAIL  load" in out and "not found" in out
