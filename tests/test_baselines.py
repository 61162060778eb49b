"""Baselines (``modest``, ``dpsgd``) in the simulator harness, and ``seedswarm bench protocols``.

What matters for the comparison: the baselines really move full models (every model message is at
least 4 bytes per parameter, and the receiver trains on what it decoded), the byte totals are the
sum of the messages delivered, runs are deterministic from the seed, and they train.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from seedswarm.bench import protocols as bench
from seedswarm.node.learn.tasks import digits_param_count, load_task
from seedswarm.sim.baselines import (
    BaselineError,
    ModelMessage,
    regular_graph,
    run_baseline,
)
from seedswarm.sim.runner import SimConfig, run

TINY = {"hidden": 8}  # 610 parameters: fast, still learns digits


def _cfg(protocol: str, **kw: Any) -> SimConfig:
    base: dict[str, Any] = {"protocol": protocol, "nodes": 12, "rounds": 12, "trainers": 4, "task_options": TINY,
                            "local_lr": 0.5, "eval_every": 4, "quiet": True}
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize("protocol", ["modest", "dpsgd"])
def test_bytes_are_the_messages_sent_and_carry_full_models(protocol: str) -> None:
    sent: list[tuple[str, int, int, bytes]] = []
    s = run_baseline(_cfg(protocol), on_send=lambda k, a, b, data: sent.append((k, a, b, data)))
    d = digits_param_count(TINY["hidden"])
    assert s["params"] == d
    assert sent and s["messages"] == len(sent)
    assert s["total_bytes"] == sum(len(m[3]) for m in sent)
    for kind, total in s["bytes_by_kind"].items():
        assert total == sum(len(m[3]) for m in sent if m[0] == kind)
    for _kind, src, dst, data in sent:
        assert len(data) >= 4 * d  # a full fp32 model, not a summary of one
        assert src != dst
        assert ModelMessage.decode(data, d).vector().shape == (d,)
    assert s["bytes_per_model_message"] >= 4 * d
    # every delivery counted at the receiver too
    assert s["bytes_per_node_per_round"] * s["nodes"] * s["rounds"] == pytest.approx(s["total_bytes"])
    if protocol == "modest":
        kinds = {m[0] for m in sent}
        assert kinds == {"TrainedModel", "AggregatedModel"}
        # each trainer sends its model to both aggregators every round (to itself in memory when
        # it is also an aggregator: those hand-overs are not network bytes)
        assert s["bytes_per_model_message"] < s["bytes_per_trainer_per_round"] <= 2 * s["bytes_per_model_message"]
    else:
        assert {m[0] for m in sent} == {"NeighbourModel"}
        assert s["bytes_per_trainer_per_round"] == pytest.approx(4 * s["bytes_per_model_message"])


def test_modest_trains_on_the_decoded_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupting the payload on the wire must change the outcome: the bytes are what is used."""
    clean = run_baseline(_cfg("modest", rounds=4, eval_every=1))
    real_encode = ModelMessage.encode

    def zero_payload(self: ModelMessage) -> bytes:
        return real_encode(ModelMessage(self.kind, self.run, self.round, self.sender, bytes(len(self.payload))))

    monkeypatch.setattr(ModelMessage, "encode", zero_payload)
    broken = run_baseline(_cfg("modest", rounds=4, eval_every=1))
    assert broken["total_bytes"] == clean["total_bytes"]
    assert broken["final_loss"] != clean["final_loss"]


@pytest.mark.parametrize("protocol", ["modest", "dpsgd"])
def test_deterministic_from_seed_and_learns(protocol: str) -> None:
    a = run(_cfg(protocol))
    b = run(_cfg(protocol))
    c = run(_cfg(protocol, seed=1))
    for k in ("final_accuracy", "final_loss", "total_bytes", "virtual_seconds", "honest_digest_agreement"):
        assert a[k] == b[k], k
    assert a["final_loss"] != c["final_loss"]
    task = load_task("digits", TINY, seed=0)
    init = task.evaluate(task.build_model())
    assert a["final_accuracy"] > init["accuracy"] + 0.2
    assert a["final_loss"] < init["loss"]


def test_summary_keys_and_files_match_seedswarm(tmp_path: Any) -> None:
    ss = run(SimConfig(nodes=8, rounds=3, trainers=3, directions=8, task_options=TINY, quiet=True))
    out = tmp_path / "modest"
    mo = run(_cfg("modest", rounds=3, out=str(out)))
    assert set(ss) <= set(mo)
    assert json.loads((out / "summary.json").read_text())["protocol"] == "modest"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("bytes_total" in json.loads(x) for x in lines)
    assert (out / "accuracy_vs_round.png").exists() and (out / "accuracy_vs_bytes.png").exists()


def test_modest_sends_nothing_to_nodes_outside_the_sample() -> None:
    receivers: set[int] = set()
    s = run_baseline(_cfg("modest", nodes=40, rounds=2, trainers=3),
                     on_send=lambda k, a, b, data: receivers.add(b))
    # round 1's two aggregators, round 2's three trainers and two aggregators: never all 40 nodes
    assert len(receivers) <= 2 + 3 + 2
    assert s["honest_digest_agreement"] == 1.0


def test_dpsgd_graph_is_regular_simple_and_seeded() -> None:
    g = regular_graph(30, 4, seed=3)
    assert all(len(nb) == 4 and i not in nb for i, nb in enumerate(g))
    assert all(i in g[j] for i, nb in enumerate(g) for j in nb)  # undirected
    assert g == regular_graph(30, 4, seed=3) and g != regular_graph(30, 4, seed=4)
    assert regular_graph(4, 4, seed=0) == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_bad_protocol_and_unsupported_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'fedavg'"):
        run(_cfg("fedavg"))
    with pytest.raises(BaselineError, match="does not model byzantine"):
        run(_cfg("modest", byzantine=0.2))
    with pytest.raises(BaselineError, match="does not model crash_fraction"):
        run(_cfg("dpsgd", crash_fraction=0.5, crash_at=3))
    with pytest.raises(ValueError, match="wrong version, kind or payload size"):
        ModelMessage.decode(ModelMessage(1, b"r" * 32, 1, b"k" * 32, bytes(8)).encode(), 3)


def test_sim_cli_accepts_the_baselines(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from seedswarm.cli import main

    rc = main(["sim", "--protocol", "dpsgd", "--nodes", "6", "--rounds", "2", "--task-option", "hidden=8",
               "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == 6


def test_bench_protocols_tiny_grid(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    rc = bench.main(["--quick", "--sizes", "2.4k", "--tasks", "finetune", "--nodes", "8", "--rounds", "6",
                     "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| finetune | 2,410 | seedswarm |" in text and "| finetune | 2,410 | modest |" in text
    res = json.loads(out.read_text())
    assert [r["protocol"] for r in res["rows"]] == ["seedswarm", "modest", "dpsgd"]
    for r in res["rows"]:
        assert r["bytes_per_trainer_per_round"] > 0 and r["wall_seconds"] > 0
    by = {r["protocol"]: r for r in res["rows"]}
    assert by["modest"]["bytes_per_trainer_per_round"] > 10 * by["seedswarm"]["bytes_per_trainer_per_round"]
    assert res["ratios"][0]["modest_trainer_bytes_ratio"] > 10


def test_bench_table_formatting() -> None:
    rows = [
        {"task": "finetune", "size": "1M", "params": 1_000_060, "protocol": p, "reached": reached,
         "rounds_to_target": rtt, "bytes_to_target": btt, "bytes_per_node_per_round": 500.0,
         "bytes_per_trainer_per_round": bpt, "final_accuracy": 0.86, "rounds": 100, "wall_seconds": 12.3,
         "stopped_by": "target" if reached else "wall", "total_bytes": 9e9, "virtual_seconds": 4.5}
        for p, reached, rtt, btt, bpt in (("seedswarm", True, 100, 2_000_000, 150.0),
                                          ("modest", True, 3, 300_000_000, 8_000_000.0),
                                          ("dpsgd", False, None, None, 16_000_000.0))
    ]
    rats = bench.ratios(rows)
    assert rats[0]["modest_bytes_to_target_ratio"] == pytest.approx(150.0)
    assert rats[0]["dpsgd_bytes_to_target_at_least"] == pytest.approx(4500.0)
    text = bench.table(rows, rats)
    assert "| finetune | 1,000,060 | modest | 3 | 300 MB | 500 B | 8 MB | 0.860 (100) | 4.5 | 12 |" in text
    assert "not reached (wall cap)" in text
    assert "150.0x" in text and "53,333x" in text


def test_bench_tables_from_saved_json(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    saved = {"command": "seedswarm bench protocols --quick", "rows": [], "ratios": []}
    (tmp_path / "r.json").write_text(json.dumps(saved))
    assert bench.main(["--from-json", str(tmp_path / "r.json")]) == 0
    assert "command: seedswarm bench protocols --quick" in capsys.readouterr().out
