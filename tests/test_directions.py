"""The direction generator: determinism, the pinned protocol constants, statistics, apply/project.

The golden values below are protocol constants: if one of these tests fails, the generator's
output changed and every existing chain would replay to different parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
import torch

from seedswarm.crypto import directions as D
from seedswarm.crypto.directions import (
    directions,
    fill_normal,
    normal_table,
    stream_seed,
)
from seedswarm.crypto.projection import add_directions_, project

M64 = (1 << 64) - 1
GOLDEN_STREAM = 0x0123456789ABCDEF
GOLDEN_FILL_SHA256 = "0150f70075a03408c0d864e02dea3b8e95f2a8e523d5efbd6eb11d3ddad930ee"
GOLDEN_DIRECTIONS_SHA256 = "db141db0a4d9cc99aed5af412e82f3a9ea1874fed2a9cf4f87216992c74a9361"
GOLDEN_STREAM_SEED_42_3 = 10687393202095839435


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def mix(x: int) -> int:
    """SplitMix64's finaliser, in plain Python (the specification)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & M64
    return x ^ (x >> 31)


def reference(stream: int, offset: int, numel: int) -> list[float]:
    table = normal_table().tolist()
    out = []
    for e in range(offset, offset + numel):
        x = mix((stream + (e // 4) * 0x9E3779B97F4A7C15) & M64)
        out.append(table[(x >> (16 * (e % 4))) & 0xFFFF])
    return out


# ---------------------------------------------------------------------------- protocol constants


def test_splitmix64_known_vector() -> None:
    # SplitMix64 seeded with 1234567: first output (state = seed + GAMMA).
    assert mix((1234567 + 0x9E3779B97F4A7C15) & M64) == 6457827717110365317


def test_golden_outputs() -> None:
    assert stream_seed(42, 3) == GOLDEN_STREAM_SEED_42_3
    assert sha(fill_normal(GOLDEN_STREAM, 0, 4096)) == GOLDEN_FILL_SHA256
    assert sha(directions(42, 3, (10, 100))) == GOLDEN_DIRECTIONS_SHA256
    assert fill_normal(GOLDEN_STREAM, 0, 3).tolist() == [
        -1.4978713989257812,
        1.4100685119628906,
        -0.3927955627441406,
    ]


def test_table_properties() -> None:
    t = normal_table().double()
    assert t.shape == (65536,)
    assert bool((t[1:] > t[:-1]).all()), "strictly increasing quantiles"
    assert torch.equal(t, -t.flip(0)), "exactly antisymmetric"
    q = t * 2.0**20
    assert torch.equal(q, q.round()), "multiples of 2**-20"
    assert t.sum().item() == 0.0
    assert abs(t.pow(2).mean().item() - 1.0) < 1e-8
    assert 4.32 < t.max().item() < 4.33
    digest = hashlib.sha256(q.to(torch.int32).numpy().astype("<i4").tobytes()).hexdigest()
    assert digest == D.TABLE_SHA256


@pytest.mark.parametrize("stream", [0, 7, GOLDEN_STREAM, M64])
@pytest.mark.parametrize("offset", [0, 1, 3, 6, 2**40 + 5])
def test_matches_python_reference(stream: int, offset: int) -> None:
    assert fill_normal(stream, offset, 37).tolist() == reference(stream, offset, 37)


def test_index_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    want = fill_normal(GOLDEN_STREAM, 5, 10_001)
    for mode in ("uint16", "int16", "shift"):
        monkeypatch.setattr(D, "_INDEX_MODE", mode)
        assert torch.equal(fill_normal(GOLDEN_STREAM, 5, 10_001), want), mode


# ---------------------------------------------------------------------------- determinism


def test_identical_across_processes() -> None:
    code = (
        "import hashlib; from seedswarm.crypto.directions import directions;"
        "print(hashlib.sha256(directions(42, 3, (10, 100)).numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert out == sha(directions(42, 3, (10, 100))) == GOLDEN_DIRECTIONS_SHA256


def test_identical_across_calls() -> None:
    a = directions(9, 1, (333,))
    b = directions(9, 1, (333,))
    assert torch.equal(a, b)


def test_different_inputs_differ() -> None:
    base = directions(1, 0, (1000,))
    assert not torch.equal(base, directions(1, 1, (1000,)))
    assert not torch.equal(base, directions(2, 0, (1000,)))
    seeds = {stream_seed(s, k) for s in range(20) for k in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s <= M64 for s in seeds)
    # Neighbouring raw streams are unrelated too (no shifted copies).
    a, b = fill_normal(1, 0, 4000), fill_normal(2, 0, 4000)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.08


@pytest.mark.parametrize("a", [0, 1, 2, 3, 4, 5, 1023, 2**18 - 3])
def test_offset_slicing(a: int) -> None:
    n = 1000
    whole = fill_normal(77, 0, a + n)
    assert torch.equal(fill_normal(77, a, n), whole[a:])


def test_chunk_boundaries() -> None:
    n = 2 * D._CPU_CHUNK + 11
    whole = fill_normal(5, 3, n)
    parts = [fill_normal(5, 3 + s, min(100_003, n - s)) for s in range(0, n, 100_003)]
    assert torch.equal(torch.cat(parts), whole)


def test_directions_shape_and_dtype() -> None:
    z = directions(3, 4, (2, 3, 5), dtype=torch.float64)
    assert z.shape == (2, 3, 5) and z.dtype == torch.float64
    assert torch.equal(z.float().reshape(-1), fill_normal(stream_seed(3, 4), 0, 30))
    assert directions(3, 4, 7).shape == (7,)
    assert directions(3, 4, ()).shape == ()
    assert fill_normal(3, 0, 0).shape == (0,)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        stream_seed(-1, 0)
    with pytest.raises(ValueError):
        stream_seed(0, 1 << 64)
    with pytest.raises(ValueError):
        fill_normal(1, -1, 3)
    with pytest.raises(ValueError):
        fill_normal(1 << 64, 0, 3)
    with pytest.raises(ValueError):
        add_directions_([torch.zeros(3)], [1, 2], [0.5])
    with pytest.raises(ValueError):
        add_directions_([torch.zeros(3)], [1], [math.nan])
    with pytest.raises(TypeError):
        add_directions_([torch.zeros(3, dtype=torch.int32)], [1], [0.5])


# ---------------------------------------------------------------------------- statistics


N_STAT = 1 << 20


def test_moments() -> None:
    z = fill_normal(stream_seed(2024, 0), 0, N_STAT).double()
    mean = z.mean().item()
    c = z - mean
    var = c.pow(2).mean().item()
    skew = c.pow(3).mean().item() / var**1.5
    kurt = c.pow(4).mean().item() / var**2 - 3.0
    # ~5-6 standard errors: sqrt(1/n)=1e-3, sqrt(2/n)=1.4e-3, sqrt(6/n)=2.4e-3, sqrt(24/n)=4.8e-3
    assert abs(mean) < 5e-3
    assert abs(var - 1.0) < 7e-3
    assert abs(skew) < 1.5e-2
    assert abs(kurt) < 3e-2
    assert z.abs().max().item() < 4.33


def test_fields_uniform_per_lane() -> None:
    # Every 16-bit field (lane) of the hash must be uniform: chi-square over 64 buckets.
    z = fill_normal(stream_seed(7, 7), 0, N_STAT)
    u = torch.searchsorted(normal_table(), z)
    assert torch.equal(normal_table()[u], z)
    for lane in range(4):
        counts = torch.bincount(u[lane::4] >> 10, minlength=64).double()
        expect = counts.sum() / 64
        chi2 = ((counts - expect) ** 2 / expect).sum().item()
        assert chi2 < 63 + 6 * math.sqrt(2 * 63), (lane, chi2)  # dof 63, ~6 sigma


def test_no_correlation_between_directions_or_neighbours() -> None:
    n = 1 << 17
    zs = torch.stack([directions(11, k, (n,)) for k in range(8)]).double()
    corr = torch.corrcoef(zs)
    off_diag = corr[~torch.eye(8, dtype=torch.bool)]
    assert off_diag.abs().max().item() < 5.5 / math.sqrt(n)
    # Lags 1..8 inside one stream (lanes of one hash and neighbouring hashes).
    z = zs[0]
    for lag in range(1, 9):
        r = torch.dot(z[:-lag], z[lag:]).item() / (n - lag)
        assert abs(r) < 5.5 / math.sqrt(n), (lag, r)


# ---------------------------------------------------------------------------- apply and project


def _naive_add(
    flat: torch.Tensor, streams: list[int], coeffs: list[float], wdt: torch.dtype
) -> torch.Tensor:
    acc = flat.to(wdt).clone()
    for s, c in zip(streams, coeffs, strict=True):
        z = fill_normal(s, 0, flat.numel()).to(wdt)
        cw = torch.tensor(c, dtype=torch.float64).to(wdt)
        acc = acc + cw * z
    return acc


SHAPES = [(3, 5), (7,), (1,), (2, 2, 2), (70_001,), (64, 33)]


def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


STREAMS = [stream_seed(99, k) for k in range(5)]
COEFFS = [0.1, -1e-3, 3.3333333333, 0.0, -2.5e-5]


def test_add_directions_matches_naive_sum() -> None:
    params = _params()
    flat = torch.cat([p.reshape(-1) for p in params])
    add_directions_(params, STREAMS, COEFFS)
    want = _naive_add(flat, STREAMS, COEFFS, torch.float32)
    assert torch.equal(torch.cat([p.reshape(-1) for p in params]), want)


def test_add_directions_is_deterministic_and_split_invariant() -> None:
    a = _params()
    b = _params()
    add_directions_(a, STREAMS, COEFFS)
    add_directions_(b, STREAMS, COEFFS)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # The same flat vector as one tensor or as views that split it anywhere: same bits.
    whole = torch.cat([p.reshape(-1) for p in _params()])
    pieces = list(whole.clone().split([1, 2, 3, 5, 8, 70_000, whole.numel() - 70_019]))
    add_directions_([whole], STREAMS, COEFFS)
    add_directions_(pieces, STREAMS, COEFFS)
    assert torch.equal(torch.cat(pieces), whole)


def test_add_directions_chunked_large_param() -> None:
    n = D._CPU_CHUNK + 1001
    p = torch.zeros(n)
    add_directions_([p], STREAMS[:2], COEFFS[:2])
    assert torch.equal(p, _naive_add(torch.zeros(n), STREAMS[:2], COEFFS[:2], torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_add_directions_dtypes(dtype: torch.dtype) -> None:
    params = _params(dtype)
    flat = torch.cat([p.reshape(-1) for p in params])
    add_directions_(params, STREAMS, COEFFS)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    want = _naive_add(flat, STREAMS, COEFFS, wdt).to(dtype)
    got = torch.cat([p.reshape(-1) for p in params])
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_add_directions_noncontiguous_and_requires_grad() -> None:
    base = torch.randn(6, 9)
    t = base.clone().t()  # non-contiguous view; flat order is its logical (row-major) order
    assert not t.is_contiguous()
    want = _naive_add(t.reshape(-1), STREAMS, COEFFS, torch.float32).view(9, 6)
    add_directions_([t], STREAMS, COEFFS)
    assert torch.equal(t, want)
    w = torch.nn.Parameter(torch.zeros(10))
    add_directions_([w], STREAMS[:1], [1.0])
    assert torch.equal(w.detach(), fill_normal(STREAMS[0], 0, 10))


def test_project_matches_float64_dot() -> None:
    params = _params()
    params.append(torch.randn(5, dtype=torch.float64))
    flat = torch.cat([p.reshape(-1).double() for p in params])
    got = project(params, STREAMS)
    for s, g in zip(STREAMS, got, strict=True):
        want = torch.dot(flat, fill_normal(s, 0, flat.numel()).double()).item()
        assert g == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert project(params, []) == []


def test_project_is_adjoint_of_add() -> None:
    # <project(v), a> == <v, sum_k a_k z_k>: the two halves of the protocol agree on directions.
    v = [torch.randn(100, 3, dtype=torch.float64), torch.randn(17, dtype=torch.float64)]
    a = [0.5, -0.25, 2.0]
    delta = [torch.zeros_like(t) for t in v]
    add_directions_(delta, STREAMS[:3], a)
    lhs = sum(x * y for x, y in zip(project(v, STREAMS[:3]), a, strict=True))
    rhs = sum(torch.dot(x.reshape(-1), d.reshape(-1)).item() for x, d in zip(v, delta, strict=True))
    assert lhs == pytest.approx(rhs, rel=1e-12)


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is false")
    for offset, n in [(0, 4096), (3, 1001), (2**33 + 1, 50_000), (0, D._GPU_CHUNK + 5)]:
        cpu = fill_normal(GOLDEN_STREAM, offset, n)
        gpu = fill_normal(GOLDEN_STREAM, offset, n, device="cuda")
        assert torch.equal(gpu.cpu(), cpu), (offset, n)
    assert sha(fill_normal(GOLDEN_STREAM, 0, 4096, device="cuda")) == GOLDEN_FILL_SHA256
    for dtype in (torch.float32, torch.float16, torch.float64):
        cpu_params = _params(dtype)
        gpu_params = [p.cuda() for p in cpu_params]
        add_directions_(cpu_params, STREAMS, COEFFS)
        add_directions_(gpu_params, STREAMS, COEFFS)
        for c, g in zip(cpu_params, gpu_params, strict=True):
            assert torch.equal(g.cpu(), c), dtype
    got = project([p.cuda() for p in _params()], STREAMS)
    want = project(_params(), STREAMS)
    assert got == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------- benchmark


def test_bench_replay_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from seedswarm.bench import replay

    assert replay.main(["--params", "5000", "--directions", "3", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    r = json.loads(out)
    for key in (
        "params_per_second",
        "baseline_params_per_second",
        "ratio",
        "params",
        "directions",
        "device",
        "torch_threads",
        "torch_version",
    ):
        assert key in r
    assert r["params"] == 5000 and r["directions"] == 3 and r["device"] == "cpu"
    assert replay.main(["--params", "100", "--directions", "1", "--repeats", "1"]) == 0
    assert "ratio" in capsys.readouterr().out
    assert replay.main(["--params", "0", "--directions", "1"]) == 2


def test_add_directions_many_small_and_mixed_dtypes() -> None:
    # Runs of small tensors are processed together; mixed dtypes break the runs. Each tensor
    # must still get exactly what it would get alone at its flat offset.
    g = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.float16, torch.float32, torch.float64, torch.bfloat16]
    params = [torch.randn(3 + 5 * i, generator=g).to(dtypes[i % 5]) for i in range(40)]
    params.insert(20, torch.randn(70_000, generator=g))
    expected = []
    offset = 0
    for p in params:
        wdt = torch.float64 if p.dtype == torch.float64 else torch.float32
        acc = p.reshape(-1).to(wdt)
        for s, c in zip(STREAMS, COEFFS, strict=True):
            cw = torch.tensor(c, dtype=torch.float64).to(wdt)
            acc = acc + cw * fill_normal(s, offset, p.numel()).to(wdt)
        expected.append(acc.to(p.dtype))
        offset += p.numel()
    add_directions_(params, STREAMS, COEFFS)
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p, e)
    got = project(params, STREAMS[:2])
    flat = torch.cat([p.reshape(-1).double() for p in params])
    for s, v in zip(STREAMS[:2], got, strict=True):
        assert v == pytest.approx(torch.dot(flat, fill_normal(s, 0, flat.numel()).double()).item())


def test_thread_pool_and_serial_agree() -> None:
    n = 3 * D._CPU_CHUNK + 17
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = torch.zeros(n)
        add_directions_([serial], STREAMS, COEFFS)
        z1 = fill_normal(3, 1, n)
        p1 = project([serial], STREAMS)
        torch.set_num_threads(2)
        pooled = torch.zeros(n)
        add_directions_([pooled], STREAMS, COEFFS)
        assert torch.equal(pooled, serial)
        assert torch.equal(fill_normal(3, 1, n), z1)
        assert project([pooled], STREAMS) == p1
    finally:
        torch.set_num_threads(before)


def _child_fill(q: Any) -> None:
    q.put(sha(fill_normal(GOLDEN_STREAM, 0, 2 * D._CPU_CHUNK)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_works_after_fork() -> None:
    # The parent has used its thread pool; a forked child must not wait on dead threads.
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        want = sha(fill_normal(GOLDEN_STREAM, 0, 2 * D._CPU_CHUNK))
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        proc = ctx.Process(target=_child_fill, args=(q,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0, "child hung or failed"
        assert q.get(timeout=5) == want
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("chunk", "piece"), [(1 << 22, 1 << 22), (4096, 1024), (4 * 1000, 1000)])
def test_chunking_does_not_change_results(
    monkeypatch: pytest.MonkeyPatch, chunk: int, piece: int
) -> None:
    # GPU-like single big pieces and tiny chunks must give the bits of the default CPU layout.
    params = _params()
    want = [p.clone() for p in params]
    add_directions_(want, STREAMS, COEFFS)
    z_want = fill_normal(5, 3, 20_000)
    p_want = project(params, STREAMS)
    monkeypatch.setattr(D, "_CPU_CHUNK", chunk)
    monkeypatch.setattr(D, "_PIECE", piece)
    got: dict[str, Any] = {}

    def work() -> None:  # a fresh thread gets fresh workspaces with the patched sizes
        torch.set_num_threads(1)
        ps = [p.clone() for p in params]
        add_directions_(ps, STREAMS, COEFFS)
        got.update(params=ps, z=fill_normal(5, 3, 20_000), proj=project(params, STREAMS))

    before = torch.get_num_threads()
    try:
        th = threading.Thread(target=work)
        th.start()
        th.join()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(got["params"], want, strict=True))
    assert torch.equal(got["z"], z_want)
    assert got["proj"] == pytest.approx(p_want, rel=1e-12)


def test_direction_cache_gives_the_same_projections_and_respects_its_budget() -> None:
    """The simulator's kept direction matrices: same sums (up to summation order), bounded memory."""
    from seedswarm.crypto import projection

    g = [torch.randn(70_000, generator=torch.Generator().manual_seed(1)), torch.randn(3, 100)]
    streams = [11, 12, 13, 14, 15]  # 5 x 70,300 elements: over _SMALL, so the chunked path
    plain = projection.project(g, streams)
    one = len(streams) * 70_300 * projection.CACHE_BYTES_PER_ELEMENT
    old = projection.set_direction_cache(one + one // 2)  # room for one matrix, not two
    # A kept matrix is float32 and so is a float32 vector's product: sums of 70k terms of about
    # 1 agree to float32 rounding; a float64 vector is summed in float64.
    close = {"rel": 1e-5, "abs": 1e-3}
    try:
        assert projection.project(g, streams) == pytest.approx(plain, **close)
        assert len(projection._blocks) == 1
        assert next(iter(projection._blocks.values())).dtype == torch.float32
        cached = projection.project(g, streams)  # served from the kept matrix
        assert cached == pytest.approx(plain, **close)
        wide = [t.double() for t in g]
        assert projection.project(wide, streams) == pytest.approx(plain, rel=1e-10, abs=1e-9)
        projection.project(g, [21, 22, 23, 24, 25])  # a second matrix evicts the first
        assert len(projection._blocks) == 1 and next(iter(projection._blocks))[0] == (21, 22, 23, 24, 25)
        assert projection.project(g, list(range(40))) == pytest.approx(
            [projection.project(g, [s])[0] for s in range(40)], **close)  # over budget: not kept
        assert all(k[0] != tuple(range(40)) for k in projection._blocks)
    finally:
        projection.set_direction_cache(old)
    assert not projection._blocks and projection.project(g, streams) == plain
    with pytest.raises(ValueError):
        projection.set_direction_cache(-1)


def test_simulator_keeps_every_groups_direction_matrix_or_none() -> None:
    from seedswarm.sim.runner import SimConfig, direction_budget

    cfg = SimConfig(directions=256, groups=4, direction_cache_mb=2048)
    one = 256 * 842_496 * 4  # one group's float32 matrix: 0.86 GB
    assert direction_budget(cfg, 842_496) == 0  # four of them do not fit: keeping one would thrash
    assert direction_budget(SimConfig(directions=256, groups=1, direction_cache_mb=2048), 842_496) == 2048 << 20
    assert direction_budget(SimConfig(directions=256, groups=4, direction_cache_mb=8192), 842_496) >= 4 * one
