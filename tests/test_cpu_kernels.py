"""The numba twins of :mod:`seedslot.ops._numba` against the torch kernels they replace (the
incremental selection's behaviour on both paths is tests/test_incremental.py's)."""

import gc
import math
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import seedslot as ss
from seedslot import SlotConfig
from seedslot.ops import _torch as K
from test_incremental import SETTINGS, at_breakpoints, pair

incremental_greedy = pytest.importorskip("seedslot.ops._numba", reason="numba is not installed").incremental_greedy


def _args(layer):
    """incremental_greedy's arguments for a layer's weight."""
    return (layer.weight_drift, layer.weight_scale, layer.weight_lo, layer.weight_hi, layer.weight_sel,
            layer.weight_val, *layer.candidate_keys[1:], layer._score_key, layer._score_keys, layer._score_bound,
            0, layer.candidate_keys.per_conn)


@SETTINGS
@given(k=st.sampled_from([1, 2, 3, 8, 16]), sharing=st.sampled_from(["none", "layer"]), seed=st.integers(0, 2**31),
       scale=st.sampled_from([1e-3, 0.1, 3.0, 1e13]), c=st.sampled_from([1.0, 0.3, 2.0**-39]), ulps=st.integers(-1, 3),
       dup=st.sampled_from(["none", "candidates", "both"]))
def test_numba_twin_fills_the_cache_as_select_at(k, sharing, seed, scale, c, ulps, dup):
    """The numba twin's re-selection writes the bits torch's implicit_select_at computes: index,
    value and interval, ties and near-ties included (every interval is empty beforehand); any seed
    (negative keys), ratios beyond INCR_R_MAX (scale 1e13), and equal candidates (duplicated keys:
    gaps no ratio opens, and with equal initial scores too, exact ties at every ratio)."""
    layer, _ = pair("linear", k, sharing, seed=seed, bias=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if dup != "none" and k > 1:
            layer._cand_keys[1] = layer._cand_keys[0]
            if dup == "both":
                layer._score_keys[1] = layer._score_keys[0]
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
    version = layer.weight_val._version
    assert incremental_greedy(*_args(layer)) == 63 and incremental_greedy(*_args(layer)) == 0  # filled, then nothing stale
    assert layer.weight_val._version == version + 1  # writes autograd sees, as the torch path's
    with torch.no_grad():
        layer.weight_drift[3, 4] = math.nan
        assert incremental_greedy(*_args(layer)) == -1
        layer.weight_drift[3, 4] = 0.0
        layer.weight_scale.fill_(2.0**41)
        assert incremental_greedy(*_args(layer)) == -2
        layer.weight_scale.fill_(1.0)
        layer.weight_lo.data = torch.full_like(layer.weight_lo, math.inf)  # new memory under the same tensor
        assert incremental_greedy(*_args(layer)) == 63


def test_the_view_cache_keeps_no_layer_alive(monkeypatch):
    from seedslot.ops import _numba as cpu_kernels

    monkeypatch.setenv("SEEDSLOT_NUMBA", "1")
    layer, _ = pair("linear", 8)
    layer(torch.randn(2, 9))  # the numba twin ran and cached its views of the layer's buffers
    assert layer.weight_drift in cpu_kernels._VIEWS
    drift, lo = weakref.ref(layer.weight_drift), weakref.ref(layer.weight_lo)
    del layer
    gc.collect()
    assert drift() is None and lo() is None


def test_numba_twin_checks_a_strictly_inside_the_interval():
    # c = 0.5, stale unless lo < 2 * drift < hi (the finite drifts of the torch scan's test); the
    # other connections are inside (-inf, inf)
    inf = math.inf
    cases = [(0.5, 0.0, 2.0, False), (0.0, 0.0, 2.0, True), (1.0, 0.0, 2.0, True), (0.25, 0.6, 2.0, True),
             (0.5, inf, -inf, True), (0.5, -inf, inf, False), (3e38, 0.0, 3e38, True)]  # 2 * 3e38 is inf
    layer, _ = pair("linear", 8, bias=False)
    with torch.no_grad():
        layer.weight_scale.fill_(0.5)
        layer.weight_lo.fill_(-inf), layer.weight_hi.fill_(inf)
        for i, (d, lo, hi, _) in enumerate(cases):
            layer.weight_drift.view(-1)[i], layer.weight_lo[i], layer.weight_hi[i] = d, lo, hi
    assert incremental_greedy(*_args(layer)) == sum(stale for *_, stale in cases)


def test_numba_twin_gives_up_at_a_nan_after_stale_rows_of_other_blocks():
    big = ss.SlotLinear(30, 20, bias=False, config=SlotConfig(k=8, scores="implicit", incremental=True))  # 3 blocks
    assert incremental_greedy(*_args(big)) == 600 and incremental_greedy(*_args(big)) == 0
    with torch.no_grad():
        big.weight_lo[10] = math.inf  # stale, in the first block
        big.weight_drift.view(-1)[400] = math.nan  # in the second
    assert incremental_greedy(*_args(big)) == -1
