"""Reputation from a peer's distance to the per-direction median: a secondary signal only.

All trainers of a round measure the same directions, so column ``k`` of a round's inputs holds
``n`` estimates of one scalar and its median is a robust reference. A trainer whose bytes sit far
from the medians, round after round, is either broken or lying; one whose bytes sit close is at
least not loud. This module turns that into an exponentially decayed score per peer in ``(0, 1]``.

Why *secondary*: the robust aggregate already bounds what any minority can do in the round itself
(that is the defence). Reputation only summarises behaviour over time, for operators and for
down-scoring peers in the transport. It cannot be a consensus input: it depends on the inputs a
node happened to fetch, and it is blind to the attacks built to look honest (ALIE sits inside the
honest spread by construction, zeros and mimic sit near the median). It catches the loud ones
(saturated sign flips, random bytes), whose rounds the robust aggregate has already neutralised.

Definitions, for one round with rows ``q_i`` (``K`` signed bytes each) and per-direction medians
``m_k`` (the mean of the two middle values for an even count):

* distance ``d_i = mean_k |q_ik - m_k|`` (in quantization steps);
* relative distance ``rho_i = d_i / max(median_j d_j, 0.5)``: about 1 for a typical honest row,
  whatever the round's noise level (the floor keeps a round of identical rows from dividing by 0);
* round signal ``s_i = exp(-max(0, rho_i - 1))``: 1 for anything up to a typical distance, then
  decaying (``rho = 3`` gives 0.14, a saturated sign flip against honest bytes of ~20 steps ~ 0);
* score ``r_i <- decay * r_i + (1 - decay) * s_i``, starting at 1 for a peer never seen.

Pure functions over plain values: no clock, no state, the same result on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_DECAY", "distances", "relative_distances", "round_signals", "update_scores"]

DEFAULT_DECAY = 0.9
"""Weight of the past: a score forgets a round's signal with a half-life of about 6.6 rounds of duty."""


def _matrix(rows: Sequence[bytes]) -> np.ndarray:
    if not rows:
        raise ValueError("no rows")
    k = len(rows[0])
    if any(len(r) != k for r in rows):
        raise ValueError("rows of different lengths")
    return np.frombuffer(b"".join(bytes(r) for r in rows), dtype=np.int8).reshape(len(rows), k).astype(np.float64)


def distances(rows: Sequence[bytes]) -> list[float]:
    """``d_i``: mean absolute distance of each row's signed bytes to the per-direction median."""
    m = _matrix(rows)
    med = np.median(m, axis=0)
    return [float(x) for x in np.abs(m - med).mean(axis=1)]


def relative_distances(rows: Sequence[bytes]) -> list[float]:
    """``rho_i = d_i / max(median_j d_j, 0.5)``: ~1 for a typical row of the round."""
    d = distances(rows)
    ref = max(float(np.median(d)), 0.5)
    return [x / ref for x in d]


def round_signals(rows: Sequence[bytes]) -> list[float]:
    """``s_i = exp(-max(0, rho_i - 1))`` in (0, 1]: this round's evidence about each row's sender."""
    return [math.exp(-max(0.0, r - 1.0)) for r in relative_distances(rows)]


def update_scores(
    scores: Mapping[bytes, float],
    peers: Sequence[bytes],
    rows: Sequence[bytes],
    decay: float = DEFAULT_DECAY,
) -> dict[bytes, float]:
    """New scores after one round: ``peers[i]`` sent ``rows[i]``; peers not in the round keep theirs."""
    if len(peers) != len(rows):
        raise ValueError("one row per peer")
    if not 0.0 <= decay < 1.0:
        raise ValueError("decay must be in [0, 1)")
    out = dict(scores)
    if not rows:
        return out
    for p, s in zip(peers, round_signals(rows), strict=True):
        out[p] = decay * out.get(p, 1.0) + (1.0 - decay) * s
    return out
