"""Counters and gauges of one daemon, exposed through the Prometheus client library, and the
daemon's small HTTP endpoint (metrics, status and the live dashboard).

The numbers live in :class:`Metrics` (plain dicts the daemon's code updates on the event loop);
``render()`` exposes them with ``prometheus_client`` from a registry of its own, next to the
library's standard ``process_*`` (CPU seconds, resident memory, open file descriptors, start
time), ``python_info`` and ``python_gc_*`` collectors. One registry per daemon: two daemons in a
process (tests) never share metrics, and nothing is registered in the library's global registry.

The server is an ``asyncio.start_server`` owned by the daemon (no thread): ``GET /metrics``
(Prometheus text format 0.0.4), ``GET /status`` (the status JSON), ``GET /`` (the dashboard page,
``seedswarm.node.report``) and ``GET /history?since=SEQ`` (the dashboard's per-round rows after SEQ).
It reads at most one small request per connection with a timeout, so a slow or hostile client
cannot pin it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

log = logging.getLogger("seedswarm.metrics")

_LABEL_OK = re.compile(r"^[A-Za-z0-9_.:/\- ]{0,120}$")


def _label(v: str) -> str:
    """Label values as before the library: printable, at most 120 characters, no quotes."""
    return v if _LABEL_OK.match(v) else re.sub(r"[^A-Za-z0-9_.:/\- ]", "_", v[:120])


class Metrics:
    """Monotonic counters (``*_total``) and gauges, keyed by name and one optional label."""

    def __init__(self, prefix: str = "seedswarm") -> None:
        self.prefix = prefix
        self.counters: dict[tuple[str, str, str], float] = {}
        self.gauges: dict[tuple[str, str, str], float] = {}
        self.help: dict[str, str] = {}
        self._registry: CollectorRegistry | None = None

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

    @property
    def registry(self) -> CollectorRegistry:
        """This node's registry: its own numbers plus the library's process collectors."""
        if self._registry is None:
            reg = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
            reg.register(_Families(self))
            self._registry = reg
        return self._registry

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def families(self) -> Iterator[Metric]:
        """One metric family per name; a name that is both a counter and a gauge is the gauge."""
        gauges = {k[0] for k in self.gauges}
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            for name in sorted({k[0] for k in table} - (gauges if kind == "counter" else set())):
                rows = [(label, value, v) for (n, label, value), v in sorted(table.items()) if n == name]
                label = next((lab for lab, _, _ in rows if lab), "")
                labels = [label] if label else []
                full, doc = f"{self.prefix}_{name}", self.help.get(name, name)
                fam: Metric
                if kind == "gauge":
                    fam = GaugeMetricFamily(full, doc, labels=labels)
                elif name.endswith("_total"):  # the library names the samples <family>_total
                    fam = CounterMetricFamily(full, doc, labels=labels)
                else:  # a counter not named *_total keeps its name, untyped
                    fam = UnknownMetricFamily(full, doc, labels=labels)
                for lab, value, v in rows:
                    if lab != label:
                        continue
                    fam.add_metric([_label(value)] if label else [], v)
                yield fam

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for table in (self.counters, self.gauges):
            for (n, label, value), v in table.items():
                out[f"{n}{{{label}={value}}}" if label else n] = v
        return out


class _Families(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()


Handler = Callable[[dict[str, list[str]]], tuple[bytes, str]]  # query -> (body, content type)


class MetricsServer:
    """``GET /metrics``, ``/status``, and any extra ``routes`` on host:port; start() raises
    OSError if the port is taken."""

    def __init__(self, host: str, port: int, metrics: Callable[[], str], status: Callable[[], dict[str, Any]],
                 routes: dict[str, Handler] | None = None) -> None:
        self.host, self.port = host, port
        self._metrics, self._status = metrics, status
        self.routes = dict(routes or {})
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

    def respond(self, target: str) -> tuple[str, bytes, str]:
        """(status line, body, content type) for a request target such as ``/history?since=3``."""
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query)
        if path in self.routes:
            body, ctype = self.routes[path](query)
            return "200 OK", body, ctype
        if path.startswith("/metrics"):
            return "200 OK", self._metrics().encode(), CONTENT_TYPE_PLAIN_0_0_4
        if path.startswith("/status"):
            return "200 OK", json.dumps(self._status(), indent=2).encode(), "application/json"
        return "404 Not Found", b"try /, /metrics or /status\n", "text/plain"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            line = await asyncio.wait_for(reader.readline(), 2.0)
            parts = line.decode("latin-1").split()
            code, body, ctype = self.respond(parts[1] if len(parts) >= 2 else "")
            writer.write(f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), 2.0)
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)
