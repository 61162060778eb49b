"""``seedswarm bench lm_proxy``: its closed-form noise has the moments of the real projection,
and a run is deterministic and reports against a saved ``bench lm`` result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seedswarm.bench import lm_proxy
from seedswarm.bench.lm import QUICK_OPTIONS
from seedswarm.crypto.directions import fill_many

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def test_the_noise_has_the_moments_of_the_projection_on_the_swarms_directions() -> None:
    """Mean h and covariance (|h|^2 I + h h^T) / K, against (1/K) sum <h, z> z with z from the
    protocol's own generator (its table of quantiles, not exact Gaussians)."""
    d, k, n = 24, 6, 4000
    h = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    z = fill_many(list(range(1000, 1000 + n * k)), 0, d, dtype=torch.float64).view(n, k, d)
    real = torch.einsum("nkd,nk->nd", z, z @ h) / k
    gen = torch.Generator().manual_seed(3)
    proxy = torch.stack([lm_proxy.noisy_update(h, k, gen) for _ in range(n)])
    want = (h.dot(h) * torch.eye(d, dtype=torch.float64) + torch.outer(h, h)) / k
    for sample in (real, proxy):
        mean, cov = sample.mean(0), torch.cov(sample.T)
        assert float((mean - h).norm()) < 0.1 * float(h.norm())
        assert float(torch.trace(cov)) == pytest.approx(float(torch.trace(want)), rel=0.08)
        # the h h^T part: the variance along h is (|h|^2 + |h|^2) / K, twice a perpendicular one's
        u = h / h.norm()
        assert float(u @ cov @ u) == pytest.approx(float(u @ want @ u), rel=0.12)


def test_a_quick_run_is_deterministic_and_reports_against_adam(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "lm.json"
    saved.write_text(json.dumps({"adam_best_lr": 0.003, "adam_curves": {"0.003": [[0, 9.0], [4, 1.0]]}}))
    opts = [x for key, v in QUICK_OPTIONS.items() for x in ("--task-option", f"{key}={v}")]
    argv = [*opts, "--lr", "0.05", "--nodes", "8", "--trainers", "4", "--groups", "2", "--directions", "16",
            "--rounds", "4", "--eval-every", "2", "--adam-from", str(saved), "--json"]
    assert lm_proxy.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r for r, _ in first["curve"]] == [0, 2, 4] and not first["diverged"]
    assert first["adam_final_loss"] == 1.0  # Adam's loss at the same round
    initial = first["curve"][0][1]
    assert first["share_of_adam"] == pytest.approx((initial - first["final_loss"]) / (initial - 1.0))
    assert lm_proxy.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["curve"] == first["curve"]  # seeded: the same bits
    assert lm_proxy.main([*argv, "--noise-free"]) == 0
    assert json.loads(capsys.readouterr().out)["curve"] != first["curve"]  # the noise is there
    with pytest.raises(SystemExit):
        lm_proxy.main([*argv[:-1], "--rounds", "3"])  # Adam has no evaluation at round 3
