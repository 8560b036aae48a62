"""Candidates and initial scores: range, moments, sharing, chunking, the Glorot bound."""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seedslot as ss
from seedslot.ops import _chunks


def test_glorot_bound_linear_and_conv():
    assert ss.SlotLinear(30, 10).sigma == pytest.approx(math.sqrt(6 / 40), rel=1e-7)
    conv = ss.SlotConv2d(3, 8, 5)
    assert conv.sigma == pytest.approx(math.sqrt(6 / (3 * 25 + 8 * 25)), rel=1e-7)


def test_values_lie_in_range_with_uniform_moments():
    layer = ss.SlotLinear(400, 300, k=8, seed=3)
    w = layer.candidates().double()
    s = layer.sigma
    assert w.min() >= -s and w.max() < s
    n = w.numel()
    # Mean 0 and variance sigma^2/3 of U(-s, s); 6 standard errors of slack.
    assert abs(w.mean().item()) < 6 * s / math.sqrt(3 * n)
    assert abs(w.var().item() / (s * s / 3) - 1) < 6 * math.sqrt(0.8 / n)


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 40), k=st.integers(1, 12), seed=st.integers(0, 2**64))
def test_same_seed_same_bits_any_chunking(out, inp, k, seed):
    a = ss.SlotLinear(inp, out, k=k, seed=seed).candidates()
    with chunk_values(7):
        b = ss.SlotLinear(inp, out, k=k, seed=seed).candidates()
    assert torch.equal(a, b)


@contextlib.contextmanager
def chunk_values(values):
    old = _chunks.CHUNK_VALUES
    _chunks.CHUNK_VALUES = values
    try:
        yield
    finally:
        _chunks.CHUNK_VALUES = old


def test_different_seeds_and_connections_differ():
    a = ss.SlotLinear(50, 40, k=4, seed=1).candidates()
    b = ss.SlotLinear(50, 40, k=4, seed=2).candidates()
    assert (a != b).float().mean() > 0.999
    flat = a.reshape(-1)
    assert flat.unique().numel() > 0.999 * flat.numel()


def test_candidates_do_not_depend_on_k():
    small = ss.SlotConv2d(3, 4, 3, k=8, seed=9).candidates()
    big = ss.SlotConv2d(3, 4, 3, k=16, seed=9).candidates()
    assert torch.equal(big[..., :8], small)


def test_sharing_modes():
    layer = ss.SlotLinear(20, 10, k=6, seed=1, sharing="layer").candidates()
    assert torch.equal(layer, layer[:1, :1].expand_as(layer))
    a = ss.SlotLinear(20, 10, k=6, seed=5, sharing="global", candidate_seed=77)
    b = ss.SlotConv2d(3, 8, 3, k=6, seed=6, sharing="global", candidate_seed=77)
    ua = a.candidates()[0, 0] / a.sigma
    ub = b.candidates()[0, 0, 0, 0] / b.sigma
    torch.testing.assert_close(ua, ub, rtol=1e-6, atol=0)  # same unit draws, each layer's sigma
    none = ss.SlotLinear(20, 10, k=6, seed=1).candidates()
    assert not torch.equal(none, none[:1, :1].expand_as(none))


def test_score_init_range_and_int8_is_quantised_fp32():
    fp = ss.SlotLinear(60, 50, k=8, seed=4, scores="fp32")
    q = ss.SlotLinear(60, 50, k=8, seed=4, scores="int8")
    bound = 0.1 * fp.sigma
    s = fp.weight_scores
    assert s.min() >= 0 and s.max() < bound
    assert q.weight_scores.dtype == torch.int8
    assert q.weight_scores.min() >= 0 and q.weight_scores.max() <= 127
    real = q.weight_scores.float() * q.weight_scale
    assert (real - s).abs().max() <= bound / 127 + 1e-9
    assert ss.SlotConv2d(3, 4, 3, scores="fp32").score_lambda == 1.0
    assert ss.SlotLinear(3, 4, score_lambda=1.0).score_lambda == 1.0


@settings(max_examples=40, deadline=None)
@given(k=st.sampled_from([2, 4, 8, 16, 24, 64]), n=st.integers(1, 50), seed=st.integers(0, 2**31 - 1),
       levels=st.integers(1, 256))
def test_packed_argmax_equals_argmax_ties_included(k, n, seed, levels):
    from seedslot.ops._torch import _WORDS, packed_argmax

    g = torch.Generator().manual_seed(seed)
    q = (torch.randint(0, levels, (n, k), generator=g) - 128).to(torch.int8)  # few levels: many ties
    assert torch.equal(packed_argmax.eager(q.view(_WORDS[k])), q.argmax(dim=-1))


def test_stream_keys_equal_key32_and_a_large_k_is_fast():
    """Issue 24, item 17: K = 10**6 built its keys in a Python loop (tens of seconds per layer)."""
    import time

    from seedslot.candidates import stream_keys
    from seedslot.rng import key32

    for seed, tag in ((0, 1), (2**63 + 5, 0x1234), (2**70, 7)):
        _, kb = stream_keys(seed, tag, 300)
        assert kb.dtype == torch.int32 and kb.tolist() == [key32(seed, tag, 1, j) for j in range(300)]
    t0 = time.monotonic()
    stream_keys(3, 4, 10**6)
    assert time.monotonic() - t0 < 1.0
