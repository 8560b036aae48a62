"""Which candidate each connection uses: greedy argmax or a softmax sample.

Both read scores as ``scores * scale`` (int8 levels or fp32 values), so the seeded layers and the
dense reference share this code and, given equal scores, select equal candidates. Greedy breaks
ties towards the lowest index (torch.argmax's rule). Sampling is Gumbel-max: ``argmax(s_k + g_k)``
with ``g_k = -log(-log(u_k))`` is exactly a draw from ``softmax(s)``; the uniforms ``u_k`` come from
the counter-based random function, keyed by the layer's seed and a draw counter, so a training run
is reproducible. Adding one constant to a connection's K scores changes neither rule, which is what
lets int8 scores be re-centred. The kernels are the op layer's (:mod:`seedslot.ops`).
"""

from __future__ import annotations

from .ops import greedy, greedy_values, sample

__all__ = ["SELECTION", "greedy", "greedy_values", "sample"]

SELECTION = ("greedy", "sample")
