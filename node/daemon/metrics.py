"""Counters and gauges of one daemon, and a minimal HTTP endpoint in Prometheus text format.

Why hand-rolled: the text exposition format is a few lines, and the daemon must not grow a
dependency (or a thread) for it. The server is an ``asyncio.start_server`` owned by the daemon:
``GET /metrics`` (Prometheus 0.0.4 text) and ``GET /status`` (the status JSON). It reads at most
one small request per connection with a timeout, so a slow or hostile client cannot pin it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger("seedswarm.metrics")

_LABEL_OK = re.compile(r"^[A-Za-z0-9_.:/\- ]{0,120}$")


def _label(v: str) -> str:
    v = v if _LABEL_OK.match(v) else re.sub(r"[^A-Za-z0-9_.:/\- ]", "_", v[:120])
    return v.replace("\\", "\\\\").replace('"', '\\"')


class Metrics:
    """Monotonic counters (``*_total``) and gauges, keyed by name and one optional label."""

    def __init__(self, prefix: str = "seedswarm") -> None:
        self.prefix = prefix
        self.counters: dict[tuple[str, str, str], float] = {}
        self.gauges: dict[tuple[str, str, str], float] = {}
        self.help: dict[str, str] = {}

    def inc(self, name: str, n: float = 1, label: str = "", value: str = "", help: str = "") -> None:
        key = (name, label, value)
        self.counters[key] = self.counters.get(key, 0) + n
        if help:
            self.help.setdefault(name, help)

    def set(self, name: str, v: float, label: str = "", value: str = "", help: str = "") -> None:
        self.gauges[(name, label, value)] = v
        if help:
            self.help.setdefault(name, help)

    def get(self, name: str, label: str = "", value: str = "") -> float:
        key = (name, label, value)
        return self.counters.get(key, self.gauges.get(key, 0))

    def total(self, name: str) -> float:
        return sum(v for (n, _, _), v in self.counters.items() if n == name)

    def render(self) -> str:
        lines: list[str] = []
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            names = sorted({k[0] for k in table})
            for name in names:
                full = f"{self.prefix}_{name}"
                if name in self.help:
                    lines.append(f"# HELP {full} {self.help[name]}")
                lines.append(f"# TYPE {full} {kind}")
                for (n, label, value), v in sorted(table.items()):
                    if n != name:
                        continue
                    lab = f'{{{label}="{_label(value)}"}}' if label else ""
                    num = int(v) if float(v).is_integer() else v
                    lines.append(f"{full}{lab} {num}")
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for table in (self.counters, self.gauges):
            for (n, label, value), v in table.items():
                out[f"{n}{{{label}={value}}}" if label else n] = v
        return out


class MetricsServer:
    """``GET /metrics`` and ``GET /status`` on host:port; start() raises OSError if the port is taken."""

    def __init__(self, host: str, port: int, metrics: Callable[[], str], status: Callable[[], dict[str, Any]]) -> None:
        self.host, self.port = host, port
        self._metrics, self._status = metrics, status
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            line = await asyncio.wait_for(reader.readline(), 2.0)
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path.startswith("/metrics"):
                body, ctype, code = self._metrics().encode(), "text/plain; version=0.0.4", "200 OK"
            elif path.startswith("/status"):
                body, ctype, code = json.dumps(self._status(), indent=2).encode(), "application/json", "200 OK"
            else:
                body, ctype, code = b"try /metrics or /status\n", "text/plain", "404 Not Found"
            writer.write(f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), 2.0)
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)
