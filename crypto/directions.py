"""Counter-based generator of the shared perturbation directions.

Every node regenerates the same ``K`` directions ``z_{r,k}`` of round ``r`` from a 64-bit seed
(DESIGN.md 1) and applies ``theta <- theta - eta * sum_k a_k z_k``. Replay determinism
(invariant 1) therefore needs a generator whose output is *bit-identical* on any CPU, any CUDA
device and in any process, and which can start at any element without generating the ones
before it (a node may hold the parameters in pieces; a trainer may project one tensor at a
time). ``torch.randn`` gives neither guarantee, so this module defines its own generator.

Definition (a protocol constant: changing any of it forks every existing chain)
-------------------------------------------------------------------------------
Element ``e`` (``e >= 0``) of stream ``s`` (a 64-bit integer) is::

    j    = e // 4, lane = e % 4
    x    = splitmix64_mix((s + j * GAMMA) mod 2**64)       # one 64-bit hash per 4 elements
    u    = (x >> (16 * lane)) & 0xFFFF                      # a 16-bit field of the hash
    z[e] = TABLE[u]

``splitmix64_mix`` is the finaliser of Steele, Lea and Flood's SplitMix64 (Stafford's
"Mix13" constants) and ``GAMMA = 0x9E3779B97F4A7C15`` its golden-ratio increment: the hashes
of a stream are SplitMix64's Weyl sequence through its finaliser (SplitMix64 seeded with ``s``
outputs ``mix(s + n * GAMMA)`` for n = 1, 2, ...; we start at n = 0). It uses only wrapping 64-bit
integer multiplication, xor and logical shifts; those are exact on every device (``>>`` on
``torch.int64`` is arithmetic, so each shift is followed by a mask that makes it logical).

``TABLE`` holds 65536 normal quantiles ``Phi^-1((i + 0.5) / 65536)``, made exactly
antisymmetric (so the mean is exactly 0), rescaled so that the table's own variance is 1, and
rounded to integer multiples of ``2**-20`` (every entry is then exact in float32: ``|q| < 2**23``).
The table's SHA-256 is pinned below and checked when the module is imported, so a platform
whose ``libm`` would round one entry differently fails loudly instead of forking silently.

Distribution and why
--------------------
``z`` is a *discrete* approximation of N(0, 1): 65536 equiprobable levels, mean exactly 0,
variance 1 (to 1.4e-9), tails truncated at about +-4.32 sigma (the outermost quantile; a
continuous normal exceeds that with probability 1.5e-5). Zeroth-order and projected-gradient
estimators only need ``E[z] = 0`` and ``E[z z^T] = I`` with light tails, which this has; in
exchange, mapping bits to a value is a table lookup instead of ``log``/``cos``/``erfinv``,
whose results differ by an ULP between CPU and CUDA libraries (and with FMA contraction), which
would make replay device-dependent. Four values per 64-bit hash amortise the hashing cost.

Applying directions
-------------------
``add_directions_`` computes, per element and in this order for ``k = 0, 1, ...``::

    w = c_k * z_k          # c_k = the Python float coefficient rounded once to the working dtype
    p = p + w              # one IEEE rounding per operation, no fused multiply-add

with working dtype float64 for float64 parameters and float32 for every other float dtype
(float16/bfloat16 parameters are upcast to float32 for the whole sum and rounded back once at
the end). The products are taken on the 65536-entry table (or on the gathered values for small
tensors; the IEEE product is the same) and the sums are plain additions, so the result does
not depend on chunking, threads, SIMD width, how the flat vector is split into tensors, or the
device: CPU and CUDA agree bit for bit (by construction; the ``gpu`` test checks it).

Speed
-----
Hashing, index extraction, the gather and the add are a dozen and a half torch ops per chunk
and direction, on cache-resident buffers. On CPU each op is kept below torch's parallel grain
and chunks are spread over a few Python threads instead (see ``_PIECE``): a contended core
then costs a share of throughput, not the 100x stall of an OpenMP team waiting for it.
``seedswarm bench replay`` measures it against ``torch.randn`` + ``add_``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from seedswarm.crypto.hashing import check_u64 as _check_u64
from seedswarm.crypto.hashing import stream_seed

__all__ = [
    "TABLE_BITS",
    "TABLE_SHA256",
    "directions",
    "fill_normal",
    "fill_many",
    "normal_table",
    "stream_seed",
]

_T = TypeVar("_T")
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

TABLE_BITS = 16
_TABLE_SIZE = 1 << TABLE_BITS
_LANES = 64 // TABLE_BITS  # 16-bit fields per 64-bit hash
_QUANT_BITS = 20  # table entries are integer multiples of 2**-20

#: SHA-256 of the quantised table as 65536 little-endian int32 (units of 2**-20).
TABLE_SHA256 = "7e27fb847e5ea7612eaaa0e2dbfd3118a4da8fa3feadbe2ca7dd619cb93e3d36"

# CPU execution. torch runs an elementwise op of >= 32768 elements (at::internal::GRAIN_SIZE)
# as an OpenMP team. Applying K directions is thousands of small ops, and when another process
# holds a core every team start waits for a descheduled thread: measured here, a 0.07 s replay
# took 30 s. So on CPU every op is cut into pieces below the grain (always single-threaded),
# and the cores are used by a small pool of Python threads working on different chunks (torch
# releases the GIL inside ops). A chunk's hashes are exactly one piece; its buffers (~2 MiB)
# stay in L2 while all K directions are applied to it.
_PIECE = 32764
_CPU_CHUNK = 4 * _PIECE
# GPUs have no such problem and want big launches.
_GPU_CHUNK = 1 << 22
# Below this many elements, multiply after the gather instead of scaling the whole table.
_SCALE_TABLE_MIN = _TABLE_SIZE // 4


def _s64(x: int) -> int:
    """An integer mod 2**64 as the signed int64 torch stores (two's complement)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


# --------------------------------------------------------------------------------------------
# The quantile table


def _build_table_ints() -> list[int]:
    """The table in units of 2**-20 (pure Python float64; see the module docstring)."""
    nd = statistics.NormalDist()
    half = _TABLE_SIZE // 2
    # Lower half from the quantile function, upper half mirrored: exact antisymmetry.
    lower = [nd.inv_cdf((i + 0.5) / _TABLE_SIZE) for i in range(half)]
    var = 2.0 * math.fsum(x * x for x in lower) / _TABLE_SIZE
    scale = (1 << _QUANT_BITS) / math.sqrt(var)
    q_lower = [round(x * scale) for x in lower]
    return q_lower + [-q for q in reversed(q_lower)]


def _table_digest(q: list[int]) -> str:
    return hashlib.sha256(b"".join(v.to_bytes(4, "little", signed=True) for v in q)).hexdigest()


_TABLE_INTS = _build_table_ints()
_TABLE_DIGEST = _table_digest(_TABLE_INTS)
if _TABLE_DIGEST != TABLE_SHA256:  # pragma: no cover - only on a platform with a deviant libm
    raise RuntimeError(
        "seedswarm.crypto.directions: the normal quantile table computed on this platform "
        f"has SHA-256 {_TABLE_DIGEST}, expected {TABLE_SHA256}; directions would not match "
        "other nodes. Please report this platform."
    )
_TABLE_CPU = (torch.tensor(_TABLE_INTS, dtype=torch.float64) * 2.0**-_QUANT_BITS).to(torch.float32)


def normal_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 65536-entry float32 table (a read-only copy on ``device``), for tests and tools."""
    return _table(
        torch.device("cpu") if device is None else torch.device(device), torch.float32
    ).clone()


_tables: dict[tuple[str, torch.dtype], torch.Tensor] = {}
_tables_lock = threading.Lock()


def _table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (str(device), dtype)
    t = _tables.get(key)
    if t is None:
        with _tables_lock:
            t = _tables.get(key)
            if t is None:
                # float32 -> float64 is exact, and every entry is exact in float32.
                t = _TABLE_CPU.to(dtype).to(device)
                _tables[key] = t
    return t


# --------------------------------------------------------------------------------------------
# The hash kernel


_LITTLE_ENDIAN = sys.byteorder == "little"


@functools.lru_cache(maxsize=64)
def _pieces(n: int, piece: int) -> tuple[tuple[int, int], ...]:
    """[start, end) ranges of at most ``piece`` elements covering ``range(n)``."""
    return tuple((a, min(n, a + piece)) for a in range(0, n, piece))


class _Workspace:
    """Preallocated buffers of one thread on one device (reused across calls: no allocator churn)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cpu = device.type == "cpu"
        self.chunk = _CPU_CHUNK if cpu else _GPU_CHUNK
        self.piece = _PIECE if cpu else self.chunk
        nh = self.chunk // _LANES + 2
        self.ramp = torch.arange(nh, dtype=torch.int64, device=device).mul_(_s64(_GAMMA))
        self.x = torch.empty(nh, dtype=torch.int64, device=device)
        self.t = torch.empty(nh, dtype=torch.int64, device=device)
        self.idx = torch.empty(self.chunk, dtype=torch.int64, device=device)
        self.w32 = torch.empty(self.chunk, dtype=torch.float32, device=device)
        self.st32 = torch.empty(_TABLE_SIZE, dtype=torch.float32, device=device)
        self.w64: torch.Tensor | None = None
        self.st64: torch.Tensor | None = None
        self.v64: torch.Tensor | None = None
        self._views: dict[tuple[int, int, str], _Views] = {}

    def f64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float64 buffers (gather, scaled table, projected vector), made on first use."""
        if self.w64 is None or self.st64 is None or self.v64 is None:
            self.w64 = torch.empty(self.chunk, dtype=torch.float64, device=self.device)
            self.st64 = torch.empty(_TABLE_SIZE, dtype=torch.float64, device=self.device)
            self.v64 = torch.empty(self.chunk, dtype=torch.float64, device=self.device)
        return self.w64, self.st64, self.v64

    def views(self, lead: int, m: int, mode: str) -> _Views:
        key = (lead, m, mode)
        v = self._views.get(key)
        if v is None:
            if len(self._views) >= 64:
                self._views.clear()
            v = self._views[key] = _Views(self, lead, m, mode)
        return v


class _Views:
    """Slices of a workspace's buffers for one (lead, m, mode). Slicing costs about a
    microsecond per view in torch; made once, they are reused for every direction."""

    __slots__ = ("copies", "idx", "lead", "m", "mask", "ramp", "t", "x")

    def __init__(self, ws: _Workspace, lead: int, m: int, mode: str) -> None:
        nh = (lead + m + 3) >> 2
        self.lead = lead
        self.m = m
        self.x = ws.x[:nh]
        self.t = ws.t[:nh]
        self.ramp = ws.ramp[:nh]
        self.idx = ws.idx[:m]
        self.mask = mode == "int16"
        self.copies: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
        if mode != "shift":
            # Little-endian: lane l's field is the l-th 16-bit word of the int64 in memory.
            # uint16 support varies by backend; int16 sign-extends and a mask undoes it.
            fields = self.x.view(torch.uint16 if mode == "uint16" else torch.int16)
            fields = fields[lead : lead + m]
            self.copies = tuple((self.idx[a:b], fields[a:b]) for a, b in _pieces(m, ws.piece))


_local = threading.local()


def _workspace(device: torch.device) -> _Workspace:
    cache: dict[str, _Workspace] | None = getattr(_local, "ws", None)
    if cache is None:
        cache = _local.ws = {}
    key = str(device)
    ws = cache.get(key)
    if ws is None:
        ws = cache[key] = _Workspace(device)
    return ws


# How 16-bit fields are turned into indices: None picks the fastest exact path for the
# device; tests set "int16" or "shift" to check that all paths agree bit for bit.
_INDEX_MODE: str | None = None
_M30 = (1 << 34) - 1
_M27 = (1 << 37) - 1
_M31 = (1 << 33) - 1
_MIX1_S = _s64(_MIX1)
_MIX2_S = _s64(_MIX2)


def _indices(ws: _Workspace, stream: int, offset: int, m: int) -> torch.Tensor:
    """int64 table indices of elements [offset, offset + m) of ``stream`` (m <= ws.chunk)."""
    mode = _INDEX_MODE
    if mode is None:
        mode = "shift" if not _LITTLE_ENDIAN else "uint16" if ws.device.type == "cpu" else "int16"
    v = ws.views(offset & 3, m, mode)
    x, t = v.x, v.t
    # x = s + j * GAMMA (mod 2**64), then the SplitMix64 finaliser with logical shifts.
    torch.add(v.ramp, _s64(stream + (offset >> 2) * _GAMMA), out=x)
    torch.bitwise_right_shift(x, 30, out=t)
    t.bitwise_and_(_M30)
    x.bitwise_xor_(t)
    x.mul_(_MIX1_S)
    torch.bitwise_right_shift(x, 27, out=t)
    t.bitwise_and_(_M27)
    x.bitwise_xor_(t)
    x.mul_(_MIX2_S)
    torch.bitwise_right_shift(x, 31, out=t)
    t.bitwise_and_(_M31)
    x.bitwise_xor_(t)
    if mode == "shift":
        # Byte-order independent reference: the fields by explicit shifts.
        lanes = torch.stack(
            [torch.bitwise_right_shift(x, 16 * lane) & 0xFFFF for lane in range(_LANES)], dim=1
        )
        v.idx.copy_(lanes.view(-1)[v.lead : v.lead + m])
        return v.idx
    for dst, src in v.copies:
        dst.copy_(src)
        if v.mask:
            dst.bitwise_and_(0xFFFF)
    return v.idx


# A pool of Python threads for CPU chunks (see _PIECE): made on first use, sized by
# torch.get_num_threads() up to _MAX_WORKERS (beyond that the GIL, held ~1 us per op, is the
# bottleneck), remade after a fork (a child inherits no threads).
_MAX_WORKERS = 8
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


_forked = False  # this process is a fork() child of one that had torch threads


def _forget_pool_after_fork() -> None:
    # A fork child inherits no threads, and a *new* thread in it that runs a torch op makes
    # torch re-initialise its intra-op pool, which fails an internal assert when the parent had
    # one ("Invalid thread pool!"). So a fork child computes every chunk in the calling thread.
    global _pool, _pool_size, _pool_lock, _forked
    _pool, _pool_size, _pool_lock, _forked = None, 0, threading.Lock(), True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _map_chunks(device: torch.device, fn: Callable[[int], _T], starts: Sequence[int]) -> list[_T]:
    """``[fn(s) for s in starts]``; on CPU spread over the pool (chunks are independent)."""
    global _pool, _pool_size
    workers = min(torch.get_num_threads(), _MAX_WORKERS)
    if device.type != "cpu" or workers < 2 or len(starts) < 2 or _forked:
        return [fn(s) for s in starts]
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="seedswarm-directions")
            _pool_size = workers
        pool = _pool
    return list(pool.map(fn, starts))


def _check_range(offset: int, numel: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if offset + numel > 1 << 62:
        raise ValueError("offset + numel must be at most 2**62")


def _device(device: Any) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # one cache key per GPU
    return dev


def fill_normal(stream: int, offset: int, numel: int, device: Any = None) -> torch.Tensor:
    """Elements ``[offset, offset + numel)`` of stream ``stream`` as a new float32 tensor.

    Element ``i`` is a pure function of ``(stream, offset + i)`` (module docstring), so any
    slice can be generated on its own and agrees bit for bit with the whole.
    """
    _check_u64("stream", stream)
    _check_range(offset, numel)
    dev = _device(device)
    out = torch.empty(numel, dtype=torch.float32, device=dev)
    if numel == 0:
        return out
    table = _table(dev, torch.float32)

    def chunk(cs: int) -> None:
        ws = _workspace(dev)
        m = min(ws.chunk, numel - cs)
        idx = _indices(ws, stream, offset + cs, m)
        torch.index_select(table, 0, idx, out=out[cs : cs + m])

    _map_chunks(dev, chunk, range(0, numel, _chunk_size(dev)))
    return out


def _chunk_size(device: torch.device) -> int:
    return _CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK


def directions(
    seed: int,
    k: int,
    shape: int | Sequence[int] | torch.Size,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> torch.Tensor:
    """Direction ``k`` of the round with seed ``seed``, shaped like a parameter."""
    dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    numel = math.prod(dims)
    return fill_normal(stream_seed(seed, k), 0, numel, device).view(dims).to(dtype)


def _check_streams(streams: Sequence[int]) -> list[int]:
    return [_check_u64(f"streams[{i}]", s) for i, s in enumerate(streams)]


# Below this many elements (directions × parameters) one vectorised pass over all directions
# beats per-direction chunks: a small model's round is otherwise dominated by per-op overhead.
_SMALL = 1 << 18


def fill_many(streams: Sequence[int], offset: int, numel: int, device: Any = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[len(streams), numel]``: row k equals ``fill_normal(streams[k], offset, numel)``.

    The same generator evaluated for all streams at once (a 2-D int64 pass); meant for small
    sizes, where per-direction operation overhead dominates.
    """
    stream_list = _check_streams(streams)
    _check_range(offset, numel)
    dev = _device(device)
    lead = offset & 3
    nh = (lead + numel + 3) >> 2
    base = torch.tensor([_s64(st + (offset >> 2) * _GAMMA) for st in stream_list], dtype=torch.int64, device=dev)
    ramp = torch.arange(nh, dtype=torch.int64, device=dev).mul_(_s64(_GAMMA))
    x = base[:, None] + ramp[None, :]
    x ^= torch.bitwise_right_shift(x, 30) & _M30
    x *= _MIX1_S
    x ^= torch.bitwise_right_shift(x, 27) & _M27
    x *= _MIX2_S
    x ^= torch.bitwise_right_shift(x, 31) & _M31
    lanes = torch.stack([torch.bitwise_right_shift(x, 16 * lane) & 0xFFFF for lane in range(_LANES)], dim=2)
    idx = lanes.view(len(stream_list), -1)[:, lead : lead + numel]
    return _table(dev, dtype)[idx]
