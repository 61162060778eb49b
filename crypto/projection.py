"""Applying and projecting directions: ``θ += Σ c_k z_k`` and ``<v, z_k>`` without materialising z.

The generator itself (the quantile table, the counter-based hash, ``fill_normal``) is
``crypto.directions``; this module walks the parameters in fixed-size chunks, regenerates each
chunk of every direction once, and applies or projects it, so memory stays at a few buffers per
thread whatever the model size, and the result is bit-identical for identical inputs on the same
device class (the order of operations is fixed; see ``crypto.directions`` for why CPU chunks are
cut below torch's parallel grain).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from seedswarm.crypto import directions as _gen
from seedswarm.crypto.directions import (
    _SCALE_TABLE_MIN,
    _SMALL,
    _TABLE_SIZE,
    _check_range,
    _check_streams,
    _chunk_size,
    _indices,
    _map_chunks,
    _pieces,
    _table,
    _workspace,
    fill_many,
)

__all__ = ["CACHE_BYTES_PER_ELEMENT", "add_directions_", "project", "set_direction_cache"]


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"parameters must be floating point, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


# Tensors smaller than this are gathered into one working buffer with their neighbours, so
# that a model with hundreds of small tensors (biases, norms) costs one pass per direction, not
# one per tensor; the arithmetic per element is the same either way.
_GROUP_MAX = 1 << 16


def _segments(tensors: Sequence[torch.Tensor], wdt_of: Any) -> list[tuple[int, list[torch.Tensor]]]:
    """Split tensors into (flat offset, run) pieces: a large tensor alone, or a run of
    consecutive small tensors on the same device with the same working dtype."""
    out: list[tuple[int, list[torch.Tensor]]] = []
    offset = 0
    run: list[torch.Tensor] = []
    run_off = 0
    run_size = 0
    for t in tensors:
        n = t.numel()
        if n == 0:
            continue
        small = n < _GROUP_MAX
        if run and (
            not small
            or run_size + n > _gen._CPU_CHUNK  # read at call time (tests change it)
            or t.device != run[0].device
            or wdt_of(t.dtype) != wdt_of(run[0].dtype)
        ):
            out.append((run_off, run))
            run = []
        if small:
            if not run:
                run_off, run_size = offset, 0
            run.append(t)
            run_size += n
        else:
            out.append((offset, [t]))
        offset += n
    if run:
        out.append((run_off, run))
    _check_range(0, offset)
    return out


def add_directions_(
    params: Sequence[torch.Tensor], streams: Sequence[int], coeffs: Sequence[float],
    scale: Sequence[torch.Tensor] | None = None,
) -> None:
    """In place: ``params += sum_k coeffs[k] * (s * z_k)`` over the flat concatenation of ``params``.

    Parameter ``j`` covers flat offsets ``[off_j, off_j + numel_j)`` of every stream, with
    ``off_j`` the total size of the parameters before it (in each tensor's logical row-major
    order). The order of operations is fixed (module docstring): identical inputs give
    bit-identical parameters, however the vector is split into tensors, on CPU and CUDA alike.

    ``scale`` (None: all ones) is one tensor per parameter, of its size, holding powers of two
    (``node/learn/precondition.py`` makes them): each product ``fl(c_k z_k)`` is multiplied by
    its element's scale, which is exact in binary floating point (it only moves the exponent),
    so the scaled sum is as bit-identical as the plain one. A scale that is not a power of two
    would still give a deterministic result on one device, but is not what replay promises.
    """
    stream_list = _check_streams(streams)
    if len(stream_list) != len(coeffs):
        raise ValueError(f"{len(stream_list)} streams but {len(coeffs)} coefficients")
    scale_of = _scale_map(params, scale)
    coeff_list = [float(c) for c in coeffs]
    for c in coeff_list:
        if not math.isfinite(c):
            raise ValueError(f"coefficient {c!r} is not finite")
    for p in params:
        _working_dtype(p.dtype)
    if not stream_list:
        return
    rounded = {dt: [_round_to(c, dt) for c in coeff_list] for dt in (torch.float32, torch.float64)}
    total = sum(p.numel() for p in params)
    small = total * len(stream_list) <= _SMALL
    with torch.no_grad():
        for offset, run in _segments(params, _working_dtype):
            wdt = _working_dtype(run[0].dtype)
            if small:
                # Same operations in the same order (p = fl(p + fl(c_k z_k)) for k = 0, 1, ...),
                # with all directions generated in one pass.
                work = torch.cat([t.detach().reshape(-1).to(wdt) for t in run])
                z = fill_many(stream_list, offset, work.numel(), work.device, wdt)
                sc = _run_scale(run, scale_of, work.device)
                for k, c in enumerate(rounded[wdt]):
                    work.add_(z[k] * c if sc is None else (z[k] * c).mul_(sc))
                pos = 0
                for t in run:
                    n = t.numel()
                    t.detach().copy_(work[pos : pos + n].view(t.shape))
                    pos += n
                continue
            sc = _run_scale(run, scale_of, run[0].device)
            if len(run) == 1 and run[0].dtype == wdt and run[0].is_contiguous():
                # The common case: a float32 (or float64) tensor updated in place.
                _apply_flat(run[0].detach().view(-1), offset, stream_list, rounded[wdt], sc)
                continue
            # Otherwise a working copy in the working dtype, rounded back once at the end.
            work = torch.cat([t.detach().reshape(-1).to(wdt) for t in run])
            _apply_flat(work, offset, stream_list, rounded[wdt], sc)
            pos = 0
            for t in run:
                n = t.numel()
                t.detach().copy_(work[pos : pos + n].view(t.shape))
                pos += n


def _scale_map(params: Sequence[torch.Tensor], scale: Sequence[torch.Tensor] | None) -> dict[int, torch.Tensor] | None:
    """Each parameter's scale by ``id`` (None: no scale), checked for count and sizes."""
    if scale is None:
        return None
    if len(scale) != len(params):
        raise ValueError(f"{len(scale)} scale tensors for {len(params)} parameters")
    out: dict[int, torch.Tensor] = {}
    for j, (p, sc) in enumerate(zip(params, scale, strict=True)):
        if sc.numel() != p.numel() or not sc.dtype.is_floating_point:
            raise ValueError(f"scale {j} has {sc.numel()} {sc.dtype} elements for a parameter of {p.numel()}")
        out[id(p)] = sc
    return out


def _run_scale(run: list[torch.Tensor], scale_of: dict[int, torch.Tensor] | None,
               device: torch.device) -> torch.Tensor | None:
    """The flat scale of a run of parameters, on ``device`` (None: no scale)."""
    if scale_of is None:
        return None
    parts = [scale_of[id(t)].detach().reshape(-1) for t in run]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return flat.to(device)


def _round_to(c: float, dtype: torch.dtype) -> float:
    """``c`` rounded once (IEEE round-to-nearest-even) to ``dtype``; exact as a Python float."""
    return float(torch.tensor(c, dtype=torch.float64).to(dtype).item())


def _apply_flat(flat: torch.Tensor, offset: int, streams: list[int], coeffs: list[float],
                dscale: torch.Tensor | None = None) -> None:
    """``flat[i] = fl(flat[i] + fl(c_k * z_k[offset + i]) * dscale[i])`` for k in order (the scale
    product is exact: powers of two); ``flat`` is a contiguous 1-D tensor of the working dtype
    and ``coeffs`` are already rounded to it."""
    wdt = flat.dtype
    dev = flat.device
    table = _table(dev, wdt)
    n = flat.numel()

    # 0-dim tensors: a Python scalar would be wrapped into a tensor again on every call.
    cts = [torch.tensor(c, dtype=wdt) for c in coeffs]

    def chunk(cs: int) -> None:
        ws = _workspace(dev)
        m = min(ws.chunk, n - cs)
        if wdt == torch.float32:
            wbuf, stbuf = ws.w32, ws.st32
        else:
            wbuf, stbuf, _ = ws.f64()
        acc = flat[cs : cs + m]
        w = wbuf[:m]
        adds = [(acc[a:b], w[a:b]) for a, b in _pieces(m, ws.piece)]
        muls = [] if dscale is None else [(w[a:b], dscale[cs + a : cs + b]) for a, b in _pieces(m, ws.piece)]
        scale = [(table[a:b], stbuf[a:b]) for a, b in _pieces(_TABLE_SIZE, ws.piece)]
        scale_table = m >= _SCALE_TABLE_MIN
        for s, c in zip(streams, cts, strict=True):
            idx = _indices(ws, s, offset + cs, m)
            # fl(c * z) is the same IEEE product whether taken on the table or after the gather.
            if scale_table:
                for src, dst in scale:
                    torch.mul(src, c, out=dst)
                torch.index_select(stbuf, 0, idx, out=w)
            else:
                torch.index_select(table, 0, idx, out=w)
                w.mul_(c)
            for dst, sc in muls:
                dst.mul_(sc)
            for dst, src in adds:
                dst.add_(src)

    _map_chunks(dev, chunk, range(0, n, _chunk_size(dev)))


@functools.lru_cache(maxsize=4)
def _small_directions(streams: tuple[int, ...], numel: int, device: torch.device) -> torch.Tensor:
    """The float64 direction matrix of a small projection, kept for the round's other trainers.

    Every trainer of a round projects on the same streams, so a process that hosts several (the
    simulator) generates them once. At most ``_SMALL`` elements (2 MiB) per entry; never mutated.
    """
    return fill_many(streams, 0, numel, device, torch.float64)


#: Bytes per element of a kept direction matrix (float32: every table entry is exact there).
CACHE_BYTES_PER_ELEMENT = 4
_block_budget = 0
_blocks: OrderedDict[tuple[tuple[int, ...], int, torch.device], torch.Tensor] = OrderedDict()


def set_direction_cache(budget_bytes: int) -> int:
    """Let :func:`project` keep whole direction matrices, up to ``budget_bytes`` in all
    (:data:`CACHE_BYTES_PER_ELEMENT` per element).

    Off (0) by default: a daemon hosts one trainer, which projects each round's directions once.
    The simulator hosts every trainer of a round, and they all project on the same streams: with
    the matrix kept, the 15 others do one matrix-vector product instead of regenerating the
    directions (at 842k parameters and K=256: 0.2 s instead of 1.4 s each). Returns the previous
    budget; a budget of 0 also drops what is kept.

    The matrix is kept in float32, which holds every table entry exactly, so a K = 4,096 round
    of the 842k-parameter GPT fits in 14 GB instead of 28; a float32 vector is projected with a
    float32 matrix-vector product (sums good to about 1e-7 relative, far below the one-byte
    quantiser's step), anything wider in float64, a slice of rows at a time.
    """
    global _block_budget
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, not {budget_bytes!r}")
    old, _block_budget = _block_budget, budget_bytes
    _evict(0)
    return old


def _evict(room: int) -> None:
    while _blocks and sum(z.numel() * CACHE_BYTES_PER_ELEMENT for z in _blocks.values()) + room > _block_budget:
        _blocks.popitem(last=False)


def _cached_block(streams: tuple[int, ...], numel: int, device: torch.device) -> torch.Tensor | None:
    """The rows ``z_k`` of ``streams`` over ``numel`` elements (float32: the table's exact values,
    the same numbers :func:`_project_flat` multiplies by), or None when over the budget."""
    need = len(streams) * numel * CACHE_BYTES_PER_ELEMENT
    if need > _block_budget:
        return None
    key = (streams, numel, device)
    z = _blocks.get(key)
    if z is None:
        _evict(need)
        z = torch.empty(len(streams), numel, dtype=torch.float32, device=device)
        table = _table(device, torch.float32)
        ws = _workspace(device)
        for k, s in enumerate(streams):
            for cs in range(0, numel, ws.chunk):
                m = min(ws.chunk, numel - cs)
                torch.index_select(table, 0, _indices(ws, s, cs, m), out=z[k, cs : cs + m])
        _blocks[key] = z
    _blocks.move_to_end(key)
    return z


def project(tensors: Sequence[torch.Tensor], streams: Sequence[int]) -> list[float]:
    """``<v, z_k>`` for each stream, ``v`` the flat concatenation of ``tensors`` (float64 sums).

    Every product is exact in float64 (a float32 value times a table entry); the order of the
    sums inside a chunk is torch's. Trainers quantise the result to one byte, so it need not
    be bit-identical across machines, unlike ``add_directions_``.
    """
    stream_list = _check_streams(streams)
    for t in tensors:
        if not t.dtype.is_floating_point:
            raise TypeError(f"tensors must be floating point, got {t.dtype}")
    sums = [0.0] * len(stream_list)
    if not stream_list:
        return sums
    total = sum(t.numel() for t in tensors)
    if total * len(stream_list) <= _SMALL and tensors:
        with torch.no_grad():
            dev = tensors[0].device
            v = torch.cat([t.detach().reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors])
            z = _small_directions(tuple(stream_list), total, dev)
            return [float(x) for x in (z * v).sum(dim=1).tolist()]
    dev = tensors[0].device if tensors else torch.device("cpu")
    block = _cached_block(tuple(stream_list), total, dev) if tensors and _block_budget else None
    if block is not None:
        # The same table values, summed by a matrix-vector product instead of by pieces: equal up
        # to rounding (set_direction_cache says how much; the result is quantised to a byte).
        with torch.no_grad():
            if all(t.dtype == torch.float32 for t in tensors):
                v32 = torch.cat([t.detach().reshape(-1).to(dev) for t in tensors])
                return [float(x) for x in torch.mv(block, v32).tolist()]
            v = torch.cat([t.detach().reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors])
            rows = max(1, _chunk_size(dev) // max(1, v.numel()))
            return [float(x) for r in range(0, block.shape[0], rows)
                    for x in torch.mv(block[r : r + rows].to(torch.float64), v).tolist()]
    with torch.no_grad():
        for offset, run in _segments(tensors, lambda _dt: torch.float64):
            flat = (
                torch.cat([t.detach().reshape(-1) for t in run])
                if len(run) > 1
                else run[0].detach().reshape(-1)
            )
            _project_flat(flat, offset, stream_list, sums)
    return sums


def _project_flat(flat: torch.Tensor, offset: int, streams: list[int], sums: list[float]) -> None:
    dev = flat.device
    table = _table(dev, torch.float64)
    n = flat.numel()

    def chunk(cs: int) -> list[float]:
        ws = _workspace(dev)
        m = min(ws.chunk, n - cs)
        w64, _, v64 = ws.f64()
        pieces = _pieces(m, ws.piece)
        vc = v64[:m]
        w = w64[:m]
        for a, b in pieces:
            vc[a:b].copy_(flat[cs + a : cs + b])
        parts = []
        for s in streams:
            idx = _indices(ws, s, offset + cs, m)
            torch.index_select(table, 0, idx, out=w)
            for a, b in pieces:  # products exact in float64; sums of pieces below the grain
                parts.append(w[a:b].mul_(vc[a:b]).sum())
        per_piece = torch.stack(parts).view(len(streams), len(pieces)).tolist()  # one sync
        return [math.fsum(row) for row in per_piece]

    for partial in _map_chunks(dev, chunk, range(0, n, _chunk_size(dev))):
        for i, x in enumerate(partial):
            sums[i] += x
