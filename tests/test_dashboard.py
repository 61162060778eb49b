"""The dashboard: the daemon's live page at ``/`` (with ``/history``), the report.html of sim and
cluster, the Prometheus exposition through prometheus-client, and plots that say what they show.

The browser test starts a real 3-node ``seedswarm cluster`` with ``--metrics-port``, loads node
0's live page in headless Chromium, checks that the charts hold data points and saves a
screenshot (in the test's tmp dir; ``SEEDSWARM_DASHBOARD_PNG=path`` copies it there too, which is
how ``docs/dashboard.png`` is made). It skips, saying why, where no Chromium is installed.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from seedswarm.node.daemon.dashboard import History
from seedswarm.node.daemon.metrics import Metrics, MetricsServer
from seedswarm.node.report.page import render
from tests.test_daemon import ENV, PY, wait_for

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _data_of(page: str) -> dict[str, Any]:
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))  # type: ignore[no-any-return]


# ---------------------------------------------------------------- fast: no processes, no browser
def test_page_embeds_data_safely() -> None:
    data = {"live": False, "title": "</script><script>alert(1)</script>", "metric": "loss",
            "nodes": [{"name": "n", "status": None, "rows": [{"round": 1, "loss": math.nan, "sent": math.inf}]}]}
    page = render(data)
    assert page.count("</script>") == 2  # the data block's and the code's, none from the data
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page  # no CDN
    back = _data_of(page)
    assert back["title"] == data["title"] and back["nodes"][0]["rows"][0] == {"round": 1, "loss": None, "sent": None}


def test_metrics_keep_their_names_and_add_the_process_collectors() -> None:
    m = Metrics()
    m.inc("rejected_total", 2, "reason", "malformed", help="inputs rejected, by reason")
    m.inc("rejected_total", 1, "reason", 'bad"quote')
    m.inc("bans_total")
    m.set("bans_total", 3)  # a counter and a gauge of one name: exposed once, as the gauge
    m.set("round", 7)
    m.set("gossip_dropped", 4, "reason", "rpc-decode")
    text = m.render()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, v = line.rsplit(" ", 1)
            values[name] = float(v)
    assert values['seedswarm_rejected_total{reason="malformed"}'] == 2
    assert values['seedswarm_rejected_total{reason="bad_quote"}'] == 1
    assert values["seedswarm_round"] == 7 and values["seedswarm_bans_total"] == 3
    assert values['seedswarm_gossip_dropped{reason="rpc-decode"}'] == 4
    assert "process_resident_memory_bytes" in values and "process_cpu_seconds_total" in values
    assert text.count("# TYPE seedswarm_bans_total") == 1
    assert Metrics().render() != text  # one registry per daemon, nothing global


def test_history_is_bounded_and_served_incrementally() -> None:
    h = History(maxlen=5)
    for r in range(1, 9):
        h.add({"round": r})
    assert [x["round"] for x in h.rows] == [4, 5, 6, 7, 8] and h.seq == 7
    assert [x["round"] for x in h.since(5)] == [7, 8]
    srv = MetricsServer("127.0.0.1", 0, lambda: "m\n", lambda: {"round": 8},
                        {"/history": lambda q: (json.dumps({"since": q.get("since")}).encode(), "application/json")})
    assert srv.respond("/history?since=5")[1] == b'{"since": ["5"]}'
    assert srv.respond("/status")[1].startswith(b"{") and srv.respond("/nope")[0].startswith("404")
    assert "version=0.0.4" in srv.respond("/metrics")[2]


def test_loss_task_report_and_plots_say_what_they_show(tmp_path: Path) -> None:
    """A loss task (lower is better): loss plots with the target marked, titles naming the task,
    the protocol and the settings, and a report that charts the loss."""
    from seedswarm.sim.plots import plot_title, write_outputs

    rows = [{"round": r, "time": 0.3 * r, "bytes_total": 1000 * r, "members": 4, "online": 4,
             **({"loss": 3.0 - 0.05 * r, "accuracy": 0.1} if r % 5 == 0 else {})} for r in range(1, 31)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"protocol": "seedswarm", "task": "lm", "nodes": 4, "rounds": 30, "metric": "loss",
               "higher_is_better": False, "target": 2.4, "final_metric": 1.5,
               "config": {"task_options": {"context": 64}, "estimator": "fo", "trainers": 4, "directions": 32,
                          "groups": 1, "aggregator": "guarded_mean", "lr": 0.05, "batch_size": 16, "seed": 0,
                          "rounds": 30, "latency_ms": 40.0}}
    write_outputs(tmp_path, summary)
    assert (tmp_path / "loss_vs_round.png").stat().st_size > 5000 and (tmp_path / "loss_vs_bytes.png").exists()
    title = plot_title(summary, "loss vs round")
    assert "task lm (context=64)" in title and "protocol seedswarm" in title and "K=32" in title
    data = _data_of((tmp_path / "report.html").read_text())
    assert data["metric"] == "loss" and data["higher_is_better"] is False and data["target"] == 2.4
    assert "task lm" in data["subtitle"] and "K=32" in data["subtitle"]
    assert [r["loss"] for r in data["nodes"][0]["rows"] if "loss" in r][:2] == [2.75, 2.5]


# ---------------------------------------------------------------- slow: real daemons, real browser
def _browser() -> str | None:
    env = os.environ.get("SEEDSWARM_BROWSER")
    if env:
        return env if shutil.which(env) else None
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def _free_base(n: int) -> int:
    """A port P with P .. P+n-1 free (the cluster's nodes serve on P + i)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


def _get_json(url: str) -> Any:
    try:
        return json.loads(urllib.request.urlopen(url, timeout=5).read())
    except (OSError, ValueError):
        return None


def _chromium(browser: str, profile: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--window-size=1400,1050", "--virtual-time-budget=6000",
                           *args], capture_output=True, text=True, timeout=timeout)


def _charts(dom: str) -> dict[str, int]:
    """data-chart -> data-points of every chart in a rendered page."""
    out = {}
    for tag in re.findall(r"<svg [^>]*>", dom):
        name, pts = re.search(r'data-chart="([^"]+)"', tag), re.search(r'data-points="(\d+)"', tag)
        if name and pts:
            out[name.group(1)] = int(pts.group(1))
    return out


@pytest.mark.slow
def test_live_dashboard_of_a_3_node_cluster_in_a_headless_browser(tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH; "
                    "install one, e.g. `apt-get install chromium`, or set SEEDSWARM_BROWSER)")
    evals = int(os.environ.get("SEEDSWARM_DASHBOARD_EVALS", "3"))
    base, out = _free_base(3), tmp_path / "run"
    proc = subprocess.Popen([*PY, "cluster", "--nodes", "3", "--rounds", "100000", "--trainers", "3",
                             "--eval-every", "5", "--metrics-port", str(base), "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    url = f"http://127.0.0.1:{base}/"
    try:
        def ready() -> bool:
            h, st = _get_json(url + "history?since=-1"), _get_json(url + "status")
            return bool(h and st and st["peers"] >= 2 and st["members"] == 3
                        and sum("accuracy" in r for r in h["rows"]) >= evals)
        wait_for(ready, 240 + 20 * evals, f"node 0 of 3 with {evals} evaluations")
        page = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "<svg" not in page and "src=" not in page  # drawn by its inline script, fetched from nowhere
        t0 = time.monotonic()
        res = _chromium(browser, tmp_path / "profile", "--dump-dom", url + "#selftest")
        dom = res.stdout
        charts = _charts(dom)
        assert charts, (res.returncode, res.stderr[-2000:], dom[-2000:])
        for name in ("metric-round", "metric-bytes", "loss-round", "latency", "bytes", "members"):
            assert charts.get(name, 0) > 0, (name, charts)
        assert charts["metric-round"] >= evals and 'class="series"' in dom
        assert "live: updated" in dom, "the page's poll of /status and /history failed"
        assert 'class="target"' in dom  # the accuracy target is marked
        # synthetic mouse events on the first chart: a tooltip with values, drag to zoom, reset
        assert 'data-selftest="hover:ok zoom:ok reset:ok"' in dom, re.findall(r"<body[^>]*>", dom)
        assert "trainer (rank" in dom or "aggregator (rank" in dom or "none this round" in dom  # the duty
        shot = tmp_path / "dashboard.png"
        res = _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", url)
        assert shot.exists() and shot.stat().st_size > 20_000, res.stderr[-2000:]
        took = time.monotonic() - t0
        if os.environ.get("SEEDSWARM_DASHBOARD_PNG"):
            shutil.copyfile(shot, os.environ["SEEDSWARM_DASHBOARD_PNG"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 130, proc.stderr.read().decode()[-2000:] if proc.stderr else rc
    # the report next to summary.json: every node side by side, charts with data
    assert (out / "summary.json").exists()
    res = _chromium(browser, tmp_path / "profile", "--dump-dom", (out / "report.html").as_uri() + "#selftest")
    assert len(re.findall(r'class="card" [^>]*data-node="node-\d', res.stdout)) == 3, res.stdout[-2000:]
    report_charts = _charts(res.stdout)
    assert report_charts.get("metric-round", 0) >= 3 * evals and report_charts.get("latency", 0) > 0, report_charts
    assert 'data-selftest="hover:ok zoom:ok reset:ok"' in res.stdout
    print(f"\ndashboard: {charts} (browser {took:.1f} s); screenshot {shot}")
