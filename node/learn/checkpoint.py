"""Content-addressed, chunked model checkpoints: what a joining node downloads instead of a replay.

A checkpoint is the model's parameters after round ``round`` (chain head ``head``), as one blob
(msgpack of dtype, shape and raw bytes per tensor). Its manifest names the blob by hash and lists
the hash of every fixed-size chunk, so a joiner can fetch chunks from several peers at once and
check each one on arrival; a peer that serves a bad chunk is caught at that chunk, not after the
whole download. The manifest's ``head`` ties the parameters to a chain position the joiner has
already verified record by record (records are tiny; parameters are not).

What a checkpoint cannot prove is that its parameters really are replay(genesis, records): only
a full replay can. The joiner therefore takes the manifest that most of the peers it asked agree
on (``node.core.joinplan``), and any node can audit a checkpoint by replaying.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import torch

from seedswarm.gossip.wire import CheckpointManifest
from seedswarm.node.core.joinplan import CheckpointError, manifest_of

__all__ = ["Checkpoint", "CheckpointError", "decode_params", "encode_params"]

MAGIC = b"seedswarm-ckpt-v1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


def encode_params(round_: int, head: bytes, params: Sequence[torch.Tensor]) -> bytes:
    tensors = []
    for p in params:
        t = p.detach().contiguous().cpu()
        tensors.append([str(t.dtype), list(t.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b""])
    blob: bytes = msgpack.packb([MAGIC, round_, head, tensors], use_bin_type=True)
    return blob


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


class ManifestNamed:
    """Round and head of a checkpoint, read from its manifest (in memory or served from a file)."""

    manifest: CheckpointManifest

    @property
    def round(self) -> int:
        return self.manifest.round

    @property
    def head(self) -> bytes:
        return self.manifest.head


@dataclass(frozen=True)
class Checkpoint(ManifestNamed):
    """A checkpoint held in memory (blob + manifest), ready to serve chunks."""

    manifest: CheckpointManifest
    blob: bytes
    chunk_bytes: int

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
        return cls(manifest_of(run, round_, head, blob, chunk_bytes), blob, chunk_bytes)
