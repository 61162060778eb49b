"""Render the dashboard page (``dashboard.html``) around its data.

The page reads one JSON document (see :func:`render`) and draws SVG charts that can be hovered
and zoomed: the task's metric against round and against bytes sent (the target marked), the loss
against round, the round latency, bytes out and in, members and peers, and rejected inputs by
reason; plus one card per node (round, head, model digest, duty, bytes...). ``live`` pages poll the
node's ``/status`` and ``/history`` (same origin); reports carry all their data inline.
"""

from __future__ import annotations

import json
import math
import time
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from seedswarm.node.files import atomic_write

_SLOT = "__SEEDSWARM_DATA__"


@cache
def template() -> str:
    return resources.files("seedswarm.node.report").joinpath("dashboard.html").read_text(encoding="utf-8")


def finite(v: Any) -> Any:
    """JSON without NaN or infinities (the browser's JSON.parse refuses them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [finite(x) for x in v]
    return v


def render(data: dict[str, Any]) -> str:
    """The page around ``data``::

        {"live": bool, "title": str, "subtitle": str, "metric": "accuracy" | "loss" | ...,
         "higher_is_better": bool, "target": float | None, "bytes_label": str,
         "nodes": [{"name": str, "status": dict | None,
                    "rows": [{"round", "t", "sent", "recv", "members", "peers", <metric>...}]}],
         "summary": dict | None}

    ``rows`` are per round; ``t`` in seconds, ``sent``/``recv`` cumulative bytes, evaluations
    (``accuracy``, ``loss``, ...) only on the rounds that were evaluated.
    """
    text = json.dumps(finite(data), separators=(",", ":"))
    # inside <script>: no "</" (closing tags), no "<!--"
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return template().replace(_SLOT, text, 1)


def write(path: Path, data: dict[str, Any]) -> Path:
    data = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), **data, "live": False}
    atomic_write(path, render(data).encode())
    return path


def settings_line(task: str, task_options: dict[str, Any] | list[str] | None, protocol: str,
                  settings: dict[str, Any]) -> str:
    """One line naming the task, the protocol and the key settings (for titles)."""
    opts = task_options if isinstance(task_options, list) else \
        [f"{k}={v}" for k, v in (task_options or {}).items()]
    parts = [f"task {task}" + (f" ({', '.join(map(str, opts))})" if opts else ""), f"protocol {protocol}"]
    if protocol == "seedswarm":
        k = settings.get("directions")
        groups = settings.get("groups") or 1
        parts += [f"estimator {settings.get('estimator')}", f"{settings.get('trainers')} trainers",
                  f"K={k}" + (f" x {groups} groups" if groups > 1 else ""),
                  f"aggregator {settings.get('aggregator')}", f"lr {settings.get('lr')}"]
    elif settings.get("local_steps") is not None:
        parts.append(f"{settings.get('local_steps')} local step(s) at lr {settings.get('local_lr')}")
    if settings.get("batch_size") is not None:
        parts.append(f"batch {settings['batch_size']}")
    return ", ".join(parts)
