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

import torch

from .candidates import connections
from .rng import bits, fused

SELECTION = ("greedy", "sample")


def greedy_chunk(scores: torch.Tensor) -> torch.Tensor:
    """(n, K) scores -> (n,) int64 index of the best score. Not fused: eager argmax over int8 is
    several times faster here than inductor's reduction."""
    return scores.argmax(dim=-1)


@fused("scores")
def sample_chunk(
    scores: torch.Tensor, scale: torch.Tensor, start: torch.Tensor, key_a: torch.Tensor, keys_b: torch.Tensor
) -> torch.Tensor:
    """(n, K) scores of connections ``start..`` -> (n,) int64 index drawn from softmax(scores*scale)."""
    c = connections(start, scores.shape[0], 1, scores.device)
    u = (((bits(c, key_a, keys_b) >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (2.0**-24)  # (0, 1)
    gumbel = -torch.log(-torch.log(u))
    return (scores.to(torch.float32) * scale + gumbel).argmax(dim=-1)
