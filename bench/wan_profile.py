"""The link profiles of ``seedswarm bench wan``: per-host latency, jitter, loss and bandwidth.

A profile gives every host an *access link*; a packet from host i to host j crosses i's uplink
and j's downlink. Each access link delays a quarter of the host's ``rtt_ms`` each way, so two
hosts of the same ``rtt_ms`` see that round trip and two different ones see the mean of the
two: a world-wide swarm where some hosts sit far from everyone and some near. Loss is drawn on
the uplink only (one draw per packet per direction of a path); the rate limits both ways.

Per-host values are drawn from ``random.Random`` seeded with the profile name, the seed and the
host index, so the same ``--seed`` gives the same hosts whatever ``--nodes`` is (host 3 of an
8-node run is host 3 of a 16-node run), and the run is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any


class ProfileError(ValueError):
    """An unknown profile or a host count it cannot serve."""


@dataclass(frozen=True)
class Profile:
    """Ranges the hosts' links are drawn from (a fixed value when low == high)."""

    name: str
    rtt_ms: tuple[float, float]
    jitter_frac: float  # jitter as a share of the one-way delay
    loss: float
    rate_mbit: tuple[float, float]
    about: str
    # The genesis's round timeout (the cap on the adaptive aggregation deadline) that a swarm on
    # such links is started with. The 2 s default is sized for one machine; on `world` a round
    # of 16 trainers takes longer than that (p50 2.3 s measured), so with a 2 s cap the
    # aggregators cut slow trainers off round after round and the records expel them (16
    # members fell to 1 in 40 rounds). --round-timeout overrides it.
    round_timeout: float = 2.0


PROFILES: dict[str, Profile] = {
    "lan": Profile("lan", (0.5, 0.5), 0.0, 0.0, (1000.0, 1000.0), "one data centre: 0.5 ms RTT, 1 Gbit/s"),
    "continent": Profile("continent", (40.0, 40.0), 0.05, 0.0, (100.0, 100.0),
                         "one continent: 40 ms RTT, 5% jitter, 100 Mbit/s"),
    "world": Profile("world", (80.0, 250.0), 0.05, 0.01, (10.0, 50.0),
                     "the world: 80-250 ms RTT per host, 5% jitter, 1% loss, 10-50 Mbit/s per host; round timeout 4 s",
                 round_timeout=4.0),
}


@dataclass(frozen=True)
class HostLink:
    """One host's access link, as the emulator sets it."""

    host: int
    rtt_ms: float  # round trip to a host with the same link
    jitter_ms: float  # on each one-way delay
    loss: float  # share of the host's outgoing packets dropped
    rate_mbit: float  # both ways

    @property
    def one_way_ms(self) -> float:
        """The delay of one direction of this access link (a path crosses two)."""
        return self.rtt_ms / 4.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def path_rtt_ms(a: HostLink, b: HostLink) -> float:
    """The configured round trip between two hosts (jitter aside)."""
    return 2.0 * (a.one_way_ms + b.one_way_ms)


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r} (choose: {', '.join(PROFILES)})") from None


def host_links(name: str, n: int, seed: int = 0) -> list[HostLink]:
    """The ``n`` hosts' links of profile ``name``, deterministic in (name, seed, host)."""
    p = profile(name)
    if n < 1:
        raise ProfileError(f"a profile needs at least one host, not {n}")
    out = []
    for i in range(n):
        rng = random.Random(f"seedswarm-wan:{p.name}:{seed}:{i}")
        rtt = round(rng.uniform(*p.rtt_ms), 1)
        rate = round(rng.uniform(*p.rate_mbit), 1)
        out.append(HostLink(host=i, rtt_ms=rtt, jitter_ms=round(p.jitter_frac * rtt / 4.0, 2), loss=p.loss,
                            rate_mbit=rate))
    return out
