"""Content-addressed, chunked model checkpoints: what a joining node downloads instead of a replay.

A checkpoint is the model's parameters after round ``round`` (chain head ``head``), as one blob
(msgpack of dtype, shape and raw bytes per tensor). Its manifest names the blob by hash and lists
the hash of every fixed-size chunk, so a joiner can fetch chunks from several peers at once and
check each one on arrival; a peer that serves a bad chunk is caught at that chunk, not after the
whole download. The manifest's ``head`` ties the parameters to a chain position the joiner has
already verified record by record (records are tiny; parameters are not).

What a checkpoint cannot prove is that its parameters really are replay(genesis, records): only
a full replay can. The joiner therefore takes the manifest that most of the peers it asked agree
on (see :func:`choose_manifest`), and any node can audit a checkpoint by replaying.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from seedswarm.crypto.hashing import h
from seedswarm.gossip.wire import CheckpointManifest
from seedswarm.node.files import atomic_write

log = logging.getLogger("seedswarm.checkpoint")

MAGIC = b"seedswarm-ckpt-v1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


class CheckpointError(Exception):
    """A checkpoint (file, manifest or chunk) that does not check out."""


def blob_hash(blob: bytes) -> bytes:
    return h(b"seedswarm/checkpoint", blob)


def chunk_hash(chunk: bytes) -> bytes:
    return h(b"seedswarm/checkpoint-chunk", chunk)


def encode_params(round_: int, head: bytes, params: Sequence[torch.Tensor]) -> bytes:
    tensors = []
    for p in params:
        t = p.detach().contiguous().cpu()
        tensors.append([str(t.dtype), list(t.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b""])
    return msgpack.packb([MAGIC, round_, head, tensors], use_bin_type=True)  # type: ignore[no-any-return]


def decode_params(blob: bytes, like: Sequence[torch.Tensor]) -> tuple[int, bytes, list[torch.Tensor]]:
    """Parameters from a blob, checked against the model's own shapes and dtypes."""
    try:
        magic, round_, head, tensors = msgpack.unpackb(blob, raw=False, max_str_len=64, max_array_len=1 << 16)
    except Exception as e:
        raise CheckpointError(f"malformed checkpoint: {type(e).__name__}") from None
    if magic != MAGIC or type(round_) is not int or type(head) is not bytes or len(tensors) != len(like):
        raise CheckpointError("not a checkpoint of this model")
    out: list[torch.Tensor] = []
    for (dtype, shape, raw), ref in zip(tensors, like, strict=True):
        if dtype != str(ref.dtype) or list(shape) != list(ref.shape):
            raise CheckpointError(f"tensor {dtype}{shape} does not match the model's {ref.dtype}{list(ref.shape)}")
        t = torch.empty(tuple(shape), dtype=ref.dtype)
        if t.numel():
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if flat.numel() != t.numel() * t.element_size():
                raise CheckpointError("tensor data has the wrong size")
            t = flat.view(ref.dtype).reshape(tuple(shape)).clone()
        out.append(t.to(ref.device))
    return round_, head, out


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint held in memory (blob + manifest), ready to serve chunks."""

    manifest: CheckpointManifest
    blob: bytes
    chunk_bytes: int

    @property
    def round(self) -> int:
        return self.manifest.round

    @property
    def head(self) -> bytes:
        return self.manifest.head

    def chunk(self, index: int) -> bytes:
        if not 0 <= index < len(self.manifest.chunks):
            raise CheckpointError(f"no chunk {index}")
        return self.blob[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]

    @classmethod
    def from_blob(cls, run: bytes, blob: bytes, chunk_bytes: int) -> Checkpoint:
        try:
            magic, round_, head, _ = msgpack.unpackb(blob, raw=False, max_str_len=64, max_array_len=1 << 16)
        except Exception as e:
            raise CheckpointError(f"malformed checkpoint: {type(e).__name__}") from None
        if magic != MAGIC or type(round_) is not int or type(head) is not bytes or len(head) != 32:
            raise CheckpointError("not a seedswarm checkpoint")
        chunks = tuple(chunk_hash(blob[i : i + chunk_bytes]) for i in range(0, max(1, len(blob)), chunk_bytes))
        if len(chunks) > 16384:
            raise CheckpointError("checkpoint has too many chunks for a manifest: raise checkpoint_chunk_bytes")
        m = CheckpointManifest(run=run, round=round_, head=head, state=blob_hash(blob), size=len(blob), chunks=chunks)
        return cls(m, blob, chunk_bytes)


class CheckpointDir:
    """``<data dir>/checkpoints``: ``<round>-<head>.ckpt`` files written atomically, newest kept."""

    def __init__(self, path: Path, run: bytes, chunk_bytes: int, keep: int) -> None:
        self.path = path
        self.run = run
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _name(self, round_: int, head: bytes) -> Path:
        return self.path / f"{round_:010d}-{head.hex()[:16]}.ckpt"

    def save(self, ckpt: Checkpoint) -> None:
        atomic_write(self._name(ckpt.round, ckpt.head), ckpt.blob, mode=0o600)
        files = sorted(self.path.glob("*.ckpt"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)

    def load_all(self) -> list[Checkpoint]:
        """Every readable checkpoint, newest first (a corrupt file is skipped with a warning)."""
        out: list[Checkpoint] = []
        for f in sorted(self.path.glob("*.ckpt"), reverse=True):
            try:
                out.append(Checkpoint.from_blob(self.run, f.read_bytes(), self.chunk_bytes))
            except (OSError, CheckpointError) as e:
                log.warning("skipping checkpoint %s: %s", f, e)
        return out

    def remove(self, ckpt: Checkpoint) -> None:
        self._name(ckpt.round, ckpt.head).unlink(missing_ok=True)


def choose_manifest(manifests: Sequence[tuple[str, CheckpointManifest]], heads: Sequence[bytes]) -> tuple[CheckpointManifest, list[str]] | None:
    """The newest manifest that sits on our verified chain and that most peers agree on.

    ``manifests``: (peer, manifest) answers; ``heads[r]``: our chain's head after r records.
    Returns the manifest and the peers that serve it (chunks are fetched from all of them).
    """
    on_chain = [(p, m) for p, m in manifests if m.round < len(heads) and heads[m.round] == m.head]
    if not on_chain:
        return None
    votes = Counter(m.encode() for _, m in on_chain)
    best = max(on_chain, key=lambda pm: (pm[1].round, votes[pm[1].encode()]))[1]
    # Among the manifests for that round, the one most peers serve.
    same_round = [m for _, m in on_chain if m.round == best.round]
    best = max(same_round, key=lambda m: votes[m.encode()])
    peers = [p for p, m in on_chain if m.encode() == best.encode()]
    return best, peers


def assemble(manifest: CheckpointManifest, chunks: Sequence[bytes]) -> bytes:
    blob = b"".join(chunks)
    if len(blob) != manifest.size or blob_hash(blob) != manifest.state:
        raise CheckpointError("assembled checkpoint does not match its manifest")
    return blob


def check_chunk(manifest: CheckpointManifest, index: int, data: bytes) -> None:
    if not 0 <= index < len(manifest.chunks) or chunk_hash(data) != manifest.chunks[index]:
        raise CheckpointError(f"chunk {index} does not match the manifest")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
