"""The ``hf`` task's data: a local text file, tokenized, split into training and validation tokens.

* ``.txt``: the whole file (UTF-8) is one document; ``.jsonl``: one JSON object per line, its
  ``text_field`` (default ``text``) a document; blank lines are skipped.
* Tokens: with the model folder's tokenizer (``AutoTokenizer.from_pretrained(folder,
  local_files_only=True)``, no special tokens added; documents joined by its ``eos_token_id``
  when it has one), or bytes (UTF-8, documents joined by ``\\n``) when the folder has no tokenizer
  or ``tokenizer=bytes``: the model's vocabulary must then hold at least 256 entries.
* Split: with two documents or more, the last ``val_fraction`` of the documents (at least one,
  never all) is the validation split; a single document is cut at ``1 - val_fraction`` of its
  tokens. Nothing is shuffled: the file's order is the split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seedswarm.node.learn.taskspec import TaskError

__all__ = ["TokenData", "has_tokenizer", "load_documents", "tokenize"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


@dataclass(frozen=True)
class TokenData:
    train: torch.Tensor  # int64, 1-D
    val: torch.Tensor
    tokenizer: str  # "bytes" or the tokenizer's class name
    digest: str  # SHA-256 of the training and validation token ids


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in _TOKENIZER_FILES)


def load_documents(path: Path, text_field: str = "text") -> list[str]:
    """The documents of a ``.txt`` or ``.jsonl`` file (TaskError naming the line of a bad one)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"hf: data file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"hf: cannot read data file {str(path)!r}: {e}") from None
    if path.suffix == ".txt":
        docs = [raw] if raw else []
    elif path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"hf: {path.name} line {i} is not JSON: {e}") from None
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise TaskError(f"hf: {path.name} line {i} has no string field {text_field!r}")
            if text:
                docs.append(text)
    else:
        raise TaskError(f"hf: data must be a .txt or .jsonl file, not {path.name!r}")
    if not docs:
        raise TaskError(f"hf: data file {str(path)!r} holds no text")
    return docs


def _encode(docs: list[str], tokenizer: Any | None) -> list[np.ndarray]:
    if tokenizer is None:
        return [np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int64) for d in docs]
    out = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def tokenize(docs: list[str], tokenizer: Any | None, vocab: int, val_fraction: float) -> TokenData:
    """Token ids of ``docs`` (``tokenizer`` None: bytes), split as the module docstring says."""
    if tokenizer is None and vocab < 256:
        raise TaskError(f"hf: the model's vocabulary ({vocab}) is too small for bytes; put its tokenizer "
                        "in the model folder")
    enc = _encode(docs, tokenizer)
    if tokenizer is None:
        sep = [10]  # "\n"
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        sep = [int(eos)] if isinstance(eos, int) else []

    def join(parts: list[np.ndarray]) -> np.ndarray:
        pieces: list[np.ndarray] = []
        for i, p in enumerate(parts):
            if i and sep:
                pieces.append(np.asarray(sep, dtype=np.int64))
            pieces.append(p)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    if len(enc) >= 2:
        n_val = min(len(enc) - 1, max(1, round(val_fraction * len(enc))))
        train, val = join(enc[:-n_val]), join(enc[-n_val:])
    else:
        ids = enc[0]
        cut = int(round(len(ids) * (1.0 - val_fraction)))
        train, val = ids[:cut], ids[cut:]
    if train.size and (train.min() < 0 or max(int(train.max()), int(val.max(initial=0))) >= vocab):
        raise TaskError(f"hf: token ids reach {max(int(train.max()), int(val.max(initial=0)))}, beyond the "
                        f"model's vocabulary ({vocab}): the tokenizer does not match the model")
    hsh = hashlib.sha256()
    for a in (train, val):
        hsh.update(len(a).to_bytes(8, "little") + a.astype("<i8").tobytes())
    name = "bytes" if tokenizer is None else type(tokenizer).__name__
    return TokenData(torch.from_numpy(train.copy()), torch.from_numpy(val.copy()), name, hsh.hexdigest())
