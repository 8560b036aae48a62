"""The torch kernels of the op layer: the reference bodies of every hot operation.

Pure tensor functions of one chunk of connections (``start`` is the first connection's index, a
0-dim int32 tensor like every key, offset and rate, so a new value never recompiles). Each is a
:class:`seedslot.ops._backends.Fused`: eager, or fused by ``torch.compile`` when enabled; the ones
with a Triton twin name it (:mod:`seedslot.ops._triton`). Several forms of one update (rows,
hashed, unrolled, packed) give the same bits and differ only in speed by K and layout; the op
layer's CPU kernels choose among them.

int8 scores hold ``s = q * scale`` with one fp32 scale per tensor. An update adds
``-lr * D * W_k / scale`` levels and rounds stochastically (``floor(t + r)``, r ~ U[0, 1) from the
counter-based random function: unbiased, and reproducible from the seed and the step). When a
connection's largest level passes 127 all its K levels are shifted down together (selection is
invariant to that), so the top stays at 127 and only levels 255 below it are clipped at -128.

Implicit scores are ``s_k = c * s0_k - A * W_k``: ``s0`` the initial scores and ``W`` the
candidates (both regenerated from seeds), ``c`` one fp32 factor per layer part and ``A`` one fp32
drift per connection (see :mod:`seedslot.updates`).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from ..rng import bits, mix32, noise_bits, noise_round, signed24, unit24
from ._backends import fused

# Kernels unrolled over the K candidates compile in time and memory proportional to K; above this
# K the (n, K) form is used, which gives the same bits.
UNROLL_MAX_K = 8

# int8 scores of one connection read as whole machine words, by K: inductor's own argmax over a
# small static K is slow, an elementwise pass over packed words is several times faster.
_WORDS = {2: torch.int16, 4: torch.int32}
_WORDS.update({k: torch.int64 for k in range(8, 65, 8)})


def packed_words(scores: torch.Tensor) -> torch.Tensor | None:
    """(n, K) int8 levels as (n, W) little-endian machine words, each packing 2, 4 or 8 of a
    connection's levels (K = 2, 4 or a multiple of 8 up to 64), or None where they cannot be read
    so: another dtype or K, a non-contiguous or big-endian layout."""
    k = scores.shape[-1]
    if (scores.dtype == torch.int8 and scores.dim() == 2 and k in _WORDS and sys.byteorder == "little"
            and scores.is_contiguous()):
        return scores.view(_WORDS[k])
    return None


def connections(start, n: int, per_conn: int, device) -> torch.Tensor:
    """Connection indices ``start .. start+n-1`` (int32), or zeros when candidates are shared.
    ``start`` may be an int or a 0-dim int32 tensor (kernels take tensors: no recompiles)."""
    return (torch.arange(n, dtype=torch.int32, device=device) + start) * per_conn


# ---------------------------------------------------------------- candidates


@fused(triton="candidate_chunk")
def candidate_chunk(
    start: torch.Tensor, n: int, per_conn: int, key_a: torch.Tensor, keys_b: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Candidates of connections ``start .. start+n-1``: (n, K) float32."""
    c = connections(start, n, per_conn, keys_b.device)
    return signed24(bits(c, key_a, keys_b)).to(torch.float32) * step


@fused("idx", triton="selected_chunk")
def selected_chunk(
    idx: torch.Tensor, start: torch.Tensor, per_conn: int, key_a: torch.Tensor, keys_b: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """The candidate ``idx[i]`` of connection ``start + i``: (n,) float32, one hash per value."""
    c = connections(start, idx.shape[0], per_conn, keys_b.device)
    b = bits(c, key_a, keys_b[idx].unsqueeze(-1)).squeeze(-1)
    return signed24(b).to(torch.float32) * step


# ---------------------------------------------------------------- selection


@fused("scores", triton="greedy")
def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)``: what :func:`greedy` runs on CUDA, where its twin is one Triton kernel."""
    return scores.argmax(dim=-1)


@fused("words", triton="packed_argmax")
def packed_argmax(words: torch.Tensor) -> torch.Tensor:
    """(n, W) words, each packing int8 scores in little-endian lanes -> (n,) int64 argmax of the
    scores, the lowest index on ties (as torch.argmax)."""
    lanes = words.element_size()
    best = idx = None
    for j in range(words.shape[1]):
        w = words[:, j].to(torch.int64)
        for lane in range(lanes):
            v = (w << (56 - 8 * lane)) >> 56  # lane's byte, sign-extended
            if best is None:
                best, idx = v, torch.zeros_like(v)
            else:
                better = v > best  # strict: an equal later score never wins
                best = torch.where(better, v, best)
                idx = torch.where(better, j * lanes + lane, idx)
    return idx


@fused("words")
def packed_greedy(words: torch.Tensor, start: torch.Tensor, per_conn: int, key_a: torch.Tensor,
                  keys_b: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`packed_argmax` and the candidate it selects (as :func:`selected_chunk` makes
    it, bit for bit) in one kernel: one pass over the scores instead of two."""
    idx = packed_argmax.eager(words)
    c = connections(start, words.shape[0], per_conn, words.device)
    return idx, signed24(mix32(mix32(c ^ key_a) ^ keys_b[idx])).to(torch.float32) * step


@fused("scores", triton="sample_chunk")
def sample_chunk(
    scores: torch.Tensor, scale: torch.Tensor, start: torch.Tensor, key_a: torch.Tensor, keys_b: torch.Tensor
) -> torch.Tensor:
    """(n, K) scores of connections ``start..`` -> (n,) int64 index drawn from softmax(scores*scale)."""
    c = connections(start, scores.shape[0], 1, scores.device)
    u = (((bits(c, key_a, keys_b) >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (2.0**-24)  # (0, 1)
    gumbel = -torch.log(-torch.log(u))
    return (scores.to(torch.float32) * scale + gumbel).argmax(dim=-1)


# ---------------------------------------------------------------- score updates


@fused("q", "d", triton="int8_update")
def int8_update_rows(q, d, coef, start, per_conn: int, key_a, keys_b, step, round_a, round_b) -> torch.Tensor:
    """:func:`int8_update_unrolled` on (n, K) tensors: what the CUDA kernel runs (as its Triton
    twin), and the reference the hashed and packed forms equal bit for bit."""
    n = q.shape[0]
    w = signed24(bits(connections(start, n, per_conn, q.device), key_a, keys_b)).to(torch.float32) * step
    r = unit24(noise_bits(connections(start, n, 1, q.device), round_a, round_b))  # (n, K) in [0, 1)
    return _recentred(torch.floor(q.to(torch.float32) + (d * coef).unsqueeze(-1) * w + r))


def _recentred(t: torch.Tensor) -> torch.Tensor:
    """(n, K) floored levels -> int8, shifted so that each connection's top level is <= 127."""
    shift = (t.amax(dim=-1, keepdim=True) - 127.0).clamp_min(0.0)
    return (t - shift).clamp(-128.0, 127.0).to(torch.int8)


@fused("d")
def connection_hashes(d, coef, start, per_conn: int, key_a, round_a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-connection halves of :func:`bits` and :func:`noise_bits` (``mix32(conn ^ key)``) of
    connections ``start..``, and ``d * coef``: made once, in a kernel of their own, for
    :func:`int8_update_hashed` (fused into the (n, K) kernel they are recomputed for every vector
    of K lanes, in each of its two loops: a third of its time at K = 64)."""
    n = d.shape[0]
    return (mix32(connections(start, n, per_conn, d.device) ^ key_a),
            mix32(connections(start, n, 1, d.device) ^ round_a), d * coef)


@fused("q", "hc", "hr", "dc")
def int8_update_hashed(q, hc, hr, dc, keys_b, step, round_b) -> torch.Tensor:
    """:func:`int8_update_rows` from :func:`connection_hashes`: the same bits."""
    w = signed24(mix32(hc.unsqueeze(-1) ^ keys_b)).to(torch.float32) * step
    r = unit24(noise_round(hr.unsqueeze(-1) ^ round_b))  # (n, K) in [0, 1)
    return _recentred(torch.floor(q.to(torch.float32) + dc.unsqueeze(-1) * w + r))


@fused("q", "d", triton="int8_update")
def int8_update_unrolled(q, d, coef, start, per_conn: int, key_a, keys_b, step, round_a, round_b) -> torch.Tensor:
    """:func:`int8_update_rows` one candidate at a time (``bits`` and ``noise_bits`` split into
    their per-connection and per-value rounds): elementwise over a static K, which inductor
    compiles to a faster kernel than the (n, K) form with its reduction over K."""
    n = q.shape[0]
    hc = mix32(connections(start, n, per_conn, q.device) ^ key_a)
    hr = mix32(connections(start, n, 1, q.device) ^ round_a)
    dc = d * coef
    ts, top = [], None
    for j in range(keys_b.shape[0]):
        w = signed24(mix32(hc ^ keys_b[j])).to(torch.float32) * step
        r = unit24(noise_round(hr ^ round_b[j]))  # in [0, 1)
        t = torch.floor(q[:, j].to(torch.float32) + dc * w + r)
        ts.append(t)
        top = t if top is None else torch.maximum(top, t)
    shift = (top - 127.0).clamp_min(0.0)
    return torch.stack([(t - shift).clamp(-128.0, 127.0) for t in ts], -1).to(torch.int8)


@fused("words", "d")
def int8_update_packed(words, d, coef, start, per_conn: int, key_a, keys_b, step, round_a, round_b) -> torch.Tensor:
    """:func:`int8_update_unrolled` on (n,) words that each pack a connection's K = 2, 4 or 8 levels
    (little-endian lanes): the same bits, but every load and store is one contiguous word per
    connection, so inductor makes one vectorised loop with no (n, K) fp32 temporary (the unrolled
    form's stack is materialised, and its strided lanes are gathered a byte at a time)."""
    n, k = words.shape[0], keys_b.shape[0]
    wide = words.to(torch.int64)
    hc = mix32(connections(start, n, per_conn, words.device) ^ key_a)
    hr = mix32(connections(start, n, 1, words.device) ^ round_a)
    dc = d * coef
    ts, top = [], None
    for j in range(k):
        q = ((wide << (56 - 8 * j)) >> 56).to(torch.float32)  # lane j, sign-extended
        w = signed24(mix32(hc ^ keys_b[j])).to(torch.float32) * step
        r = unit24(noise_round(hr ^ round_b[j]))
        t = torch.floor(q + dc * w + r)  # the unrolled form's expression: the same roundings
        ts.append(t)
        top = t if top is None else torch.maximum(top, t)
    shift = (top - 127.0).clamp_min(0.0)
    out = None
    for j, t in enumerate(ts):
        lane = ((t - shift).clamp(-128.0, 127.0).to(torch.int64) & 0xFF) << (8 * j)
        out = lane if out is None else out | lane
    if k < 8:  # sign-extend the top lane, so the cast to the narrower word is exact
        out = (out << (64 - 8 * k)) >> (64 - 8 * k)
    return out.to(words.dtype)


@fused("s", "d", triton="fp32_update_chunk")
def fp32_update_chunk(
    s: torch.Tensor,  # (n, K) fp32 scores
    d: torch.Tensor,  # (n,) fp32
    neg_lr: torch.Tensor,  # 0-dim fp32
    start: torch.Tensor,
    per_conn: int,
    key_a: torch.Tensor,
    keys_b: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    w = signed24(bits(connections(start, s.shape[0], per_conn, s.device), key_a, keys_b)).to(torch.float32) * step
    return s + (d * neg_lr).unsqueeze(-1) * w


@fused("q", triton="requantize_chunk")
def requantize_chunk(
    q: torch.Tensor, inv_factor: torch.Tensor, start: torch.Tensor, round_a: torch.Tensor, round_b: torch.Tensor
) -> torch.Tensor:
    """Levels on a grid ``factor`` times coarser, rounded stochastically; the levels themselves at
    factor 1 (where ``floor(q + r)`` could round ``q + r`` up in fp32), so a caller may requantise
    whatever the factor its device decided."""
    r = unit24(noise_bits(connections(start, q.shape[0], 1, q.device), round_a, round_b))
    coarse = torch.floor(q.to(torch.float32) * inv_factor + r).clamp(-128.0, 127.0).to(torch.int8)
    return torch.where(inv_factor == 1.0, q, coarse)


# ---------------------------------------------------------------- implicit scores


@fused("drift", triton="implicit_chunk")
def implicit_chunk(
    drift: torch.Tensor,  # (n,) fp32 A of connections start .. start+n-1
    factor: torch.Tensor,  # 0-dim fp32 c
    start: torch.Tensor,
    per_conn: int,
    cand_key: torch.Tensor,
    cand_keys: torch.Tensor,
    step: torch.Tensor,
    score_key: torch.Tensor,
    score_keys: torch.Tensor,
    bound: torch.Tensor,  # 0-dim fp32 lambda*sigma
) -> torch.Tensor:
    """(n, K) fp32 scores ``c * s0_k - A * W_k`` of connections ``start..``."""
    n = drift.shape[0]
    w = signed24(bits(connections(start, n, per_conn, drift.device), cand_key, cand_keys)).to(torch.float32) * step
    s0 = unit24(bits(connections(start, n, 1, drift.device), score_key, score_keys)) * bound  # as init_scores
    return factor * s0 - drift.unsqueeze(-1) * w  # c = 1, A = 0: exactly s0


@fused("drift", triton="implicit_greedy")
def implicit_greedy_unrolled(
    drift: torch.Tensor, factor: torch.Tensor, start: torch.Tensor, per_conn: int, cand_key: torch.Tensor,
    cand_keys: torch.Tensor, step: torch.Tensor, score_key: torch.Tensor, score_keys: torch.Tensor,
    bound: torch.Tensor,
) -> torch.Tensor:
    """:func:`implicit_chunk`'s argmax and its candidate, one candidate at a time, the same values as
    :func:`implicit_chunk`: an elementwise running maximum over a static K compiles to a kernel
    several times faster than inductor's argmax over K, and it has the winner's value at hand."""
    n = drift.shape[0]
    hc = mix32(connections(start, n, per_conn, drift.device) ^ cand_key)  # bits() = mix32(hc ^ key_j)
    hs = mix32(connections(start, n, 1, drift.device) ^ score_key)
    best = idx = value = None
    for j in range(cand_keys.shape[0]):
        w = signed24(mix32(hc ^ cand_keys[j])).to(torch.float32) * step
        s = factor * (unit24(mix32(hs ^ score_keys[j])) * bound) - drift * w
        if best is None:
            best, idx, value = s, torch.zeros(n, dtype=torch.int64, device=drift.device), w
        else:
            better = s > best  # strict: an equal later score never wins, as torch.argmax
            best, idx, value = torch.where(better, s, best), torch.where(better, j, idx), torch.where(better, w, value)
    return idx, value


# ---------------------------------------------------------------- incremental implicit selection
#
# With a = A / c (c > 0) the implicit scores are c * (s0_k - a * W_k): the greedy index is a
# piecewise constant function of the one number a. ``SlotConfig(scores="implicit",
# incremental=True)`` keeps, per connection, the selected index i and an interval (lo, hi) of a
# over which i provably stays what the fp32 kernels above select; a selection then only checks
# lo < fl(A / c) < hi and re-selects the connections outside (see ImplicitScores in storages.py).
#
# Why the cached index equals the fp32 argmax (lowest index on ties) inside the interval. Let
# u = 2**-24 and s0_k, W_k the fp32 values the kernels make (fixed for a connection, exact here),
# with 0 <= s0_k <= B (B = lambda*sigma, ``bound``) and |W_k| <= sigma (the grid's top is exactly
# sigma). The kernels compute s_k = fl(fl(c * s0_k) - fl(A * W_k)): three roundings, each with
# relative error <= u, plus an absolute error < eta = 2**-126 when a result is subnormal or
# flushed (FMA contraction would only remove roundings). So with T_k = c*s0_k - A*W_k,
#     |s_k - T_k| <= 3u (c*B + |A|*sigma) + 3 eta            (u**2 terms folded in: 2u + u**2 <= 3u)
# and if T_i - T_j > |s_i - T_i| + |s_j - T_j| for every j != i then s_i > s_j strictly for every
# j, so the argmax is i whatever the tie rule. Divided by c, with the gap g_j(a) = (s0_i - s0_j) -
# a (W_i - W_j), a sufficient condition is
#     g_j(a) > 6u (B + |a| sigma) + 6 eta / c                     for all j != i.        (1)
# The interval is built at a re-selection around a0 (the current ratio) inside the window
# |a - a0| <= Wn = max(|a0|, B/sigma), so every a in it has |a| <= R = |a0| + Wn; it is the set
# where g_j(a) > m for all j, m = 16u (B + R sigma) + 2**-80, solved per j in float64 and stored
# in fp32 rounded inwards (lo up, hi down). The check uses a' = fl(A / c) (relative error <= 3u
# even for a reciprocal-and-multiply), and g_j moves by |W_i - W_j| |a - a'| <= 2 sigma 3u R(1+3u)
# between a' and the true a, so at the true a: g_j > m - 6.1u R sigma >= 6u (B + R(1+3u) sigma) +
# (float64 error, < 2**-48 (B + R sigma)) + 2**-80, which is (1) because 6 eta / c < 2**-80 for
# c >= C_MIN. Outside [C_MIN, C_MAX] for c, beyond R_MAX, or with a non-finite drift (comparisons
# with NaN are false) the connection or the whole part is re-selected by full recomputation.

INCR_U = 2.0**-24
INCR_MARGIN = 16.0  # m = INCR_MARGIN * u * (B + R sigma) + INCR_ABS; (1) needs a bit over 12.1
INCR_ABS = 2.0**-80
INCR_C_MIN, INCR_C_MAX, INCR_R_MAX = 2.0**-40, 2.0**40, 2.0**40


def incremental_stale_rows(drift: torch.Tensor, factor: float, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(m,) int64 indices of the connections whose ratio ``a = fl(drift / factor)`` is not strictly
    inside (lo, hi), a NaN included (its comparisons are false). CPU tensors only: numpy's
    comparisons and flatnonzero, several times faster than torch's compare and nonzero here."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is stale, as it should be
        a = drift.detach().numpy() / np.float32(factor)  # ``factor`` is an fp32 value: the division is fp32
        return torch.from_numpy(np.flatnonzero(~((a > lo.numpy()) & (a < hi.numpy()))))


@fused("drift", "conn")
def implicit_select_at(
    drift: torch.Tensor,  # (n,) fp32 A of the connections ``conn``
    conn: torch.Tensor,  # (n,) int32 connection indices (the part's offset included)
    factor: torch.Tensor, per_conn: int, cand_key: torch.Tensor, cand_keys: torch.Tensor, step: torch.Tensor,
    score_key: torch.Tensor, score_keys: torch.Tensor, bound: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, value, lo, hi)`` of connections ``conn``: the greedy index and candidate of
    :func:`implicit_greedy_unrolled` (the same fp32 scores, argmax with the lowest index on ties) and
    the interval (lo, hi) of ``a = A / c`` over which that index provably stays the fp32 argmax
    (fp32, rounded inwards; empty, lo > hi, where nothing is proven). See the comment above."""
    w = signed24(bits(conn * per_conn, cand_key, cand_keys)).to(torch.float32) * step
    s0 = unit24(bits(conn, score_key, score_keys)) * bound  # as init_scores and implicit_chunk
    idx = (factor * s0 - drift.unsqueeze(-1) * w).argmax(-1)  # implicit_chunk's scores, bit for bit
    value = w.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    # the interval, in float64 (exact differences of fp32 values up to 2**-53 relative)
    s0d, wd = s0.to(torch.float64), w.to(torch.float64)
    b, c = bound.to(torch.float64), factor.to(torch.float64)
    sigma = step.to(torch.float64) * 2.0**23
    a0 = drift.to(torch.float64) / c
    win = torch.maximum(a0.abs(), b / sigma)
    r = a0.abs() + win
    m = (INCR_MARGIN * INCR_U) * (b + r * sigma) + INCR_ABS
    ds = s0d.gather(-1, idx.unsqueeze(-1)) - s0d  # (n, K) s0_i - s0_j
    dw = wd.gather(-1, idx.unsqueeze(-1)) - wd
    t = (ds - m.unsqueeze(-1)) / dw  # g_j(t) = m; g_j > m above t where dw < 0, below it where dw > 0
    other = torch.arange(w.shape[-1], device=w.device) != idx.unsqueeze(-1)
    inf = torch.full_like(t, math.inf)
    hi = torch.minimum(torch.where(other & (dw > 0), t, inf).amin(-1), a0 + win)
    lo = torch.maximum(torch.where(other & (dw < 0), t, -inf).amax(-1), a0 - win)
    flat = (other & (dw == 0) & ~(ds > m.unsqueeze(-1))).any(-1)  # a gap that no a can open
    ok = ~flat & (r <= INCR_R_MAX) & (c >= INCR_C_MIN) & (c <= INCR_C_MAX) & torch.isfinite(a0)
    lo32, hi32 = lo.to(torch.float32), hi.to(torch.float32)  # round inwards: lo up, hi down
    lo32 = torch.where(lo32.to(torch.float64) < lo, torch.nextafter(lo32, torch.full_like(lo32, math.inf)), lo32)
    hi32 = torch.where(hi32.to(torch.float64) > hi, torch.nextafter(hi32, torch.full_like(hi32, -math.inf)), hi32)
    return (idx, value, torch.where(ok, lo32, torch.full_like(lo32, math.inf)),
            torch.where(ok, hi32, torch.full_like(hi32, -math.inf)))
