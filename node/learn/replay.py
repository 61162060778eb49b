"""Replay: the model is a pure function of the genesis model and the chain of records.

:class:`ModelStates` keeps the parameters of recent heads. A head's parameters are computed
once from its parent's and never written again, so any number of nodes on the same chain can
share them (the simulator's memory does not grow with N) and a node can step back to an
ancestor after a fork switch without undoing floating-point updates (which are not invertible).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from seedswarm.crypto.hashing import h
from seedswarm.crypto.projection import add_directions_
from seedswarm.gossip.wire import Record
from seedswarm.node.core.chain import ChainState, decode_aggregate
from seedswarm.node.learn.momentum import step_with_momentum_

Params = list[torch.Tensor]


def model_digest(params: Sequence[torch.Tensor]) -> bytes:
    """Digest of parameter bits, shapes and dtypes (bit-exact replay makes these comparable)."""
    parts: list[bytes] = []
    for p in params:
        t = p.detach().contiguous().cpu()
        parts.append(f"{t.dtype}:{tuple(t.shape)}".encode())
        parts.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h(b"seedswarm/model", *parts)


SCALE_ATTR = "seedswarm_direction_scale"
"""Root-module attribute: the per-parameter direction scale (``model.parameters()`` order), set by
``node/learn/precondition.py``; absent for plain ``N(0, I)`` directions."""


def direction_scale(model: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The scale the model's directions are drawn with (None: plain ``N(0, I)``)."""
    scale: tuple[torch.Tensor, ...] | None = getattr(model, SCALE_ATTR, None)
    return scale


def initial_digest(model: torch.nn.Module) -> bytes:
    """What the genesis commits to: the initial parameters, and the direction scale if any (a node
    whose scale differs then refuses the genesis instead of replaying other updates)."""
    return model_digest(list(model.parameters()) + list(direction_scale(model) or ()))


def apply_record_(params: Sequence[torch.Tensor], parent: ChainState, rec: Record,
                  scale: Sequence[torch.Tensor] | None = None, momentum: float = 0.0) -> None:
    """θ ← θ − η_r · scale_r · Σ_k (a_k / 256) (s ⊙ z_k) / (G·K), in place, in a fixed order
    (``s``: the direction scale, all ones when None). With ``momentum`` β, ``params`` is a
    :func:`~.momentum.replay_state` (parameters, then their buffers) and that update goes through
    the buffers (``momentum.py``): a round with a zero aggregate still moves θ."""
    agg = decode_aggregate(rec.aggregate)
    if not any(agg) and not momentum:
        return
    streams = parent.streams()
    coeffs = parent.update_coefficients(agg)
    keep = [(s, c) for s, c in zip(streams, coeffs, strict=True) if c != 0.0]

    def add_update(ts: Sequence[torch.Tensor]) -> None:
        add_directions_(ts, [s for s, _ in keep], [c for _, c in keep], scale)

    with torch.no_grad():
        if momentum:
            step_with_momentum_(list(params), momentum, add_update)
        else:
            add_update(params)


def params_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of one full copy of ``params`` (what each kept state costs)."""
    return sum(p.numel() * p.element_size() for p in params)


class ModelStates:
    """Parameters by chain head (an LRU of immutable parameter lists).

    Each kept state is a full copy of the parameters, so the number kept is bounded twice: by
    ``keep`` and, when ``budget_bytes`` is given, by how many copies fit in it (at least 2: the
    head and the state being computed from it). At 100M float32 parameters a copy is 400 MB, so
    a fixed count alone (16 in the daemon) would take gigabytes. Fewer kept states cost time,
    never correctness: a caller that finds a base state missing replays it (the daemon from its
    newest checkpoint, the simulator from the nearest kept ancestor).

    ``scale`` is the direction scale every record is applied with (the initial model's,
    :func:`direction_scale`; moved to the parameters' device once here), ``momentum`` its replayed
    momentum (``momentum.py``; ``params`` then holds the buffers after the parameters).
    """

    def __init__(self, root: ChainState, params: Sequence[torch.Tensor], keep: int = 16,
                 budget_bytes: int | None = None, scale: Sequence[torch.Tensor] | None = None,
                 momentum: float = 0.0) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self._by_head: OrderedDict[bytes, Params] = OrderedDict()
        self.copy_bytes = params_bytes(params)
        if budget_bytes is not None:
            if budget_bytes < 0:
                raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
            keep = max(2, min(keep, budget_bytes // max(1, self.copy_bytes)))
        self.keep = keep  # states kept at most
        self.scale = None if scale is None else tuple(s.to(params[0].device) for s in scale)
        self.momentum = momentum
        self._put(root.head, [p.detach().clone() for p in params])
        self.applied = 0  # records applied (work done, shared or not)

    def _put(self, head: bytes, params: Params) -> None:
        self._by_head[head] = params
        self._by_head.move_to_end(head)
        while len(self._by_head) > self.keep:
            self._by_head.popitem(last=False)

    def __len__(self) -> int:
        return len(self._by_head)

    def clear(self) -> None:
        """Forget every kept state (a caller about to rebuild them frees the memory first)."""
        self._by_head.clear()

    def put(self, head: bytes, params: Params) -> None:
        """Keep ``params`` as the parameters of ``head`` (a checkpoint, or the genesis again)."""
        self._put(head, params)

    def get(self, head: bytes) -> Params | None:
        p = self._by_head.get(head)
        if p is not None:
            self._by_head.move_to_end(head)
        return p

    def has(self, head: bytes) -> bool:
        return head in self._by_head

    def peek(self, head: bytes) -> Params | None:
        """``get`` without touching the LRU order: for readers on another thread than the one
        that moves the model (the daemon's status), which must not reorder what it evicts."""
        return self._by_head.get(head)

    def advance(self, base: ChainState, steps: Sequence[tuple[ChainState, Record]]) -> Params:
        """Parameters after applying ``steps`` to ``base`` (reusing any already computed)."""
        cur = self.get(base.head)
        if cur is None:
            raise KeyError(f"no parameters kept for head {base.head.hex()[:12]} (round {base.round})")
        for parent, rec in steps:
            from seedswarm.node.core.chain import record_hash

            child = record_hash(rec)
            nxt = self.get(child)
            if nxt is None:
                nxt = [p.clone() for p in cur]
                apply_record_(nxt, parent, rec, self.scale, self.momentum)
                self.applied += 1
                self._put(child, nxt)
            cur = nxt
        return cur


def bind_(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> torch.nn.Module:
    """Point a module's parameters at the given tensors (no copy): a replay state's first ones
    (after them come its momentum buffers, if any: ``momentum.py``)."""
    ps = list(model.parameters())
    if len(params) not in (len(ps), 2 * len(ps)):
        raise ValueError(f"{len(params)} tensors for a model of {len(ps)} parameters")
    for p, t in zip(ps, params[: len(ps)], strict=True):
        p.data = t
    return model
