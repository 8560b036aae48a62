"""Score updates: the straight-through step ``s_k -= lr * D * W_k`` applied without storing W.

The arithmetic around the kernels (:mod:`seedslot.ops` runs them): how far one step may move an
int8 level, and the norms the grid decision reads.

``D`` is one fp32 value per connection (the effective-weight gradient G, or its momentum, which
factorises: the momentum of ``G * W_k`` is ``W_k`` times the momentum of ``G``). Each kernel
regenerates a chunk of candidates, applies the update and writes the scores back, so no float
tensor of K values per connection ever exists for more than one chunk.

int8 scores hold ``s = q * scale`` with one fp32 scale per tensor. An update adds
``-lr * D * W_k / scale`` levels and rounds stochastically (``floor(t + r)``, r ~ U[0, 1) from the
counter-based random function: unbiased, and reproducible from the seed and the step). When a
connection's largest level passes 127 all its K levels are shifted down together (selection is
invariant to that), so the top stays at 127 and only levels 255 below it are clipped at -128. A
step that could move a level by more than ``MAX_LEVELS`` first coarsens the grid by a power of two
(requantising stochastically), so no update can overflow int8 whatever its size. The device makes
that decision (:func:`coarsen_factor`): a step reads nothing back to the host.

``scores="implicit"`` stores no score at all. Every straight-through update moves a connection's K
scores along the same direction, ``-W``, and a decoupled weight decay rescales them all, so the
scores are always ``s_k = c * s0_k - A * W_k``: ``s0`` the initial scores and ``W`` the candidates
(both regenerated from seeds), ``c`` one fp32 factor per layer part and ``A`` one fp32 *drift*
per connection. An update is ``A += lr * D`` (no regeneration, no rounding), and selection
regenerates the K candidates and initial scores of each connection. The scores are those of
``scores="fp32"`` up to fp32 rounding order, at 4 bytes per connection whatever K.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MAX_LEVELS", "max_abs", "max_abs_all", "coarsen_factor"]

MAX_LEVELS = 64.0  # the most levels one step may move a score; half the int8 range


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """The infinity norm of ``t`` (NaN if it holds a NaN), by one min-max pass: on the CPU much
    faster than ``torch.linalg.vector_norm(t, inf)``, which is the same value."""
    if t.numel() == 0 or t.is_complex():
        return torch.linalg.vector_norm(t, math.inf)
    lo, hi = torch.aminmax(t)
    return torch.maximum(lo.neg(), hi)


def max_abs_all(tensors: list[torch.Tensor]) -> list[float]:
    """:func:`max_abs` of every tensor, as Python floats: one min-max pass each and, for real
    tensors on one device, a single host sync for all (a step checks them all)."""
    if any(t.is_complex() for t in tensors) or len({t.device for t in tensors}) > 1:
        return [float(max_abs(t)) for t in tensors]
    ends = [end for t in tensors for end in (torch.aminmax(t) if t.numel() else (t.new_zeros(()),) * 2)]
    if not ends:
        return []
    if len({e.dtype for e in ends}) > 1:
        ends = [e.to(torch.float64) for e in ends]
    flat = torch.stack(ends).tolist()
    return [math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi) for lo, hi in zip(flat[::2], flat[1::2])]


def coarsen_factor(lr: float, d_max: torch.Tensor, w_max: float | torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The power of two by which the int8 grid must coarsen so that one step moves a level by at
    most MAX_LEVELS (1 when it already does), as a float64 tensor decided on the device: the fp32
    ``d_max`` (max |direction|) and ``scale`` are never read back. Elementwise: 0-dim for one part,
    or vectors of one value per part (``w_max`` then a float64 vector) with the same bits. The
    caller (SlotSGD) has checked that the update is finite."""
    levels = d_max.to(torch.float64) * lr * w_max / scale.to(torch.float64)
    # 2**ceil(log2(x)), exactly: x = m * 2**e with m in [0.5, 1), so 2**e, or 2**(e-1) when m = 0.5
    # (math.log2 would round some x just above a power of two down to it)
    mantissa, exponent = torch.frexp(levels / MAX_LEVELS)
    power = torch.ldexp(torch.ones_like(levels), exponent - (mantissa == 0.5).to(exponent.dtype))
    return torch.where(levels <= MAX_LEVELS, 1.0, power)
