"""The node's persisted chain and model: what the daemon keeps on disk and serves to peers.

``LocalChain`` turns the core's effects into files and tensors. ``Apply`` steps go to the
crash-safe store (truncated to the common ancestor first after a fork switch, never more than the
core's bounded undo) and to the model; checkpoints are written every ``checkpoint_every`` rounds
and served in chunks; a downloaded checkpoint becomes the model's new base. It also answers the
core's read-only ``History`` questions (records, heads, the checkpoint we serve), so a chain
request is answered in one place, by the core, from what is stored here.

On start the chain states are rebuilt from the genesis over the stored records (the model from
the newest local checkpoint on that chain, plus the records after it). A damaged record in the
middle of the store is a hole: the chain stops before it, the core re-fetches it from peers, and
the records after it that still match are kept (``store.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack
import torch

from seedswarm.gossip.wire import CheckpointManifest, Record, WireError, decode_as
from seedswarm.node.core.chain import ChainState, RecordError, checked_next_state, record_hash
from seedswarm.node.core.effects import Apply, InstallCheckpoint
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.daemon.config import DEFAULT_STATE_CACHE_MB
from seedswarm.node.daemon.store import ChainStore, CheckpointDir, StoredCheckpoint
from seedswarm.node.learn.checkpoint import (
    Checkpoint,
    CheckpointError,
    decode_params,
    encode_params,
)
from seedswarm.node.learn.replay import ModelStates

log = logging.getLogger("seedswarm.daemon")

STATE_BUDGET_BYTES = DEFAULT_STATE_CACHE_MB << 20
"""Default memory for the kept model states (``ModelStates``), whatever the model's size.

Each kept state is a full parameter copy: 16 of them (``keep_states``) are 54 MB for the
default ``lm`` model but 6.4 GB at 100M float32 parameters, so the count alone does not bound
a node's memory. With this budget a model up to 16M parameters keeps all 16 and a 100M one
keeps 2 (never fewer). A fork switch deeper than what is kept replays from the newest local
checkpoint (``rebuild``): slower, same bits. ``seedswarm node --state-cache-mb`` overrides it.
"""


SUPERSEDED_GRACE_S = 120.0
"""How long a checkpoint stays served after a newer one replaced it (the joiner's download time)."""
MAX_SERVED = 8
"""Checkpoints served at most (open files; unlinked ones hold their disk space until closed)."""


class LocalChain:
    states: ModelStates  # parameters of recent heads (set by rebuild)

    def __init__(self, genesis: Genesis, store: ChainStore, ckdir: CheckpointDir,
                 genesis_params: Sequence[torch.Tensor], checkpoint_every: int, keep_states: int = 16,
                 state_budget_bytes: int | None = STATE_BUDGET_BYTES,
                 scale: Sequence[torch.Tensor] | None = None, momentum: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.genesis = genesis
        self.scale = scale  # the initial model's direction scale (precondition.py), None: plain
        self.momentum = momentum  # replayed momentum (momentum.py); genesis_params then holds its buffers
        self.run_id = genesis.run_id
        self.store = store
        self.ckdir = ckdir
        self.genesis_params = list(genesis_params)
        self.checkpoint_every = checkpoint_every
        self.keep_states = keep_states
        self.state_budget_bytes = state_budget_bytes
        # checkpoints we serve, by blob hash: manifests in memory, chunks read from their files
        # The event loop stores records and answers peers from this object while the daemon's
        # worker thread moves the model (``advance_model``, ``params``, checkpoints): the lock
        # covers the store and the heads; the tensor work runs outside it. The worker is the
        # only writer of ``states``.
        self.lock = threading.RLock()
        self.recent: OrderedDict[bytes, StoredCheckpoint] = OrderedDict()
        self._added: dict[bytes, float] = {}  # when each served checkpoint was written (clock)
        self.clock = clock
        self.checkpoint: StoredCheckpoint | None = None  # the newest on our chain
        self.heads: list[bytes] = []
        self.head = ChainState.initial(genesis)
        self.base_round = 0
        self.dirty = False  # records were stored without moving the model (a checkpoint is coming)
        self.archived: list[Path] = []
        self.rebuild()

    # ------------------------------------------------------------------ rebuilding
    def rebuild(self) -> None:
        """Chain states from the genesis over the stored records (stopping at the first hole or
        invalid record), then the model from the newest local checkpoint on that chain."""
        with self.lock:
            self._rebuild()

    def _rebuild(self) -> None:
        st = ChainState.initial(self.genesis)
        states = [st]
        decoded: list[Record] = []
        for i, data in enumerate(self.store.records()):
            try:
                rec = decode_as(data, Record, self.run_id)
                states.append(checked_next_state(states[-1], rec))
            except (WireError, RecordError) as e:
                log.warning("stored record %d is invalid (%s): keeping the %d records before it", i, e, i)
                self.store.truncate(i)
                break
            decoded.append(rec)
        self.heads = [s.head for s in states]
        if getattr(self, "states", None) is not None:
            self.states.clear()  # drop the old kept states before making new ones (peak memory)
        base, params = self._local_checkpoint()
        self.base_round = base
        self.states = ModelStates(states[base], params, keep=self.keep_states,  # a copy of params
                                  budget_bytes=self.state_budget_bytes, scale=self.scale, momentum=self.momentum)
        del params
        self.states.advance(states[base], [(states[i], decoded[i]) for i in range(base, len(decoded))])
        self.head = states[-1]
        self.dirty = False

    def _local_checkpoint(self) -> tuple[int, Sequence[torch.Tensor]]:
        """The newest local checkpoint on our chain (round, parameters), kept for serving as
        ``self.checkpoint``; (0, the genesis parameters) when there is none."""
        self.checkpoint = None
        for ck, blob in self.ckdir.load_each():
            if ck.round < len(self.heads) and self.heads[ck.round] == ck.head:
                try:
                    _, _, params = decode_params(blob, self.genesis_params)
                except CheckpointError as e:
                    log.warning("local checkpoint of round %d unusable: %s", ck.round, e)
                    ck.close()
                    continue
                self.checkpoint = ck
                self._remember(ck)
                return ck.round, params
            ck.close()
        return 0, self.genesis_params

    def params(self, head: bytes) -> list[torch.Tensor] | None:
        """The parameters at ``head`` (rebuilt first if records were stored without the model)."""
        with self.lock:
            if self.dirty and head == self.head.head:
                self.rebuild()
        return self.states.get(head)

    # ------------------------------------------------------------------ effects
    def apply(self, e: Apply) -> list[torch.Tensor] | None:
        """Persist the steps and move the model (both here: inline drivers and tests); returns
        the parameters at the new head, or None while the model waits for a checkpoint."""
        if not self.record_steps(e):
            return None
        moved = self.advance_model(e)
        return None if moved is None else moved[1]

    def record_steps(self, e: Apply) -> bool:
        """The event loop's half of an ``Apply``: persist the steps (after undoing back to
        ``e.base``) and move the head; cheap. Returns whether the model should follow now
        (False while it waits for a checkpoint)."""
        with self.lock:
            undone = self.head.round - e.base.round
            if undone > 0:
                log.info("fork switch: undoing %d stored round(s) back to round %d", undone, e.base.round)
                self.store.truncate(e.base.round)
                del self.heads[e.base.round + 1 :]
            for i, (_, rec) in enumerate(e.steps):
                self._store_record(e.base.round + i, rec.encode())
                self.heads.append(record_hash(rec))
            self.head = e.head
            if e.catching_up:
                self.dirty = True
                return False
            return True

    def advance_model(self, e: Apply) -> tuple[ChainState, list[torch.Tensor]] | None:
        """The worker's half: the model at ``e.head`` (the tensor work, outside the lock), or at
        the stored head after a rebuild (which may be ahead of ``e.head`` by then: the loop kept
        storing meanwhile). Returns the state the parameters belong to, with them."""
        with self.lock:
            if self.dirty or not self.states.has(e.base.head):
                return self._rebuilt()
        try:
            return e.head, self.states.advance(e.base, e.steps)
        except KeyError as err:
            log.warning("cannot apply from round %d (%s): rebuilding from the store", e.base.round, err)
            with self.lock:
                return self._rebuilt()

    def _rebuilt(self) -> tuple[ChainState, list[torch.Tensor]] | None:
        self.rebuild()
        params = self.states.get(self.head.head)
        return None if params is None else (self.head, params)

    def _store_record(self, idx: int, data: bytes) -> None:
        """Store record ``idx``, the one after our head. Past a damaged part the store may
        already hold slot ``idx``: fill it if it is a hole, keep it if it is this record, cut the
        stored tail from it if it differs (our old records after the hole are not the chain)."""
        if idx < len(self.store):
            stored = self.store[idx]
            if stored is None:
                self.store.fill(idx, data)
                return
            if stored == data:
                return
            log.info("stored records from round %d on are not the chain's: cutting %d", idx, len(self.store) - idx)
            self.store.truncate(idx)
        self.store.append(data)

    def install(self, e: InstallCheckpoint, chunk_bytes: int) -> bool:
        """Keep a downloaded checkpoint: the model restarts from it on the next rebuild."""
        try:
            decode_params(e.blob, self.genesis_params)
            ck = Checkpoint.from_blob(self.run_id, e.blob, chunk_bytes)
        except CheckpointError as err:
            log.warning("downloaded checkpoint of round %d unusable (%s): replaying instead", e.round, err)
            return False
        self.ckdir.save(ck).close()  # served once the rebuild loads it
        with self.lock:
            self.dirty = True
        return True

    def maybe_checkpoint(self, params: Sequence[torch.Tensor] | None, force: bool = False,
                         at: ChainState | None = None) -> None:
        """A checkpoint of ``params``, the model at ``at`` (default: our head), if due."""
        st = self.head if at is None else at
        r = st.round
        if params is None or r <= 0 or not (force or (self.checkpoint_every and r % self.checkpoint_every == 0)):
            return
        ck = Checkpoint.from_blob(self.run_id, encode_params(r, st.head, params), self.ckdir.chunk_bytes)
        try:
            stored = self.ckdir.save(ck)
        except OSError as err:
            log.warning("cannot save the checkpoint of round %d: %s", r, err)
            return
        self.checkpoint = stored
        self._remember(stored)

    def _remember(self, ck: StoredCheckpoint) -> None:
        # Any recent checkpoint is served, not only the newest: a joiner that got a manifest a
        # moment ago keeps fetching its chunks while we write the next one. Each holds an open
        # file (its chunks are read on demand), closed when it is dropped or replaced.
        # A superseded checkpoint stays served for SUPERSEDED_GRACE_S (up to MAX_SERVED files):
        # a joiner that chose it may need that long to fetch it on a slow link, and with fast
        # rounds the count alone retired it within seconds (the joiner then had to start over).
        now = self.clock()
        old = self.recent.pop(ck.manifest.state, None)
        if old is not None and old is not ck:
            old.close()
        self.recent[ck.manifest.state] = ck
        self._added[ck.manifest.state] = now
        while len(self.recent) > max(2, self.ckdir.keep + 1):
            digests = list(self.recent)
            if len(digests) <= MAX_SERVED and now - self._added[digests[1]] < SUPERSEDED_GRACE_S:
                break  # the oldest was superseded only a moment ago
            self._added.pop(digests[0], None)
            self.recent.pop(digests[0]).close()

    def close(self) -> None:
        """Close the files of the checkpoints we serve (the process's end does it too)."""
        for ck in self.recent.values():
            ck.close()
        self.recent.clear()
        self._added.clear()

    def archive_after(self, fork_round: int) -> Path | None:
        """Move the stored records after ``fork_round`` to a side file (nothing is deleted), cut
        the store there and rebuild: the peers agree on another chain from that point."""
        with self.lock:
            return self._archive_after(fork_round)

    def _archive_after(self, fork_round: int) -> Path | None:
        if fork_round >= len(self.store):
            return None
        path = self.store.path.with_name(f"{self.store.path.name}.fork-{fork_round}-{int(time.time())}")
        kept = [r for r in (self.store[i] for i in range(fork_round, len(self.store))) if r is not None]
        path.write_bytes(msgpack.packb({"run": self.run_id, "from_round": fork_round, "records": kept}))
        self.archived.append(path)
        log.warning("resync: archived %d record(s) after round %d to %s", len(kept), fork_round, path)
        self.store.truncate(fork_round)
        self.rebuild()
        return path

    # ------------------------------------------------------------------ core History
    def length(self) -> int:
        return self.head.round

    def record(self, r: int) -> bytes | None:
        with self.lock:  # the worker may be rebuilding (and cutting) the store
            if not 0 <= r < self.head.round or r >= len(self.store):
                return None
            return self.store[r]

    def head_at(self, r: int) -> bytes | None:
        return self.heads[r] if 0 <= r < len(self.heads) else None

    def manifest(self) -> CheckpointManifest | None:
        ck = self.checkpoint
        if ck is None or ck.round >= len(self.heads) or self.heads[ck.round] != ck.head:
            return None
        return ck.manifest

    def chunk(self, digest: bytes, index: int) -> bytes | None:
        ck = self.recent.get(digest)
        if ck is None or not 0 <= index < len(ck.manifest.chunks):
            return None
        return ck.chunk(index)
