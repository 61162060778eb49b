"""The ``hf`` task: fine-tune a local Hugging Face causal language model on a local text file.

Bring your own model: a folder ``save_pretrained`` wrote (``config.json`` and the weights, and
its tokenizer if it has one), loaded with ``AutoModelForCausalLM.from_pretrained(folder,
local_files_only=True)`` in float32: nothing is downloaded. Every node loads the same folder,
so every node builds the same bits and the genesis's model digest matches; dropout is switched
off (every ``*dropout*``/``*pdrop*`` probability of the configuration set to 0), because a
dropout mask drawn from torch's global RNG would differ between nodes and between the two
passes of a zeroth-order estimate. Usually combined with ``trainable=`` or ``lora=``
(``trainable.py``), which every task understands.

Data: ``hfdata.py`` (a ``.txt`` or ``.jsonl`` file, tokenized with the model's tokenizer or as
bytes). Samples are windows of ``context + 1`` tokens at stride ``context``; shards, batches and
evaluation work as in the ``lm`` task, and the metric is the validation loss in nats per token
(lower is better). Needs ``transformers``: ``pip install 'seedswarm[hf]'``. See docs/lm.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.node.learn import hfdata, lmdata
from seedswarm.node.learn.taskcommon import (
    Shard,
    check_seed,
    draw,
    spread_shard,
    task_option,
    task_rng,
)
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["HF_DEFAULTS", "HFTask"]

_SHARD = 51  # purpose tag of the shard permutation

HF_DEFAULTS: dict[str, Any] = {
    "model": None,  # required: a local folder save_pretrained wrote
    "data": None,  # required: a .txt or .jsonl file
    "text_field": "text",  # the .jsonl field holding each document
    "tokenizer": "auto",  # auto: the folder's tokenizer if it has one, else bytes; or "bytes"
    "context": 0,  # tokens per window; 0: min(128, the model's maximum positions)
    "val_fraction": 0.1,
    "eval_windows": 64,
    "eval_batch": 16,
    "min_shard": 16,
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise TaskError("the hf task needs transformers, which is not installed: "
                        "pip install 'seedswarm[hf]'") from e
    return transformers


@contextlib.contextmanager
def _quiet(tf: Any) -> Iterator[None]:
    """No progress bars or info lines from transformers while loading (restored afterwards)."""
    log = tf.utils.logging
    bars = log.is_progress_bar_enabled()
    level = log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _opt(opts: Mapping[str, Any], key: str, kind: type, ok: Any, what: str) -> Any:
    return task_option("hf", opts, HF_DEFAULTS, key, kind, ok, what)


class HFTask:
    """Next-token prediction with a local Hugging Face causal LM (module docstring).

    ``batch`` returns ``(inputs, targets)``, int64 ``(B, context)`` each; ``evaluate`` reads
    ``eval_windows`` fixed windows spread evenly over the validation tokens: ``loss`` (nats per
    token), ``perplexity``, ``bits_per_token`` and ``accuracy`` (of the most likely next token).
    """

    name = "hf"
    metric = "loss"
    higher_is_better = False
    default_target: float | None = None  # depends on the model and the data: pass --target

    def __init__(self, options: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(HF_DEFAULTS))
        if unknown:
            raise TaskError(f"unknown hf option(s) {unknown}; known: {sorted(HF_DEFAULTS)} and trainable, "
                            "lora, lora_targets, lora_alpha")
        for key in ("model", "data"):
            if not isinstance(opts.get(key), str) or not opts[key]:
                raise TaskError(f"hf option {key!r} is required: "
                                + ("a local model folder" if key == "model" else "a .txt or .jsonl file"))
        self.seed = check_seed(seed)
        self.model_dir = Path(opts["model"]).expanduser()
        if not (self.model_dir / "config.json").is_file():
            raise TaskError(f"hf: {str(self.model_dir)!r} is not a model folder (no config.json there)")
        pos = lambda v: v >= 1  # noqa: E731
        text_field = _opt(opts, "text_field", str, bool, "a field name")
        mode = _opt(opts, "tokenizer", str, lambda v: v in ("auto", "bytes"), "'auto' or 'bytes'")
        context = _opt(opts, "context", int, lambda v: v >= 0, "an integer >= 0 (0: automatic)")
        val_fraction = _opt(opts, "val_fraction", float, lambda v: 0 < v < 1, "a number in (0, 1)")
        eval_windows = _opt(opts, "eval_windows", int, pos, "a positive integer")
        self.eval_batch = _opt(opts, "eval_batch", int, pos, "a positive integer")
        self.min_shard = _opt(opts, "min_shard", int, pos, "a positive integer")
        self.options = {k: opts.get(k, d) for k, d in HF_DEFAULTS.items()}
        tf = _transformers()
        with _quiet(tf):
            try:
                self.config = tf.AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
            except Exception as e:  # noqa: BLE001 - a bad folder, in one line
                raise TaskError(f"hf: cannot read the model configuration in {str(self.model_dir)!r}: {e}") from e
            tokenizer = None
            if mode == "auto" and hfdata.has_tokenizer(self.model_dir):
                try:
                    tokenizer = tf.AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
                except Exception as e:  # noqa: BLE001
                    raise TaskError(f"hf: cannot load the tokenizer in {str(self.model_dir)!r}: {e} "
                                    "(tokenizer=bytes reads bytes instead)") from e
        self.vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        if self.vocab < 2:
            raise TaskError("hf: the model configuration has no vocab_size")
        most = _max_positions(self.config)
        self.context = context or min(128, most or 128)
        if most is not None and self.context > most:
            raise TaskError(f"hf option 'context' ({self.context}) exceeds the model's {most} positions")
        docs = hfdata.load_documents(Path(opts["data"]).expanduser(), text_field)
        self.data = hfdata.tokenize(docs, tokenizer, self.vocab, val_fraction)
        ctx = self.context
        n = lmdata.window_starts(len(self.data.train), ctx)
        if n < 1 or len(self.data.val) < ctx + 1:
            raise TaskError(f"hf: the data ({len(self.data.train)} training and {len(self.data.val)} validation "
                            f"tokens) is too short for windows of {ctx + 1} tokens: lower 'context'")
        perm = task_rng(self.seed, _SHARD).permutation(n).astype(np.int64)
        perm.setflags(write=False)
        self._perm = perm
        self._eval = lmdata.spread_windows(self.data.val, ctx, eval_windows)

    @property
    def num_train(self) -> int:
        return int(self._perm.shape[0])

    def build_model(self) -> nn.Module:
        tf = _transformers()
        config = copy.deepcopy(self.config)
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        config.use_cache = False
        # Weights the folder lacks would be drawn from torch's global RNG: refused below, and the
        # caller's RNG state is left alone either way.
        with _quiet(tf), torch.random.fork_rng(devices=[]):
            try:
                model, info = tf.AutoModelForCausalLM.from_pretrained(
                    str(self.model_dir), config=config, local_files_only=True, output_loading_info=True)
            except Exception as e:  # noqa: BLE001
                raise TaskError(f"hf: cannot load the model in {str(self.model_dir)!r}: "
                                f"{type(e).__name__}: {e}") from e
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise TaskError(f"hf: the folder lacks weights {missing[:4]}: they would be random, "
                            "differently on every node")
        assert isinstance(model, nn.Module)
        model.to(torch.float32)  # exact for float16/bfloat16 weights; ties survive (same Parameter)
        model.eval()
        return model

    def shard(self, index: int, count: int) -> Shard:
        return spread_shard(self._perm, index, count, self.min_shard)

    def batch(self, shard: Shard, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(size, len(shard))`` distinct windows of the shard, drawn with ``rng``."""
        pos = draw(shard, rng, size)
        w = lmdata.windows(self.data.train, torch.from_numpy(pos * self.context), self.context)
        return w[:, :-1], w[:, 1:]

    @staticmethod
    def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=x, use_cache=False)
        logits: torch.Tensor = out.logits if hasattr(out, "logits") else out[0]
        return logits.reshape(-1, logits.shape[-1])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self._logits(model, x), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for w in self._eval.split(self.eval_batch):
                logits = self._logits(model, w[:, :-1])
                y = w[:, 1:].reshape(-1)
                total += float(F.cross_entropy(logits, y, reduction="sum").to(torch.float64))
                correct += int((logits.argmax(dim=1) == y).sum())
                count += int(y.numel())
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
                "accuracy": correct / count}
