"""Train what matters: a subset of a task's parameters (name patterns) and LoRA adapters.

Four task options, understood for every task (``load_task`` takes them off before the task's
own factory sees them, and wraps the task in :class:`SubsetTask`):

* ``trainable``: comma-separated shell-style globs (``fnmatch``, case-sensitive; ``*`` also
  crosses dots) over parameter names as ``model.named_parameters()`` spells them, e.g.
  ``blocks.3.*,norm.*``. A tied parameter is trainable when any of its names matches.
* ``lora``: a rank ``r >= 1``: every target layer (an ``nn.Linear``, or the ``Conv1D`` of
  Hugging Face's GPT-2) gets an adapter ``y = W x + b + (alpha / r) B A x`` with ``A``
  (``r x in``) drawn from ``U(-1/sqrt(in), 1/sqrt(in))`` by a generator seeded with the run's
  seed, and ``B`` (``out x r``) zero, as in Hu et al. 2021 (and PEFT's initialisation): the model
  computes exactly what the base model computes until ``B`` moves.
* ``lora_targets``: globs over *module* names choosing the layers to adapt; default every linear
  layer except the output head (the model's ``get_output_embeddings()``, if it has one) and any
  layer whose weight another module shares (a tied head).
* ``lora_alpha``: the numerator of the adapter's scale ``alpha / r`` (default ``r``: scale 1).

Trainable: the adapters when ``lora`` is set, plus whatever ``trainable`` matches; with
``trainable`` alone, only what it matches; with neither, everything (the task as it was).

Everything else is frozen by moving it from the module's parameters to its **buffers**
(``requires_grad=False``): ``model.parameters()`` then *is* the trainable set, so the
directions, both estimators, record replay, checkpoints and the genesis's model digest cover
exactly the trainable parameters with no change to any of them, and the frozen tensors come from
the task's deterministic initial (or pretrained) model on every node. ``model.state_dict()``
still holds everything. The names of the frozen buffers are kept on the root module
(:data:`FROZEN_ATTR`), so the estimators need not snapshot them (they check that no forward
wrote one instead).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.node.learn.taskcommon import TaskWrapper, task_rng
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["FROZEN_ATTR", "SUBSET_OPTIONS", "LoRA", "Subset", "SubsetTask", "apply_subset",
           "split_subset_options", "trainable_summary"]

SUBSET_OPTIONS = ("trainable", "lora", "lora_targets", "lora_alpha")
FROZEN_ATTR = "seedswarm_frozen"
"""Root-module attribute: the frozenset of names of the buffers that are frozen parameters."""
_LORA = 41  # purpose tag of the adapters' random stream


def _patterns(key: str, v: Any) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
        raise TaskError(f"option {key!r} must be comma-separated name patterns, not {v!r}")
    out = tuple(s.strip() for s in items if s.strip())
    if not out:
        raise TaskError(f"option {key!r} names no pattern")
    return out


@dataclass(frozen=True)
class Subset:
    """What :func:`apply_subset` does: ``trainable`` patterns (None: all, or only the adapters
    when ``lora``), LoRA rank (0: none), targets (None: the default) and alpha."""

    trainable: tuple[str, ...] | None = None
    lora: int = 0
    lora_targets: tuple[str, ...] | None = None
    lora_alpha: float | None = None

    @property
    def scale(self) -> float:
        return (self.lora if self.lora_alpha is None else self.lora_alpha) / self.lora


def split_subset_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], Subset | None]:
    """``options`` without the subset keys, and the :class:`Subset` they ask for (None: none)."""
    rest = {k: v for k, v in options.items() if k not in SUBSET_OPTIONS}
    if not any(k in options for k in SUBSET_OPTIONS):
        return rest, None
    trainable = _patterns("trainable", options["trainable"]) if "trainable" in options else None
    rank = options.get("lora", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise TaskError(f"option 'lora' must be a rank (an integer >= 1; 0: no adapters), not {rank!r}")
    targets = _patterns("lora_targets", options["lora_targets"]) if "lora_targets" in options else None
    alpha = options.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)
                              or not math.isfinite(alpha) or alpha <= 0):
        raise TaskError(f"option 'lora_alpha' must be a positive number, not {alpha!r}")
    if not rank and (targets is not None or alpha is not None):
        raise TaskError("options 'lora_targets' and 'lora_alpha' need 'lora' (the adapters' rank)")
    return rest, Subset(trainable, rank, targets, None if alpha is None else float(alpha))


# ---------------------------------------------------------------------------------------------
# LoRA


def _linear_shape(mod: nn.Module) -> tuple[str, int, int] | None:
    """``(kind, in, out)`` of a layer LoRA can adapt: ``nn.Linear`` or HF's ``Conv1D`` (x @ W + b)."""
    if isinstance(mod, nn.Linear):
        return "linear", mod.in_features, mod.out_features
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return "conv1d", int(w.shape[0]), int(w.shape[1])
    return None


class LoRA(nn.Module):
    """A linear layer plus a low-rank adapter: ``base(x) + scale * B(A(x))``.

    Keeps the base layer's ``weight`` and ``bias`` as its own attributes (so parameter names do
    not change: ``...qkv.weight`` stays ``...qkv.weight``, with ``...qkv.lora_A`` and
    ``...qkv.lora_B`` beside it) and computes the base output exactly as the wrapped layer did.
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, a: torch.Tensor) -> None:
        super().__init__()
        shape = _linear_shape(base)
        if shape is None:
            raise TypeError(f"LoRA adapts nn.Linear or Conv1D layers, not {type(base).__name__}")
        self.kind, self.in_features, self.out_features = shape
        w = base.weight
        assert isinstance(w, torch.Tensor)
        bias = base.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        self.weight = w
        self.bias = bias
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype).reshape(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.kind == "linear":
            y = F.linear(x, w, b)
        else:  # transformers.pytorch_utils.Conv1D, operation for operation
            assert b is not None
            size = x.size()[:-1] + (self.out_features,)
            y = torch.addmm(b, x.view(-1, x.size(-1)), w).view(size)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _shared_weights(model: nn.Module) -> set[int]:
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, n in owners.items() if n > 1}


def _lora_targets(model: nn.Module, patterns: tuple[str, ...] | None) -> list[str]:
    eligible = [n for n, m in model.named_modules() if n and _linear_shape(m) is not None]
    if patterns is None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        shared = _shared_weights(model)
        mods = dict(model.named_modules())
        chosen = [n for n in eligible if mods[n] is not head and id(mods[n].weight) not in shared]
        if not chosen:
            raise TaskError(f"lora: no linear layer to adapt by default (layers: {_few(eligible)}); "
                            "name them with lora_targets")
        return chosen
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in eligible):
            raise TaskError(f"lora_targets pattern {pat!r} matches no linear layer; the linear layers are "
                            f"{_few(eligible)}")
    return [n for n in eligible if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _few(names: Sequence[str], k: int = 12) -> str:
    shown = ", ".join(names[:k])
    return (shown + f", ... ({len(names)} in all)") if len(names) > k else (shown or "none")


def _add_lora(model: nn.Module, spec: Subset, seed: int) -> list[str]:
    names = _lora_targets(model, spec.lora_targets)
    mods = dict(model.named_modules())
    rng = task_rng(seed, _LORA, spec.lora)
    for name in names:  # named_modules() order: the draws are fixed by the model's layout
        base = mods[name]
        shape = _linear_shape(base)
        assert shape is not None
        fan_in = shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        a = torch.from_numpy(rng.uniform(-bound, bound, size=(spec.lora, fan_in)).astype("float32"))
        parent_name, _, child = name.rpartition(".")
        parent = mods[parent_name] if parent_name else model
        setattr(parent, child, LoRA(base, spec.lora, spec.scale, a))
    return names


# ---------------------------------------------------------------------------------------------
# freezing


def _freeze(model: nn.Module, keep: set[int]) -> list[str]:
    """Move every parameter not in ``keep`` (ids) to its module's buffers; the frozen names."""
    frozen: dict[int, torch.Tensor] = {}  # one frozen tensor per distinct parameter: ties survive
    names: list[str] = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for n, p in list(mod._parameters.items()):
            if p is None or id(p) in keep:
                continue
            t = frozen.get(id(p))
            if t is None:
                t = frozen[id(p)] = p.detach().requires_grad_(False)
            del mod._parameters[n]
            mod.register_buffer(n, t, persistent=True)
            names.append(f"{prefix}.{n}" if prefix else n)
    return names


def apply_subset(model: nn.Module, spec: Subset, seed: int) -> nn.Module:
    """Add the adapters and freeze what is not trainable, in place; returns ``model``.

    Deterministic in ``(model, spec, seed)``; torch's global RNG is not used. TaskError when a
    pattern matches nothing or nothing would be trainable.
    """
    adapted = _add_lora(model, spec, seed) if spec.lora else []
    named = list(model.named_parameters(remove_duplicate=False))
    keep: set[int] = set()
    if spec.lora:
        keep |= {id(p) for n, p in named if n.rpartition(".")[2] in ("lora_A", "lora_B")}
    if spec.trainable is not None:
        for pat in spec.trainable:
            hit = {id(p) for n, p in named if fnmatch.fnmatchcase(n, pat)}
            if not hit:
                raise TaskError(f"trainable pattern {pat!r} matches no parameter; the parameters are "
                                f"{_few([n for n, _ in named])}")
            keep |= hit
    elif not spec.lora:
        keep = {id(p) for _, p in named}
    frozen = _freeze(model, keep)
    object.__setattr__(model, FROZEN_ATTR, frozenset(frozen))
    object.__setattr__(model, "seedswarm_lora", tuple(adapted))
    if not any(True for _ in model.parameters()):
        raise TaskError("nothing is trainable: the patterns froze every parameter")
    return model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Distinct trainable and frozen scalars, and the number of adapted layers."""
    frozen_names: frozenset[str] = getattr(model, FROZEN_ATTR, frozenset())
    seen: set[int] = set()
    frozen = 0
    for n, b in model.named_buffers(remove_duplicate=False):
        if n in frozen_names and id(b) not in seen:
            seen.add(id(b))
            frozen += b.numel()
    return {"trainable": sum(p.numel() for p in model.parameters()), "frozen": frozen,
            "lora_layers": len(getattr(model, "seedswarm_lora", ()))}


class SubsetTask(TaskWrapper):
    """A task whose ``build_model`` applies a :class:`Subset`; everything else is the inner task's
    (:class:`~.taskcommon.TaskWrapper`). ``load_task`` returns one when the options name a subset.
    """

    def __init__(self, inner: Any, subset: Subset, seed: int) -> None:
        super().__init__(inner)
        self.subset = subset
        self.seed = seed

    def build_model(self) -> nn.Module:
        return apply_subset(self.inner.build_model(), self.subset, self.seed)
