"""The numba twins of :mod:`seedslot.cpu_kernels` against the torch kernels they replace (the
incremental selection's behaviour on both paths is tests/test_incremental.py's)."""

import gc
import math
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seedslot import scores as K
from test_incremental import SETTINGS, at_breakpoints, pair

incremental_greedy = pytest.importorskip("seedslot.cpu_kernels", reason="numba is not installed").incremental_greedy


@SETTINGS
@given(k=st.sampled_from([1, 2, 3, 8, 16]), sharing=st.sampled_from(["none", "layer"]), seed=st.integers(0, 2**20),
       scale=st.sampled_from([1e-3, 0.1, 3.0]), c=st.sampled_from([1.0, 0.3, 2.0**-39]), ulps=st.integers(-1, 3))
def test_numba_twin_fills_the_cache_as_select_at(k, sharing, seed, scale, c, ulps):
    """The numba twin's re-selection writes the bits torch's implicit_select_at computes: index,
    value and interval, ties and near-ties included (every interval is empty beforehand)."""
    layer, _ = pair("linear", k, sharing, bias=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight_scale.fill_(c)
        layer.weight_drift.copy_(torch.randn(layer.weight_drift.shape, generator=gen) * scale * c)
        if ulps >= 0:
            at_breakpoints(layer, "weight", gen, ulps)
    drift = layer.weight_drift.view(-1)
    conn = torch.arange(drift.shape[0], dtype=torch.int32)
    want = K.implicit_select_at.eager(drift, conn, *layer.storage._at_args(layer, "weight"))
    ck = layer.candidate_keys
    cache = [layer.weight_sel, layer.weight_val, layer.weight_lo, layer.weight_hi]
    got = incremental_greedy(drift, layer.weight_scale, layer.weight_lo, layer.weight_hi, layer.weight_sel,
                             layer.weight_val, ck.key, ck.keys, ck.step, layer._score_key, layer._score_keys,
                             layer._score_bound, 0, ck.per_conn)
    assert got == drift.shape[0]  # every connection re-selected
    for have, exp in zip(cache, want):
        assert torch.equal(have.to(exp.dtype), exp)


def test_numba_twin_refuses_what_needs_full_recomputation():
    layer, _ = pair("linear", 8, bias=False)
    def args():
        return (layer.weight_drift, layer.weight_scale, layer.weight_lo, layer.weight_hi, layer.weight_sel,
                layer.weight_val, *layer.candidate_keys[1:], layer._score_key, layer._score_keys, layer._score_bound,
                0, 1)

    assert incremental_greedy(*args()) == 63 and incremental_greedy(*args()) == 0  # filled, then nothing stale
    with torch.no_grad():
        layer.weight_drift[3, 4] = math.nan
        assert incremental_greedy(*args()) == -1
        layer.weight_drift[3, 4] = 0.0
        layer.weight_scale.fill_(2.0**41)
        assert incremental_greedy(*args()) == -2
        layer.weight_scale.fill_(1.0)
        layer.weight_lo.data = torch.full_like(layer.weight_lo, math.inf)  # new memory under the same tensor
        assert incremental_greedy(*args()) == 63


def test_the_view_cache_keeps_no_layer_alive():
    layer, _ = pair("linear", 8)
    layer(torch.randn(2, 9))  # the numba twin ran and cached its views of the layer's buffers
    drift, lo = weakref.ref(layer.weight_drift), weakref.ref(layer.weight_lo)
    del layer
    gc.collect()
    assert drift() is None and lo() is None
