"""A user-space WAN link emulator for ``seedswarm bench wan`` on kernels without ``sch_netem``.

Some kernels (this project's development VM among them) are built without netem, so ``tc``
cannot delay or drop packets. This process does the same job in user space: it gives every
node's network namespace one TUN device (an IP interface whose packets this process reads and
writes), and forwards each IPv4 packet from host i to host j through a model of the two access
links of :mod:`seedswarm.bench.wan_profile`:

* i's uplink: the packet is dropped with i's loss, then serialised at i's rate behind the
  packets i sent before it (a FIFO queue; over ``QUEUE_S`` of backlog it is tail-dropped);
* propagation: i's and j's one-way delays, each with its normal jitter, never reordering two
  packets of the same pair (a jittered packet waits for the one before it, as TCP would see
  on a real path that does not reorder);
* j's downlink: serialised at j's rate behind whatever else is arriving at j, at the time it
  arrives (a second event), so a far sender never holds up a near one.

Run as ``python -m seedswarm.bench.wan_link`` with a JSON spec on stdin (see :func:`main`); it
prints ``ready`` once every TUN device is up in its namespace, forwards until SIGTERM or until
stdin closes, then writes its counters (and its own CPU seconds) to the spec's ``stats`` path.
Its work is a few microseconds of Python a packet: the bench reports its CPU beside the nodes'.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import random
import resource
import selectors
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from seedswarm.bench.netns import ip
from seedswarm.bench.wan_profile import HostLink

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
QUEUE_S = 0.5  # backlog an access link queues before it tail-drops (a generous router buffer)


@dataclass
class Host:
    """One namespace's TUN device and the state of its two access-link directions."""

    index: int
    ns: str
    addr: str
    dev: str
    link: HostLink
    fd: int = -1
    up_free: float = 0.0  # when the uplink is next idle
    down_free: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("sent_packets", "sent_bytes", "lost", "queue_drops", "delivered_packets", "delivered_bytes"), 0))


def open_tun(name: str) -> int:
    """A TUN device named ``name`` (no packet-info header), non-blocking; it vanishes when the
    descriptor closes, so a killed emulator leaves nothing behind."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class LinkEmulator:
    """The forwarding loop: one heap of timed events over every host's packets."""

    def __init__(self, hosts: list[Host], seed: int) -> None:
        self.hosts = hosts
        self.by_addr = {bytes(int(x) for x in h.addr.split(".")): h for h in hosts}
        self.rng = random.Random(f"seedswarm-wan-link:{seed}")
        self.events: list[tuple[float, int, int, int, bytes]] = []  # (due, seq, stage, dst, packet)
        self.seq = 0
        self.last_arrival: dict[tuple[int, int], float] = {}
        self.stop = False

    def setup(self, prefix_len: int) -> None:
        for h in self.hosts:
            h.fd = open_tun(h.dev)
            ip("link", "set", "dev", h.dev, "netns", h.ns)
            ip("-n", h.ns, "addr", "add", f"{h.addr}/{prefix_len}", "dev", h.dev)
            ip("-n", h.ns, "link", "set", h.dev, "up")

    def _push(self, due: float, stage: int, dst: int, pkt: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.events, (due, self.seq, stage, dst, pkt))

    def ingress(self, src: Host, pkt: bytes, now: float) -> None:
        """A packet host ``src`` sent: its uplink, then propagation to the destination."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return  # IPv4 only (the namespaces carry nothing else)
        dst = self.by_addr.get(pkt[16:20])
        if dst is None or dst is src:
            return
        c = src.counts
        c["sent_packets"] += 1
        c["sent_bytes"] += len(pkt)
        if src.link.loss and self.rng.random() < src.link.loss:
            c["lost"] += 1
            return
        start = max(now, src.up_free)
        if start - now > QUEUE_S:
            c["queue_drops"] += 1
            return
        src.up_free = start + len(pkt) * 8 / (src.link.rate_mbit * 1e6)
        delay = (src.link.one_way_ms + dst.link.one_way_ms) / 1000.0
        for h in (src, dst):
            if h.link.jitter_ms:
                delay += self.rng.gauss(0.0, h.link.jitter_ms / 1000.0)
        pair = (src.index, dst.index)
        arrival = max(src.up_free + max(0.0, delay), self.last_arrival.get(pair, 0.0))
        self.last_arrival[pair] = arrival
        self._push(arrival, 1, dst.index, pkt)

    def arrive(self, dst: Host, pkt: bytes, now: float) -> None:
        """A packet reaches ``dst``'s downlink: queue it behind what is arriving there."""
        start = max(now, dst.down_free)
        if start - now > QUEUE_S:
            dst.counts["queue_drops"] += 1
            return
        dst.down_free = start + len(pkt) * 8 / (dst.link.rate_mbit * 1e6)
        self._push(dst.down_free, 2, dst.index, pkt)

    def deliver(self, dst: Host, pkt: bytes) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(dst.fd, pkt)
            dst.counts["delivered_packets"] += 1
            dst.counts["delivered_bytes"] += len(pkt)

    def run(self, control: int | None) -> None:
        sel = selectors.DefaultSelector()
        for h in self.hosts:
            sel.register(h.fd, selectors.EVENT_READ, h)
        if control is not None:
            sel.register(control, selectors.EVENT_READ, None)
        while not self.stop:
            now = time.monotonic()
            while self.events and self.events[0][0] <= now:
                _, _, stage, dst, pkt = heapq.heappop(self.events)
                if stage == 1:
                    self.arrive(self.hosts[dst], pkt, now)
                else:
                    self.deliver(self.hosts[dst], pkt)
            timeout = max(0.0, self.events[0][0] - time.monotonic()) if self.events else 0.5
            for key, _ in sel.select(timeout):
                h = key.data
                if h is None:  # the bench closed our stdin: it is gone or done
                    if not os.read(key.fd, 4096):
                        self.stop = True
                    continue
                now = time.monotonic()
                for _ in range(64):  # drain a burst, then look at the clock again
                    try:
                        pkt = os.read(h.fd, 65536)
                    except BlockingIOError:
                        break
                    self.ingress(h, pkt, now)

    def stats(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
                "hosts": {f"node-{h.index}": dict(h.counts) for h in self.hosts}}


def main() -> int:
    """Spec on stdin: ``{"hosts": [{"index", "ns", "addr", "dev", "link": HostLink fields}],
    "prefix_len": 24, "seed": 0, "stats": "PATH"}``; then one line of stdin per command (none
    yet): EOF stops the emulator."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    spec = json.loads(sys.stdin.readline())
    hosts = [Host(index=h["index"], ns=h["ns"], addr=h["addr"], dev=h["dev"], link=HostLink(**h["link"]))
             for h in spec["hosts"]]
    emu = LinkEmulator(hosts, int(spec.get("seed", 0)))

    def on_term(*_: Any) -> None:
        emu.stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        emu.setup(int(spec.get("prefix_len", 24)))
    except Exception as e:  # noqa: BLE001 - one line to the bench, which stops
        print(f"error {type(e).__name__}: {e}", flush=True)
        return 2
    print("ready", flush=True)
    try:
        emu.run(sys.stdin.fileno())
    finally:
        with open(spec["stats"], "w") as f:
            json.dump(emu.stats(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
