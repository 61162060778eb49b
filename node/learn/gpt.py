"""A small GPT-style byte-level decoder for the ``lm`` task (``node/learn/lm.py``).

Pre-norm transformer blocks (causal self-attention, GELU MLP), learned positions, a final
LayerNorm and an output head tied to the token embedding, as in GPT-2 and nanoGPT. Kept to
standard modules whose parameters are used inside their own ``forward`` (the head is an
``nn.Linear`` sharing the embedding's ``Parameter``), so both modes of ``zo_spsa`` see every use
of every parameter; ``zo_spsa`` checks that itself (``perturb.StoredReads``).

Initialisation draws every tensor from a seeded numpy PCG64 generator (a specified, stable
stream) and overwrites torch's default initialisation, which runs inside ``fork_rng`` (the
``meta`` device would avoid that work but costs seconds of torch warm-up on first use): torch's
global RNG is left as it was, and every node builds bit-identical parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
"""Bytes: no tokenizer to ship or agree on, and any text or source file is valid input."""


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 4
    width: int = 128
    heads: int = 4
    context: int = 128
    mlp_ratio: int = 4

    def check(self) -> None:
        for k in ("layers", "width", "heads", "context", "mlp_ratio"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"lm option {k!r} must be a positive integer, not {v!r}")
        if self.width % self.heads:
            raise ValueError(f"lm option 'width' ({self.width}) must be a multiple of 'heads' ({self.heads})")


def gpt_param_count(cfg: GPTConfig) -> int:
    """Distinct parameters: the tied head adds none."""
    d, f = cfg.width, cfg.width * cfg.mlp_ratio
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return VOCAB * d + cfg.context * d + cfg.layers * block + 2 * d


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (u.view(shape).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.out = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """``forward(idx)``: int64 bytes ``(B, T)``, ``T <= context`` -> logits ``(B, T, 256)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied: one Parameter, counted once

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence of {t} bytes is longer than the context ({self.cfg.context})")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def build_gpt(cfg: GPTConfig, rng: np.random.Generator) -> GPT:
    """GPT-2's initialisation: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2L)),
    zero biases, unit LayerNorm gains, drawn from ``rng`` module by module in a fixed order."""
    with torch.random.fork_rng(devices=[]):  # torch's default init runs, then is overwritten
        model = GPT(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.layers)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, nn.Linear | nn.Embedding) and name != "head":
                std = resid if name.endswith(("attn.proj", ".out")) else 0.02
                w = rng.normal(0.0, std, size=tuple(mod.weight.shape)).astype(np.float32)
                mod.weight.copy_(torch.from_numpy(w))
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    mod.bias.zero_()
    return model
