"""The lm memory benchmark runs and reports every step (its figures are in docs/lm.md; no
memory target is asserted here: targets belong in benchmarks, not in unit tests)."""

from __future__ import annotations

from seedswarm.bench.lm_memory import DEFAULT_CONFIG, KINDS, main, measure
from seedswarm.node.learn.gpt import GPTConfig, gpt_param_count


def test_the_default_model_is_big_enough_for_the_claim() -> None:
    assert gpt_param_count(DEFAULT_CONFIG) >= 50_000_000
    assert GPTConfig(layers=8, width=768, heads=12, context=128) == DEFAULT_CONFIG


def test_measure_on_a_tiny_gpt() -> None:
    r = measure(layers=1, width=32, heads=2, context=16, batch=2, directions=4)
    assert r["params"] == gpt_param_count(GPTConfig(layers=1, width=32, heads=2, context=16))
    assert set(r["measurements"]) == set(KINDS)
    for kind, m in r["measurements"].items():
        assert m["peak_mb"] > 0 and m["seconds"] >= 0, kind
        assert set(m) == {"peak_mb", "seconds", "over_baseline_mb"}
    peaks = {k: m["peak_mb"] for k, m in r["measurements"].items()}
    assert peaks["adam"] >= peaks["inference"]
    assert set(r["ratios"]) == {"zo_over_adam", "fo_over_adam", "inference_over_adam"}
    assert all(v > 0 for v in r["ratios"].values())


def test_a_bad_option_is_an_error_not_a_traceback(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--width", "30", "--heads", "4"]) == 2
    assert "multiple of 'heads'" in capsys.readouterr().err
