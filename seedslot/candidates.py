"""Candidate weights and initial scores, regenerated from seeds instead of stored.

Candidate ``k`` of connection ``c`` is ``signed24(bits(c, key_a, keys_b)[k]) * sigma / 2**23``:
uniform on the 2**24-point grid of [-sigma, sigma), with sigma the layer's Glorot bound. It does
not depend on K, so a layer with K = 16 holds the K = 8 candidates plus eight more. With sharing,
the connection index is replaced by 0: one set of K values per layer (``"layer"``) or, when every
layer uses the model's seed as its candidate seed, for the whole model (``"global"``, each layer
scaling the same unit draws by its own sigma).

Initial scores ``U(0, lambda*sigma)`` come from another stream of the layer's seed. int8 scores
take the top 7 bits of the same draws, so they are the fp32 scores quantised to ``lambda*sigma/127``.
The kernels that regenerate them are the op layer's (:mod:`seedslot.ops`).
"""

from __future__ import annotations

import enum
import math

import torch

from .ops import CandidateKeys, candidate_values, i32, initial_scores, selected_values
from .rng import key32, keys32

__all__ = ["SHARING", "Stream", "CandidateKeys", "glorot_sigma", "grid_step", "stream_keys", "init_scores",
           "candidate_values", "selected_values", "i32"]

SHARING = ("none", "layer", "global")


class Stream(enum.IntEnum):
    """The stream tags: every random number of a layer comes from ``derive(seed, tag, ...)``. The
    values are part of the random stream: they never change."""

    CANDIDATES = 1
    INITIAL_SCORES = 2
    SAMPLE = 3
    ROUND = 4
    REQUANT = 5


def glorot_sigma(fan_in: int, fan_out: int) -> float:
    """The Glorot/Xavier uniform bound sqrt(6 / (fan_in + fan_out)), rounded to fp32."""
    return float(torch.tensor(math.sqrt(6.0 / (fan_in + fan_out)), dtype=torch.float32))


def grid_step(bound: float) -> torch.Tensor:
    """``bound / 2**23`` as an fp32 0-dim tensor (exact: a power-of-two division)."""
    return torch.tensor(bound, dtype=torch.float32) * (2.0**-23)


def stream_keys(seed: int, tag: int, k: int, device=None) -> tuple[int, torch.Tensor]:
    """``(key_a, keys_b)`` of one stream: keys_b has one int32 key per candidate."""
    kb = torch.from_numpy(keys32(seed, tag, 1, count=k)).to(device)
    return key32(seed, tag, 0), kb


def init_scores(
    rows: int, k: int, seed: int, bound: float, conn_offset: int, dtype: torch.dtype, device=None
) -> tuple[torch.Tensor, float]:
    """Initial scores (rows, k) and their scale: ``U(0, bound)`` in fp32, or int8 levels 0..127
    with scale ``bound / 127``."""
    key_a, kb = stream_keys(seed, Stream.INITIAL_SCORES, k, device)
    out = initial_scores(rows, key_a, kb, bound, conn_offset, dtype)
    scale = bound / 127.0 if dtype == torch.int8 else 1.0
    return out, scale
