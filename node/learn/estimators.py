"""Projected-gradient estimators: one scalar ``g_k ~ <grad L(theta), z_k>`` per shared direction.

Both estimators see the model's parameters as one flat vector in ``model.parameters()`` order
(parameter ``j`` covers flat offsets ``[off_j, off_j + numel_j)``; tied parameters count once),
the same convention as ``crypto.directions.add_directions_``, so a trainer measures exactly the
directions every node later applies.

* :func:`zo_spsa`: zeroth order (MeZO, "Just One Byte"): two forward passes per direction.
* :func:`fo_project`: first order (Ferret): a few local SGD steps, then the projection of the
  average gradient onto each direction.

Neither ever writes a parameter of the model it is given: afterwards every parameter holds
exactly its original bits (checked by the tests on the raw bytes). A simulator shares one
parameter tensor between many nodes, and replay determinism (DESIGN.md invariant 1) needs
every node's parameters to be exactly what the chain says. Buffers (e.g. batch-norm running
statistics, which a training-mode forward updates in place) are snapshotted and restored
exactly, so a call has no lasting effect on the model at all. ``.grad`` is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from seedswarm.crypto.directions import fill_normal
from seedswarm.crypto.projection import project
from seedswarm.node.learn.perturb import ModuleSwap, StoredReads, perturbed
from seedswarm.node.learn.replay import direction_scale

__all__ = ["fo_project", "zo_spsa"]


def _flat_layout(model: nn.Module) -> tuple[list[nn.Parameter], dict[int, int]]:
    """Distinct parameters in ``model.parameters()`` order and each one's flat offset (by id)."""
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters: nothing to estimate")
    offsets: dict[int, int] = {}
    off = 0
    for p in params:
        if not p.dtype.is_floating_point:
            raise TypeError(f"parameters must be floating point, got {p.dtype}")
        offsets[id(p)] = off
        off += p.numel()
    return params, offsets


def _scales(model: nn.Module, params: list[nn.Parameter]) -> dict[int, torch.Tensor] | None:
    """Each parameter's direction scale by ``id`` (None: plain directions), on its device.

    The scale (``node/learn/precondition.py``) holds powers of two, so ``fl(z * s)`` is exact and
    a trainer measures exactly the directions ``add_directions_`` later applies.
    """
    scale = direction_scale(model)
    if scale is None:
        return None
    if len(scale) != len(params):
        raise ValueError(f"the model's direction scale has {len(scale)} tensors for {len(params)} parameters")
    return {id(p): s.to(device=p.device).reshape(p.shape) for p, s in zip(params, scale, strict=True)}


def _check_streams(streams: Sequence[int]) -> list[int]:
    out = []
    for i, s in enumerate(streams):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 1 << 64:
            raise ValueError(f"streams[{i}] must be an int in [0, 2**64), not {s!r}")
        out.append(s)
    return out


@contextmanager
def _preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer's exact bits afterwards (a training-mode forward may update them).

    Frozen parameters (buffers named in the root's ``seedswarm_frozen``, ``node/learn/trainable``)
    are not copied (they can be most of a model); a forward that wrote one raises instead.
    """
    frozen: frozenset[str] = getattr(model, "seedswarm_frozen", frozenset())
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    watched: list[tuple[str, torch.Tensor, int]] = []
    seen: set[int] = set()
    for name, b in model.named_buffers(remove_duplicate=False):
        if id(b) in seen:
            continue
        seen.add(id(b))
        if name in frozen:
            watched.append((name, b, b._version))
        else:
            saved.append((b, b.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
    changed = [name for name, b, v in watched if b._version != v]
    if changed:
        raise RuntimeError(f"the forward wrote frozen parameters {changed[:4]}: they must stay as built")


_Z_CACHE_ELEMS = 1 << 22
"""Models up to this many parameters (16 MiB of float32 directions) generate each direction once,
as one flat tensor reused for both signs; larger ones generate each module's slice when that
module runs (peak extra memory: one layer), at twice the generation cost."""




class _Call(nn.Module):
    """Wraps ``fn(model)`` as a module so that ``torch.func.functional_call`` can drive it."""

    def __init__(self, inner: nn.Module, fn: Callable[..., Any], *extra: Any) -> None:
        super().__init__()
        self.inner = inner
        self.fn = fn
        self.extra = extra

    def forward(self) -> Any:
        return self.fn(self.inner, *self.extra)


def _loss_value(x: torch.Tensor | float) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.detach().to(torch.float64).item())
    return float(x)


class _PerModuleUnsafe(Exception):
    """Module mode cannot perturb every use of every parameter (the message says which)."""


def _stored_read_names(model: nn.Module, seen: set[int]) -> list[str]:
    return [n for n, p in model.named_parameters() if id(p) in seen]


def zo_spsa(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor | float],
    streams: Sequence[int],
    eps: float,
    mode: Literal["module", "functional", "auto"] = "module",
) -> list[float]:
    """Central-difference SPSA along each direction: ``g_k = (L(t + eps z_k) - L(t - eps z_k)) / 2eps``.

    ``loss_fn(model)`` must evaluate the loss on the *same* batch every time (close over it) and
    call the model's modules normally (``module(x)``); it runs under ``torch.no_grad()``, twice
    per direction. ``z_k``'s slice for parameter ``j`` is ``fill_normal(streams[k], off_j,
    numel_j)``. Returns ``K`` Python floats (computed in float64 from the two losses; a NaN loss
    gives a NaN, which ``codec.quantize`` turns into a 0 byte).

    **Exactness.** MeZO perturbs in place (``t += eps z; t -= 2 eps z; t += eps z``), which does
    not restore the float bits: each step rounds. Measured on the digits MLP (2,410 float32
    parameters, default init, ``eps = 1e-3``, these directions): after one direction 48% of the
    parameters differ from their original bits (by up to 8 ulp); after 16 directions 87% (up to
    10 ulp). The drift is a random walk that depends on what a node perturbed, so nodes that
    replayed the same chain would disagree: replay determinism broken. Here the stored
    parameters are *never written*:

    * ``mode="module"`` (default): for each forward, every module's own parameters are replaced
      by fresh ``p + c z`` tensors only while that module's ``forward`` runs (a forward pre-hook
      swaps them into ``module._parameters``, a forward hook puts the original ``Parameter``
      objects back, also on an exception). Extra memory: the perturbed parameters of the modules
      inside ``forward`` (for an MLP: one layer), plus, for models of at most ``_Z_CACHE_ELEMS``
      (4M) parameters, the current direction as one flat float32 tensor (reused for both signs;
      bigger models regenerate each module's slice per pass). A parameter shared by several
      modules (``head.weight = tok.weight``) is perturbed in each of them with the same slice.
      Requirement: each parameter is used only inside the ``forward`` of a module owning it. The
      first pass checks it and raises ``ValueError`` (naming ``mode='functional'``) when a module
      owning parameters was not called, or when any torch operation read a stored parameter
      (:class:`StoredReads`: a tied head ``F.linear(x, self.tok.weight)`` in a parent, the
      pattern that made the estimate 31 % off on a GPT before this check).
    * ``mode="functional"``: ``torch.func.functional_call`` with all parameters perturbed at
      once (deduplicated by identity: a tied parameter is perturbed once, everywhere it is
      used). Exact for any model that reaches its parameters through its modules' attributes,
      but holds one perturbed copy of the whole model. A stored parameter read anyway (captured
      by ``loss_fn``) raises ``ValueError``: no mode can perturb it.
    * ``mode="auto"`` (what :func:`local_estimate` uses): module mode when its first-pass check
      passes, otherwise functional mode (the check's pass is redone, not reused).

    All modes return bit-identical values when they apply (same arithmetic: ``fl(fl(c * z) +
    p)``, then the same forward). Cost (CPU, one thread, K=16, batch 32; 32 forwards plus 16
    direction generations): 3 ms for the 2,410-parameter digits MLP, 22-32 ms for 300,010
    parameters, 100-130 ms for 1,000,060.

    Not safe to call while another thread runs forwards of the same module objects (they would
    see the perturbed tensors during a swapped forward). Scripted or compiled modules that skip
    Python hooks are not supported in module mode.
    """
    e = float(eps)
    if not (math.isfinite(e) and e > 0.0):
        raise ValueError(f"eps must be positive and finite, not {eps!r}")
    if mode not in ("module", "functional", "auto"):
        raise ValueError(f"mode must be 'module', 'functional' or 'auto', not {mode!r}")
    stream_list = _check_streams(streams)
    params, offsets = _flat_layout(model)
    scales = _scales(model, params)
    if not stream_list:
        return []
    with torch.no_grad(), _preserved_buffers(model):
        if mode != "functional":
            try:
                return _zo_module(model, loss_fn, stream_list, e, params, offsets, scales)
            except _PerModuleUnsafe as err:
                if mode == "module":
                    raise ValueError(str(err)) from None
        return _zo_functional(model, loss_fn, stream_list, e, params, offsets, scales)


def _zflat(params: list[nn.Parameter], stream: int, scales: dict[int, torch.Tensor] | None) -> torch.Tensor | None:
    total = sum(p.numel() for p in params)
    if total > _Z_CACHE_ELEMS:
        return None
    z = fill_normal(stream, 0, total, device=params[0].device)
    if scales is not None:
        z.mul_(torch.cat([scales[id(p)].reshape(-1) for p in params]))
    return z


def _zo_module(model: nn.Module, loss_fn: Callable[[nn.Module], Any], streams: list[int], e: float,
               params: list[nn.Parameter], offsets: dict[int, int],
               scales: dict[int, torch.Tensor] | None) -> list[float]:
    out: list[float] = []
    with ModuleSwap(model, offsets, scales) as swap:
        for i, s in enumerate(streams):
            swap.stream = s
            swap.zflat = _zflat(params, s, scales)
            swap.coeff = e
            if i == 0:
                with StoredReads(params) as watch:
                    swap.watch = watch
                    try:
                        lp = _loss_value(loss_fn(model))
                    finally:
                        swap.watch = None
                missing = swap.unvisited()
                if missing:
                    raise _PerModuleUnsafe(
                        f"modules owning parameters were not called by loss_fn: {missing}; "
                        "their parameters cannot be perturbed per module (use mode='functional')")
                if watch.seen:
                    raise _PerModuleUnsafe(
                        f"parameters {_stored_read_names(model, watch.seen)} were read outside the "
                        "forward of a module owning them (a tied weight used by a parent?): they "
                        "cannot be perturbed per module (use mode='functional')")
            else:
                lp = _loss_value(loss_fn(model))
            swap.coeff = -e
            lm = _loss_value(loss_fn(model))
            out.append((lp - lm) / (2.0 * e))
        swap.zflat = None
    return out


def _zo_functional(model: nn.Module, loss_fn: Callable[[nn.Module], Any], streams: list[int], e: float,
                   params: list[nn.Parameter], offsets: dict[int, int],
                   scales: dict[int, torch.Tensor] | None) -> list[float]:
    names = ["inner." + n for n, _ in model.named_parameters()]  # one name per distinct parameter
    call = _Call(model, loss_fn)
    out: list[float] = []
    for i, s in enumerate(streams):
        zflat = _zflat(params, s, scales)
        losses = []
        for c in (e, -e):
            pert = {n: perturbed(p, s, offsets[id(p)], c, zflat, None if scales is None else scales[id(p)])
                    for n, p in zip(names, params, strict=True)}
            if i == 0 and c > 0:
                with StoredReads(params) as watch:
                    losses.append(_loss_value(torch.func.functional_call(call, pert, ())))
                if watch.seen:
                    raise ValueError(
                        f"parameters {_stored_read_names(model, watch.seen)} were read by loss_fn "
                        "directly (a captured reference?), not through the model's modules: no "
                        "mode can perturb them")
            else:
                losses.append(_loss_value(torch.func.functional_call(call, pert, ())))
            del pert
        out.append((losses[0] - losses[1]) / (2.0 * e))
    return out


def fo_project(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, int], torch.Tensor],
    streams: Sequence[int],
    steps: int = 1,
    lr: float = 0.1,
) -> list[float]:
    """First-order projection (Ferret): ``g_k = <D, z_k>`` with ``D`` the average local gradient.

    ``loss_fn(model, t)`` is the differentiable loss of local step ``t`` (``0 <= t < steps``) on
    that step's batch; a caller that wants one batch ignores ``t``
    (``lambda m, t: task.loss(m, batch)``), one that wants a fresh batch per step indexes a list
    it drew beforehand (``lambda m, t: task.loss(m, batches[t])``).

    Runs ``steps`` steps of plain SGD ``t_{i+1} = t_i - lr * grad L_i(t_i)`` on private
    parameters and returns the projections of ``D = (t_0 - t_T) / (lr * steps)``, which equals
    ``grad L_0(t_0)`` for ``steps=1``. ``D`` is accumulated as the mean of the gradients along the
    trajectory (the same vector without the cancellation of subtracting two nearby parameter
    vectors), and ``lr`` only shapes the trajectory (for ``steps=1`` it is irrelevant).

    The model's parameters are never written and ``.grad`` is never touched: the forward runs
    through ``torch.func.functional_call`` on aliases of the parameters (``p.detach()``, no
    copy) for step 0 and on new tensors afterwards, gradients come from ``torch.autograd.grad``,
    and buffers are restored exactly. Extra memory: gradients (and, for ``steps > 1``, one
    parameter copy and the running sum). Works whether or not the parameters require grad.

    Cost (CPU, one thread, K=16, batch 32, steps=1): 0.9 ms for the 2,410-parameter digits MLP,
    14-17 ms for 300,010 parameters (one forward and backward plus 16 projections).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    r = float(lr)
    if not (math.isfinite(r) and r > 0.0):
        raise ValueError(f"lr must be positive and finite, not {lr!r}")
    stream_list = _check_streams(streams)
    params, _ = _flat_layout(model)
    names = ["inner." + n for n, _ in model.named_parameters()]
    cur = [p.detach().requires_grad_(True) for p in params]
    total: list[torch.Tensor] | None = None
    with _preserved_buffers(model), torch.enable_grad():
        for t in range(steps):
            call = _Call(model, loss_fn, t)
            loss = torch.func.functional_call(call, dict(zip(names, cur, strict=True)), ())
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            if not loss.requires_grad:
                raise ValueError("loss_fn returned a loss that does not depend on the parameters "
                                 "through autograd (was it computed under no_grad?)")
            grads = torch.autograd.grad(loss, cur, allow_unused=True)
            gs = [torch.zeros_like(c) if g is None else g.detach() for c, g in zip(cur, grads, strict=True)]
            if total is None:
                total = gs
            else:
                for a, g in zip(total, gs, strict=True):
                    a.add_(g)
            if t + 1 < steps:
                with torch.no_grad():
                    cur = [(c - r * g).requires_grad_(True) for c, g in zip(cur, gs, strict=True)]
    assert total is not None
    if steps > 1:
        for a in total:
            a.div_(steps)
    scales = _scales(model, params)
    if scales is not None:  # <v, s * z> = <s * v, z>, exactly (s: powers of two)
        for a, p in zip(total, params, strict=True):
            a.mul_(scales[id(p)])
    return project(total, stream_list)


def local_estimate(task: Any, genesis: Any, model: nn.Module, shard: Any, rng: Any,
                   streams: Sequence[int], device: torch.device | None = None) -> list[float]:
    """A trainer's projected gradients on ``streams``: the one function every driver calls.

    ``genesis.estimator`` picks first order (``local_steps`` SGD steps at ``local_lr``, their
    update projected, as Ferret) or zeroth order (SPSA at ``eps``, as MeZO); batches are drawn
    from ``shard`` with ``rng`` and moved to ``device`` when it is not the CPU.
    """

    def draw() -> Any:
        b = task.batch(shard, rng, genesis.batch_size)
        return tuple(x.to(device) for x in b) if device is not None and device.type != "cpu" else b

    if genesis.estimator == "fo":
        batches = [draw() for _ in range(genesis.local_steps)]
        return fo_project(model, lambda m, t: task.loss(m, batches[t]), streams,
                          steps=genesis.local_steps, lr=genesis.local_lr)
    batch = draw()
    # auto: per-module perturbation where it sees every use of every parameter, else functional
    # (a tied GPT head read from its parent); never a silently biased estimate.
    return zo_spsa(model, lambda m: task.loss(m, batch), streams, genesis.eps, mode="auto")
