"""Perturbing parameters without writing them: what the zeroth-order estimator runs a forward on.

Split from ``estimators.py``: :func:`perturbed` builds ``p + c * (s * z)`` as a new tensor,
:class:`ModuleSwap` substitutes such tensors for each module's own parameters only while that
module's ``forward`` runs, and :class:`StoredReads` notices a forward that reads a stored
parameter anyway (a tied head in a parent), which module mode cannot perturb. See
``estimators.zo_spsa`` for why the stored parameters must never be written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from seedswarm.crypto.directions import fill_normal

__all__ = ["ModuleSwap", "StoredReads", "perturbed"]


def perturbed(
    p: torch.Tensor, stream: int, offset: int, coeff: float, zflat: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A new tensor ``p + coeff * (s * z)`` (``z`` the slice of ``stream`` at ``offset``, ``s`` the
    parameter's direction scale, 1 when None); ``p`` is only read.

    ``z`` comes from ``zflat`` (the whole direction, pre-generated and already scaled) or is
    generated into a fresh buffer that then becomes the result; the arithmetic
    (``fl(fl(coeff * fl(s * z)) + p)``) is the same either way, so both give the same bits.
    """
    n = p.numel()
    if zflat is not None:
        z = zflat[offset : offset + n].to(device=p.device, dtype=p.dtype, copy=True)
    else:
        z = fill_normal(stream, offset, n, device=p.device)
        if p.dtype != torch.float32:
            z = z.to(p.dtype)
        if scale is not None:
            z.mul_(scale.reshape(-1))
    z.mul_(coeff).add_(p.detach().reshape(-1))
    return z.view(p.shape)


class StoredReads(TorchFunctionMode):
    """Notes every torch operation that takes a *stored* parameter object as an argument.

    During a perturbed pass no operation of the forward should ever see a stored parameter: in
    module mode each module's own parameters are swapped out while its ``forward`` runs, in
    functional mode all of them are. One that does read a stored parameter (a tied head written
    ``F.linear(x, self.tok.weight)`` in a parent, whose ``tok`` ran earlier; a weight captured
    by ``loss_fn``; ``nn.MultiheadAttention``'s ``out_proj.weight``) used it unperturbed, which
    biases ``g`` without any error: the per-module estimate of a GPT with such a head was 31 %
    off (correlation 0.95 with the exact projection). Active only on the first pass of a call:
    it costs a Python call per operation.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.ids = {id(p) for p in params}
        self.seen: set[int] = set()
        self.paused = 0

    def _scan(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) in self.ids:
                self.seen.add(id(obj))
        elif isinstance(obj, list | tuple):
            for x in obj:
                self._scan(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                self._scan(x)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            self._scan(args)
            if kwargs:
                self._scan(kwargs)
        return func(*args, **(kwargs or {}))


class ModuleSwap:
    """Substitute perturbed tensors for each module's own parameters during its forward only.

    A forward pre-hook puts ``p + c * z`` into ``module._parameters[name]`` (a plain tensor that
    ``module.weight`` then returns); a forward hook (``always_call``, so also on an exception)
    puts the original ``Parameter`` object back. The stored parameters are never written, and at
    any instant at most the parameters of the modules currently inside ``forward`` (one leaf
    layer and its ancestors' own parameters, if any) exist in perturbed form.
    """

    def __init__(self, model: nn.Module, offsets: dict[int, int],
                 scales: dict[int, torch.Tensor] | None = None) -> None:
        self.offsets = offsets
        self.scales = scales
        self.owners: list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]] = []
        for mod in model.modules():
            own = [(n, p) for n, p in mod._parameters.items() if p is not None]
            if own:
                self.owners.append((mod, own))
        self.own = {id(m): own for m, own in self.owners}
        self.stream = 0
        self.coeff = 0.0
        self.zflat: torch.Tensor | None = None
        self.depth: dict[int, int] = {}
        self.visited: set[int] = set()
        self.handles: list[Any] = []
        self.watch: StoredReads | None = None  # paused while a hook itself reads a parameter

    def __enter__(self) -> ModuleSwap:
        try:
            for mod, _ in self.owners:
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(self._post, always_call=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()
        # Belt and braces: whatever happened inside, every original Parameter object is back.
        for mod, own in self.owners:
            for name, p in own:
                mod._parameters[name] = p
        self.depth.clear()

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, mod: nn.Module, args: Any) -> None:
        key = id(mod)
        d = self.depth.get(key, 0)
        self.depth[key] = d + 1
        self.visited.add(key)
        if d:  # re-entrant call of a module already inside its forward: already perturbed
            return
        if self.watch is not None:
            self.watch.paused += 1
        try:
            for name, p in self.own[key]:
                mod._parameters[name] = perturbed(  # type: ignore[assignment]
                    p, self.stream, self.offsets[id(p)], self.coeff, self.zflat,
                    None if self.scales is None else self.scales[id(p)],
                )
        finally:
            if self.watch is not None:
                self.watch.paused -= 1

    def _post(self, mod: nn.Module, args: Any, output: Any) -> None:
        key = id(mod)
        d = self.depth.get(key, 0) - 1
        if d > 0:
            self.depth[key] = d
            return
        self.depth.pop(key, None)
        for name, p in self.own[key]:
            mod._parameters[name] = p

    def unvisited(self) -> list[str]:
        return [type(m).__name__ for m, _ in self.owners if id(m) not in self.visited]
