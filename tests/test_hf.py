"""The ``hf`` task (node/learn/hf.py, hfdata.py): a local Hugging Face causal LM on a local text
file, with trainable subsets and LoRA, end to end in the simulator. Tiny randomly initialised
GPT-2 models are written to a temporary folder: nothing is downloaded."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from seedswarm.crypto.hashing import stream_seed  # noqa: E402
from seedswarm.crypto.projection import add_directions_  # noqa: E402
from seedswarm.node.learn.estimators import fo_project, zo_spsa  # noqa: E402
from seedswarm.node.learn.replay import model_digest  # noqa: E402
from seedswarm.node.learn.tasks import Task, TaskError, load_task, param_count, task_metric  # noqa: E402
from seedswarm.node.learn.trainable import LoRA, trainable_summary  # noqa: E402

TEXT = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text(encoding="utf-8")  # about 19 kB


def _gpt2(folder: Path, vocab: int, layers: int = 2, tokenizer: Any = None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = None if tokenizer is None else tokenizer.eos_token_id
    cfg = GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                     bos_token_id=eos, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    (root / "code.txt").write_text(TEXT, encoding="utf-8")
    docs = [{"text": TEXT[i : i + 3000]} for i in range(0, len(TEXT), 3000)]
    (root / "code.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    return {"model": str(_gpt2(root / "gpt2", 256)), "data": str(root / "code.txt"),
            "jsonl": str(root / "code.jsonl"), "root": str(root)}


def opts(files: dict[str, str], **more: Any) -> dict[str, Any]:
    return {"model": files["model"], "data": files["data"], "context": 32, "eval_windows": 16, **more}


def test_task_bytes_fallback_tied_model_and_metric(files: dict[str, str]) -> None:
    task = load_task("hf", opts(files))
    assert isinstance(task, Task) and task.name == "hf"
    assert task.data.tokenizer == "bytes" and len(task.data.train) + len(task.data.val) == len(TEXT.encode())
    m = task.build_model()
    assert m.lm_head.weight is m.transformer.wte.weight  # type: ignore[union-attr]  # GPT-2 ties them
    assert param_count(m) == 35_712 and all(p.dtype == torch.float32 for p in m.parameters())
    assert m.config.attn_pdrop == m.config.resid_pdrop == m.config.embd_pdrop == 0.0  # type: ignore[union-attr]
    state = torch.random.get_rng_state()
    assert model_digest(list(load_task("hf", opts(files)).build_model().parameters())) == \
        model_digest(list(m.parameters()))
    assert torch.equal(torch.random.get_rng_state(), state)
    metric = task_metric(task)
    assert (metric.key, metric.higher_is_better, metric.default_target) == ("loss", False, None)
    ev = task.evaluate(m)
    assert set(ev) >= {"loss", "accuracy", "perplexity", "bits_per_token"}
    assert ev["loss"] == pytest.approx(np.log(256), abs=0.3) and task.evaluate(m) == ev
    x, y = task.batch(task.shard(0, 4), np.random.default_rng(0), 4)
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    shards = [task.shard(i, 8) for i in range(8)]
    flat = np.concatenate([s.indices for s in shards])
    assert len(flat) == len(np.unique(flat)) == task.num_train


def test_zo_on_the_tied_gpt2_matches_first_order(files: dict[str, str]) -> None:
    for extra, corr in (({}, 0.999), ({"lora": 2}, 0.99)):  # LoRA at init: B's gradient only, small
        task = load_task("hf", opts(files, **extra))
        m = task.build_model()
        batch = task.batch(task.shard(0, 2), np.random.default_rng(3), 4)
        streams = [stream_seed(11, k) for k in range(8)]
        g = fo_project(m, lambda mod, t, b=batch, tk=task: tk.loss(mod, b), streams)
        za = zo_spsa(m, lambda mod, b=batch, tk=task: tk.loss(mod, b), streams, 1e-4, mode="auto")
        zf = zo_spsa(m, lambda mod, b=batch, tk=task: tk.loss(mod, b), streams, 1e-4, mode="functional")
        assert za == zf
        assert np.corrcoef(za, g)[0, 1] > corr, extra


def test_lora_and_subsets_on_gpt2_conv1d(files: dict[str, str]) -> None:
    base = load_task("hf", opts(files)).build_model()
    task = load_task("hf", opts(files, lora=4))
    m = task.build_model()
    adapted = [n for n, mod in m.named_modules() if isinstance(mod, LoRA)]
    assert adapted == [f"transformer.h.{i}.{s}" for i in range(2)
                       for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # not lm_head
    assert trainable_summary(m) == {"trainable": 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)),
                                    "frozen": 35_712, "lora_layers": 8}
    x, _ = task.batch(task.shard(0, 2), np.random.default_rng(1), 2)
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, base(input_ids=x).logits)
    sub = load_task("hf", opts(files, trainable="transformer.h.1.*,transformer.ln_f.*")).build_model()
    assert param_count(sub) == 12_704 + 64
    assert all(n.startswith(("transformer.h.1.", "transformer.ln_f.")) for n, _ in sub.named_parameters())


def test_tokenizer_from_the_model_folder_and_jsonl_documents(files: dict[str, str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    folder = _gpt2(Path(files["root"]) / "gpt2-bpe", len(fast), layers=1, tokenizer=fast)
    task = load_task("hf", {"model": str(folder), "data": files["jsonl"], "context": 32})
    data = task.data
    assert data.tokenizer != "bytes" and len(data.train) + len(data.val) < 0.7 * len(TEXT)  # merges
    n_docs = len(range(0, len(TEXT), 3000))
    n_val = max(1, round(0.1 * n_docs))
    assert int((data.train == fast.eos_token_id).sum()) == n_docs - n_val - 1  # joined by EOS
    assert int((data.val == fast.eos_token_id).sum()) == n_val - 1
    as_bytes = load_task("hf", {"model": str(folder), "data": files["jsonl"], "context": 32, "tokenizer": "bytes"})
    assert as_bytes.data.tokenizer == "bytes"
    assert np.isfinite(task.evaluate(task.build_model())["loss"])
    small = _gpt2(Path(files["root"]) / "gpt2-small-vocab", 100, layers=1)
    with pytest.raises(TaskError, match="too small for bytes"):
        load_task("hf", {"model": str(small), "data": files["data"]})


def test_bad_options_and_missing_transformers(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(files["root"])
    (root / "notes.md").write_text("x")
    (root / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    for o, msg in (({"data": files["data"]}, "'model' is required"),
                   ({"model": files["model"]}, "'data' is required"),
                   ({"model": files["root"], "data": files["data"]}, "no config.json"),
                   (opts(files, data=str(root / "missing.txt")), "not found"),
                   (opts(files, data=str(root / "notes.md")), ".txt or .jsonl"),
                   (opts(files, data=str(root / "bad.jsonl")), "line 2 has no string field 'text'"),
                   (opts(files, context=65), "exceeds the model's 64 positions"),
                   (opts(files, context=20_000), "exceeds"),
                   (opts(files, tokenizer="bpe"), "'tokenizer'"),
                   (opts(files, layers=2), "unknown hf option")):
        with pytest.raises(TaskError, match=msg):
            load_task("hf", o)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(TaskError, match=r"seedswarm\[hf\]"):
        load_task("hf", opts(files))


def test_sim_hf_end_to_end(files: dict[str, str], tmp_path: Path) -> None:
    from seedswarm.sim.runner import SimConfig, run

    results = {}
    for name, extra, lr in (("full", {}, 0.05), ("lora", {"lora": 4, "trainable": "transformer.ln_f.*"}, 1.0)):
        cfg = SimConfig(nodes=4, rounds=12, task="hf", task_options=opts(files, **extra), trainers=3,
                        batch_size=8, lr=lr, directions=32, eval_every=4, out=str(tmp_path / name), quiet=True)
        s = run(cfg)
        assert s["honest_digest_agreement"] == 1.0, name
        assert s["metric"] == "loss" and s["final_metric"] == s["final_loss"]
        results[name] = (s["initial_metric"], s["final_metric"])
    init, full = results["full"]
    assert results["lora"][0] == init  # LoRA starts at the base model
    assert full < init - 0.5
    assert results["lora"][1] < init - 0.01


def test_llama_untied_head_lora_targets_and_zo(files: dict[str, str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(files["root"]) / "llama"
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    task = load_task("hf", {"model": str(folder), "data": files["data"], "context": 32, "lora": 2})
    m = task.build_model()
    adapted = [n for n, mod in m.named_modules() if isinstance(mod, LoRA)]
    assert len(adapted) == 14 and "lm_head" not in adapted  # 7 projections a layer; not the head
    assert trainable_summary(m) == {"trainable": 2048, "frozen": 34_976, "lora_layers": 14}
    add_directions_([p.detach() for p in m.parameters()], [stream_seed(4, 0)], [0.3])  # B != 0
    batch = task.batch(task.shard(0, 2), np.random.default_rng(0), 4)
    streams = [stream_seed(5, k) for k in range(6)]
    g = fo_project(m, lambda mod, t: task.loss(mod, batch), streams)
    za = zo_spsa(m, lambda mod: task.loss(mod, batch), streams, 1e-4, mode="auto")
    assert za == zo_spsa(m, lambda mod: task.loss(mod, batch), streams, 1e-4, mode="functional")
    assert np.corrcoef(za, g)[0, 1] > 0.999
