"""Which candidate each connection uses: greedy argmax or a softmax sample.

Both read scores as ``scores * scale`` (int8 levels or fp32 values), so the seeded layers and the
dense reference share this code and, given equal scores, select equal candidates. Greedy breaks
ties towards the lowest index (torch.argmax's rule). Sampling is Gumbel-max: ``argmax(s_k + g_k)``
with ``g_k = -log(-log(u_k))`` is exactly a draw from ``softmax(s)``; the uniforms ``u_k`` come from
the counter-based random function, keyed by the layer's seed and a draw counter, so a training run
is reproducible. Adding one constant to a connection's K scores changes neither rule, which is what
lets int8 scores be re-centred.
"""

from __future__ import annotations

import sys

import torch

from .candidates import chunked_new, connections
from . import rng as _rng
from .rng import bits, compile_enabled, fused, mix32, signed24

SELECTION = ("greedy", "sample")


# int8 scores of one connection read as whole machine words, by K: inductor's own argmax over a
# small static K is slow, an elementwise pass over packed words is several times faster.
_WORDS = {2: torch.int16, 4: torch.int32}
_WORDS.update({k: torch.int64 for k in range(8, 65, 8)})


def packed_words(scores: torch.Tensor) -> torch.Tensor | None:
    """(n, K) int8 levels as (n, W) little-endian machine words, each packing 2, 4 or 8 of a
    connection's levels (K = 2, 4 or a multiple of 8 up to 64), or None where they cannot be read
    so: another dtype or K, a non-contiguous or big-endian layout, or CUDA with Triton (which has
    its own kernels)."""
    k = scores.shape[-1]
    if (scores.dtype == torch.int8 and scores.dim() == 2 and k in _WORDS and sys.byteorder == "little"
            and scores.is_contiguous() and not _rng.use_triton(scores)):
        return scores.view(_WORDS[k])
    return None


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """(n, K) scores -> (n,) int64 index of the best score, the lowest index on ties."""
    if scores.dtype in (torch.int8, torch.float32) and scores.dim() == 2 and _rng.use_triton(scores):
        return argmax_rows(scores)  # CUDA: one Triton kernel, any K
    words = packed_words(scores) if compile_enabled() else None  # eager, argmax is the faster
    return scores.argmax(dim=-1) if words is None else packed_argmax(words)


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


def greedy_values(scores: torch.Tensor, offset: int, ck) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(n, K) int8 levels of connections ``offset..`` -> ``(index, value)``: :func:`greedy`'s index
    and the selected candidate (``ck``: the layer's CandidateKeys), in one pass over packed words
    (:func:`packed_greedy`); None where it does not apply (K > 8, or :func:`greedy` would not read
    packed words)."""
    # up to K = 8 (one word): above, the kernel unrolled over K lanes costs compile time and memory
    # in proportion to K, for a pass that is small next to the update's
    words = packed_words(scores) if compile_enabled() and scores.shape[-1] <= 8 else None
    if words is None:
        return None
    n, dev = scores.shape[0], scores.device
    return chunked_new(lambda: (torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, device=dev)),
                       n, offset, scores.shape[1], None, dev, lambda a, b, start: packed_greedy(words[a:b], start, *ck))


@fused("words")
def packed_greedy(words: torch.Tensor, start: torch.Tensor, per_conn: int, key_a: torch.Tensor,
                  keys_b: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`packed_argmax` and the candidate it selects (as ``candidates.selected_chunk`` makes
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


def sample(scores: torch.Tensor, scale, offset: int, key_a: torch.Tensor, keys_b: torch.Tensor) -> torch.Tensor:
    """(n, K) scores of connections ``offset..`` -> (n,) int64 draws from softmax(scores*scale),
    chunk by chunk (:func:`sample_chunk`); ``scale`` a number or a 0-dim tensor."""
    n, dev = scores.shape[0], scores.device
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=dev)
    return chunked_new(lambda: torch.empty(n, dtype=torch.int64, device=dev), n, offset, scores.shape[1], scores, dev,
                       lambda a, b, start: sample_chunk(scores[a:b], scale_t, start, key_a, keys_b))
