"""The baselines' network in the simulator: full models on the wire and the links they cross.

:class:`ModelMessage` is what MoDeST and D-PSGD send (a whole fp32 model, really encoded and
decoded, so a baseline that did not move full models could not train); :class:`BaselineNet`
counts each delivery's bytes and advances virtual time with the simulator's link model. Split
from :mod:`seedswarm.sim.baselines`, which runs the protocols over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from seedswarm.sim.engine import NetConfig

__all__ = ["KIND_AGGREGATED", "KIND_NAMES", "KIND_NEIGHBOUR", "KIND_TRAINED", "BaselineNet", "ModelMessage",
           "SendHook", "flat_params", "param_views"]

MODEL_MESSAGE_VERSION = 1
KIND_TRAINED = 1  # MoDeST trainer -> aggregator
KIND_AGGREGATED = 2  # MoDeST aggregator -> next round's trainers
KIND_NEIGHBOUR = 3  # D-PSGD node -> neighbour
KIND_NAMES = {KIND_TRAINED: "TrainedModel", KIND_AGGREGATED: "AggregatedModel",
              KIND_NEIGHBOUR: "NeighbourModel"}

SendHook = Callable[[str, int, int, bytes], None]
"""``on_send(kind_name, src_index, dst_index, encoded)``: called for every delivery (tests)."""


# ---------------------------------------------------------------------------------------------
# the wire format of a full model


@dataclass(frozen=True)
class ModelMessage:
    """A full fp32 model on the wire: what MoDeST and D-PSGD actually send.

    ``payload`` is the flat parameter vector (``model.parameters()`` order) as raw little-endian
    float32 bytes: ``4 * d`` bytes, plus a header of about 77 bytes.
    """

    kind: int
    run: bytes
    round: int
    sender: bytes
    payload: bytes

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(
            [MODEL_MESSAGE_VERSION, self.kind, self.run, self.round, self.sender, self.payload],
            use_bin_type=True,
        )
        return data

    @classmethod
    def decode(cls, data: bytes, params: int) -> ModelMessage:
        """Parse and check a message carrying ``params`` float32 values (ValueError if malformed)."""
        try:
            v = msgpack.unpackb(data, raw=False, max_bin_len=4 * params + 64)
        except Exception as e:  # msgpack raises several unrelated types
            raise ValueError(f"malformed model message: {e}") from e
        if (not isinstance(v, list) or len(v) != 6 or v[0] != MODEL_MESSAGE_VERSION
                or v[1] not in KIND_NAMES or not isinstance(v[4], bytes)
                or not isinstance(v[5], bytes) or len(v[5]) != 4 * params):
            raise ValueError("model message has the wrong version, kind or payload size")
        return cls(kind=v[1], run=v[2], round=v[3], sender=v[4], payload=v[5])

    def vector(self) -> np.ndarray:
        """The parameters as a read-only float32 array (a view of ``payload``, no copy)."""
        return np.frombuffer(self.payload, dtype="<f4")


def flat_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float32).contiguous()


def param_views(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Parameter-shaped views of one flat vector (training through them writes the vector)."""
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[i : i + n].view(s))
        i += n
    return out


# ---------------------------------------------------------------------------------------------
# network: bytes from messages, virtual time from the NetConfig model


class BaselineNet:
    """Delivers encoded messages between node indices, counting bytes and advancing virtual time.

    Timing follows the simulator's link model (``access_src + access_dst + size / bandwidth``)
    with a FIFO uplink per sender and a FIFO downlink per receiver, so a trainer that sends a
    4 MB model to two aggregators pays two serialisations and an aggregator receiving 16 models
    pays sixteen. Node access latencies and speeds are drawn like the simulator's.
    """

    def __init__(self, n: int, net: NetConfig, rng: np.random.Generator, on_send: SendHook | None) -> None:
        self.net = net
        self.access = [net.latency_ms / 2000.0 * math.exp(rng.normal(0.0, net.jitter)) for _ in range(n)]
        self.speed = [math.exp(rng.normal(0.0, 0.25)) for _ in range(n)]
        self.up_free = [0.0] * n
        self.down_free = [0.0] * n
        self.sent = [0] * n
        self.received = [0] * n
        self.total = 0
        self.messages = 0
        self.by_kind: dict[str, int] = {}
        self.on_send = on_send

    def compute_time(self, node: int, steps: int) -> float:
        return self.net.compute_ms / 1000.0 * self.speed[node] * max(1, steps)

    def send(self, kind: str, src: int, dst: int, data: bytes, ready: float) -> float:
        """Count one delivery of ``data``; returns its virtual arrival time at ``dst``.

        A node sending to itself (a MoDeST trainer that is also an aggregator, or an aggregator
        that trains next round) hands the bytes over in memory: no bytes, no time.
        """
        if src == dst:
            return ready
        size = len(data)
        self.sent[src] += size
        self.received[dst] += size
        self.total += size
        self.messages += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + size
        if self.on_send is not None:
            self.on_send(kind, src, dst, data)
        ser = size * 8 / (self.net.bandwidth_mbps * 1e6)
        start = max(ready, self.up_free[src])
        self.up_free[src] = start + ser
        arrive = max(start + ser + self.access[src] + self.access[dst], self.down_free[dst] + ser)
        self.down_free[dst] = arrive
        return arrive
