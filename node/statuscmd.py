"""`seedswarm status`: a running node's round, head, digest, duty, peers and bytes, read from its
data dir's ``status.json`` or its HTTP endpoint, as one screen of text or as JSON. Split from
:mod:`seedswarm.node.cli` (the node's own commands).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from seedswarm.clihelp import fail


def read_status(data_dir: str | None, url: str | None) -> dict[str, Any]:
    if url:
        u = url if url.rstrip("/").endswith("/status") else url.rstrip("/") + "/status"
        with urllib.request.urlopen(u, timeout=3) as r:  # noqa: S310 - operator-given URL
            d: dict[str, Any] = json.loads(r.read())
        d["_alive"] = True
        return d
    path = Path(data_dir or "seedswarm-data") / "status.json"
    d = json.loads(path.read_text())
    alive = False
    try:
        os.kill(int(d["pid"]), 0)
        alive = d.get("state") not in ("stopped",) and time.time() - float(d.get("updated_at", 0)) < 10
    except (OSError, KeyError, ValueError):
        alive = False
    d["_alive"] = alive
    return d


def format_status(d: dict[str, Any]) -> str:
    c = d.get("committee", {})
    duty = []
    if c.get("trainer_rank") is not None:
        duty.append(f"trainer rank {c['trainer_rank']} of {c.get('trainers')}")
    if c.get("aggregator_rank") is not None:
        duty.append(f"aggregator rank {c['aggregator_rank']} of {c.get('aggregators')}")
    state = d.get("state", "?") if d.get("_alive") else f"not running (last state {d.get('state', '?')})"
    acc = d.get("accuracy")
    lines = [
        f"node      {d.get('peer_id')}  {state}, pid {d.get('pid')}",
        f"run       {str(d.get('run_id', ''))[:16]}  protocol {d.get('protocol_version')}",
        f"round     {d.get('round')}  head {str(d.get('head', ''))[:16]}  model {str(d.get('model_digest', ''))[:16]}"
        + (f"  accuracy {acc:.3f}" if isinstance(acc, float) else "")
        + (f"  loss {ev['loss']:.3f}" if isinstance(ev := d.get("evaluation"), dict) and "loss" in ev else ""),
        f"member    {'yes' if d.get('member') else 'no'} ({d.get('members')} members)  duty: {', '.join(duty) or 'none this round'}"
        + ("  [halted]" if d.get("halted") else ""),
        f"peers     {d.get('peers')}" + (f"  (saved book: {disc.get('book_loaded')} loaded, {disc.get('book_answered')} "
                                        f"answered; mDNS found {disc.get('mdns_found')})"
                                        if isinstance(disc := d.get("discovery"), dict) else ""),
        f"bytes     sent {d.get('bytes_sent', 0) / 1e6:.2f} MB, received {d.get('bytes_received', 0) / 1e6:.2f} MB",
        f"listen    {' '.join(d.get('announce') or d.get('listen') or [])}",
    ]
    if d.get("rejected"):
        lines.append(f"rejected  {json.dumps(d['rejected'])}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        d = read_status(args.data_dir, args.url)
    except FileNotFoundError:
        return fail("status", f"no status.json in {args.data_dir or 'seedswarm-data'}: has a node run there?")
    except (OSError, ValueError) as e:
        return fail("status", f"cannot read the node's status: {e}")
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_status(d))
    return 0 if d.get("_alive") else 1


