"""Progress people expect: a header, then rounds done of the total, rate, time left and the run's
figures; a bar on a terminal (rich), plain periodic lines otherwise, nothing with --quiet."""

from __future__ import annotations

import io
import re

import pytest

from seedswarm.progress import Progress, duration, human_bytes


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress(10, header="seedswarm sim: 4 nodes", stream=out, every=0) as p:
        p.update(1, acc=None, loss=None, bytes=512)
        p.update(3, acc=0.5, loss=1.25, bytes=1500)
        p.note("round 3: crashed 1 of 4 nodes at once")
        p.update(10, acc=0.75)
    lines = out.getvalue().splitlines()
    assert lines[0] == "seedswarm sim: 4 nodes"
    assert lines[1].startswith("round 1/10 (10%)") and "bytes 512 B" in lines[1] and "acc" not in lines[1]
    assert re.match(r"round 3/10 \(30%\)  [\d.]+ rounds/s  elapsed \d+s  eta \d+s  acc 0.500  loss 1.250  "
                    r"bytes 1.50 kB$", lines[2]), lines[2]
    assert lines[3] == "round 3: crashed 1 of 4 nodes at once"
    assert lines[4].startswith("round 10/10 (100%)") and "acc 0.750" in lines[4] and "eta" not in lines[4]
    assert len(lines) == 5  # close() adds nothing: the last update was printed


def test_plain_lines_are_periodic_and_the_last_state_is_printed() -> None:
    out = io.StringIO()
    with Progress(100, stream=out, every=3600) as p:
        for r in range(1, 101):
            p.update(r, acc=r / 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("round 1/100") and lines[1].startswith("round 100/100")


def test_quiet_prints_nothing() -> None:
    out = io.StringIO()
    with Progress(5, header="h", stream=out, quiet=True) as p:
        p.update(5, acc=1.0)
        p.note("n")
    assert out.getvalue() == "" and p.done == 5


def test_a_bar_on_a_terminal() -> None:
    out = io.StringIO()
    with Progress(20, unit="run", header="bench sweep: 20 simulations", stream=out, interactive=True) as p:
        p.note("nodes=4 seed=0 ok")
        for r in range(1, 21):
            p.update(r, failed=0)
    text = out.getvalue()
    assert "bench sweep: 20 simulations" in text and "nodes=4 seed=0 ok" in text
    assert "runs" in text and "20/20" in text and "failed 0" in text


def test_formats() -> None:
    assert human_bytes(999) == "999 B" and human_bytes(2_500_000) == "2.50 MB"
    assert duration(5) == "5s" and duration(75) == "1m15s" and duration(3700) == "1h01m"


def test_sim_shows_header_and_progress(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from seedswarm.cli import main

    argv = ["sim", "--nodes", "4", "--rounds", "3", "--trainers", "2", "--directions", "4", "--eval-every", "1",
            "--task-option", "hidden=8", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("seedswarm sim (seedswarm): 4 nodes, 3 rounds, task digits (hidden=8), seed 0, "
                             "estimator fo, 2 trainers, K=4 directions"), err[0]
    assert err[0].endswith(f"-> {tmp_path / 'run'}")
    assert any(re.match(r"round 3/3 \(100%\).*acc \d\.\d{3}  loss \d\.\d{3}  bytes ", ln) for ln in err), err
    assert main([*argv[:-2], "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "seedswarm sim (" not in err and not re.search(r"^round ", err, re.M), err
