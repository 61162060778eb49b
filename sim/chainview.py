"""What simulated nodes store, shared: records by head, checkpoints, and each node's history.

In the daemon every node persists its chain and its checkpoints, and serves both to peers that
sync or join. Simulated nodes do the same through this module, without N copies: every record
any node applied is indexed once by the head it leads to, every checkpoint is made once (when the
first node reaches its round) and a node's history is a view of the index along its own head.
So a joining simulated node syncs real records and downloads real checkpoint chunks from its
peers, through the same core code as a daemon, over the simulated links.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch

from seedswarm.gossip.wire import CheckpointManifest, Record
from seedswarm.node.core.chain import ChainState, record_hash
from seedswarm.node.core.protocol import NodeCore
from seedswarm.node.learn.checkpoint import Checkpoint, encode_params
from seedswarm.node.learn.replay import ModelStates


class _Node(Protocol):
    core: NodeCore
    model_ready: bool


class ChainIndex:
    """Every applied record by the head it leads to, the genesis, and the checkpoints made."""

    def __init__(self, root: ChainState, genesis_params: Sequence[torch.Tensor], checkpoint_every: int,
                 chunk_bytes: int, keep_checkpoints: int = 3) -> None:
        self.root = root
        self.genesis_params = [p.detach().clone() for p in genesis_params]
        self.every = checkpoint_every
        self.chunk_bytes = chunk_bytes
        self.keep = keep_checkpoints
        self.by_head: dict[bytes, tuple[ChainState, Record]] = {}  # head after -> (parent, record)
        self.checkpoints: OrderedDict[bytes, Checkpoint] = OrderedDict()  # head -> checkpoint
        self.by_digest: dict[bytes, Checkpoint] = {}
        self._paths: OrderedDict[bytes, tuple[list[bytes], list[bytes]]] = OrderedDict()

    def add(self, steps: Sequence[tuple[ChainState, Record]]) -> None:
        for parent, rec in steps:
            self.by_head.setdefault(record_hash(rec), (parent, rec))

    def maybe_checkpoint(self, st: ChainState, states: ModelStates) -> None:
        """Make the checkpoint of ``st`` once, if its round is a checkpoint round."""
        if self.every <= 0 or st.round <= 0 or st.round % self.every or st.head in self.checkpoints:
            return
        params = states.get(st.head)
        if params is None:
            return
        ck = Checkpoint.from_blob(self.root.run_id, encode_params(st.round, st.head, params), self.chunk_bytes)
        self.checkpoints[st.head] = ck
        self.by_digest[ck.manifest.state] = ck
        while len(self.checkpoints) > self.keep:
            _, old = self.checkpoints.popitem(last=False)
            self.by_digest.pop(old.manifest.state, None)

    def path(self, head: bytes) -> tuple[list[bytes], list[bytes]]:
        """(records, heads) along the chain ending at ``head``: heads[r] is the head after r records."""
        hit = self._paths.get(head)
        if hit is not None:
            self._paths.move_to_end(head)
            return hit
        back: list[tuple[bytes, bytes]] = []  # (record bytes, head after), newest first
        h = head
        base: tuple[list[bytes], list[bytes]] | None = None
        while h != self.root.head:
            cached = self._paths.get(h)
            if cached is not None:
                base = cached
                break
            entry = self.by_head.get(h)
            if entry is None:
                break  # a head we never indexed (cannot happen for applied heads)
            parent, rec = entry
            back.append((rec.encode(), h))
            h = parent.head
        recs, heads = (list(base[0]), list(base[1])) if base is not None else ([], [self.root.head])
        for data, hd in reversed(back):
            recs.append(data)
            heads.append(hd)
        self._paths[head] = (recs, heads)
        while len(self._paths) > 16:
            self._paths.popitem(last=False)
        return recs, heads

    def state_at(self, head: ChainState, round_: int) -> ChainState:
        """The state after ``round_`` records on the chain ending at ``head``."""
        st = head
        while st.round > round_:
            st = self.by_head[st.head][0]
        return st

    def materialize(self, states: ModelStates, target: ChainState) -> None:
        """Make sure ``states`` holds the parameters of ``target``: replay from the nearest
        ancestor it still holds (or the genesis), as a node without a checkpoint would."""
        steps: list[tuple[ChainState, Record]] = []
        st = target
        while not states.has(st.head):
            if st.round == 0:
                states.put(st.head, [p.clone() for p in self.genesis_params])
                break
            parent, rec = self.by_head[st.head]
            steps.append((parent, rec))
            st = parent
        states.advance(st, steps[::-1])


class SimHistory:
    """One simulated node's stored chain and checkpoints, as ``node.core.sync.History``."""

    def __init__(self, index: ChainIndex, node: _Node) -> None:
        self.index = index
        self.node = node

    def _path(self) -> tuple[list[bytes], list[bytes]]:
        return self.index.path(self.node.core.head.head)

    def length(self) -> int:
        return self.node.core.head.round

    def record(self, r: int) -> bytes | None:
        recs = self._path()[0]
        return recs[r] if 0 <= r < len(recs) else None

    def head_at(self, r: int) -> bytes | None:
        heads = self._path()[1]
        return heads[r] if 0 <= r < len(heads) else None

    def _newest(self) -> Checkpoint | None:
        if self.index.every <= 0 or not self.node.model_ready:
            return None
        heads = self._path()[1]
        c = (len(heads) - 1) // self.index.every * self.index.every
        while c > 0:
            ck = self.index.checkpoints.get(heads[c])
            if ck is not None:
                return ck
            c -= self.index.every
        return None

    def manifest(self) -> CheckpointManifest | None:
        ck = self._newest()
        return None if ck is None else ck.manifest

    def chunk(self, digest: bytes, index: int) -> bytes | None:
        ck = self.index.by_digest.get(digest)
        if ck is None or not 0 <= index < len(ck.manifest.chunks):
            return None
        heads = self._path()[1]
        if ck.round >= len(heads) or heads[ck.round] != ck.head:
            return None  # not on this node's chain
        return ck.chunk(index)
