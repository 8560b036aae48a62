"""The Triton kernels equal the torch path bit for bit (sampling: up to a documented tolerance).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set
by conftest.py); on a CUDA machine the same tests run them on the GPU. Either way each kernel is
compared with the eager CPU path and, where one exists, the numpy uint32 reference of rng.py.
"""

import contextlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")

import seedslot as ss  # noqa: E402
from seedslot import candidates as C  # noqa: E402
from seedslot import rng  # noqa: E402
from seedslot.ops import _backends  # noqa: E402
from seedslot.ops import _torch as T  # noqa: E402
from seedslot.ops import _triton as TK  # noqa: E402

from reference import np_bits, np_noise_bits  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and not TK.interpreted():
    pytest.skip("no GPU and TRITON_INTERPRET was not set before triton was imported", allow_module_level=True)

i32 = C.i32
FAST = settings(max_examples=20, deadline=None)
int32s = st.integers(-(2**31), 2**31 - 1)


@contextlib.contextmanager
def tile(max_block_k):
    """Force column tiles of at most ``max_block_k`` (None: the default), so small K spans several."""
    old = TK.MAX_BLOCK_K
    TK.MAX_BLOCK_K = max_block_k or old
    try:
        yield
    finally:
        TK.MAX_BLOCK_K = old


def on_dev(args):
    return tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args)


def run_triton(f, *args):
    """``f``'s Triton twin on DEV, result back on CPU."""
    out = f.triton(*on_dev(args))
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@st.composite
def layouts(draw, max_n=300):
    """(n, start, k, per_conn, tile): start sometimes right below 2**31 - 1 - n; K 1..64 or 300."""
    n = draw(st.integers(1, max_n))
    start = draw(st.one_of(st.integers(0, 5000), st.just(2**31 - 1 - n), st.integers(0, 2**31 - 1 - n)))
    k = draw(st.integers(1, 68).map(lambda k: 300 if k > 64 else k))
    return n, start, k, draw(st.sampled_from([0, 1])), draw(st.sampled_from([None, 4]))


def keys(k, seed, tag=C.Stream.CANDIDATES):
    return C.stream_keys(seed, tag, k)[1]


def np_conn(start, n, per_conn):
    return (np.arange(n, dtype=np.int64) + start) * per_conn


def np_candidates(start, n, per_conn, key_a, kb, step):
    b = np_bits(np_conn(start, n, per_conn), key_a, kb.numpy())
    return ((b >> 8).astype(np.int64) - (1 << 23)).astype(np.float32) * np.float32(step)


def np_uniform(start, n, key_a, kb):
    return (np_noise_bits(np_conn(start, n, 1), key_a, kb.numpy()) >> 8).astype(np.float32) * np.float32(2.0**-24)


directions = st.sampled_from(["zeros", "normal", "negative", "huge", "mixed"])


def direction(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, generator=g)
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "negative":
        return -d.abs() * 10
    if kind == "huge":
        return d * 1e4
    if kind == "mixed":
        d[::3] = 0.0
        d[1::3] *= 1e3
    return d


# ---------------------------------------------------------------- candidates


@FAST
@given(layout=layouts(), key_a=int32s, seed=st.integers(0, 2**32), sigma=st.floats(1e-3, 2.0))
def test_candidate_chunk(layout, key_a, seed, sigma):
    n, start, k, per_conn, max_bk = layout
    kb, step = keys(k, seed), C.grid_step(sigma)
    args = (i32(start), n, per_conn, i32(key_a), kb, step)
    with tile(max_bk):
        got = run_triton(T.candidate_chunk, *args)
    assert torch.equal(got, T.candidate_chunk.eager(*args))
    assert np.array_equal(got.numpy(), np_candidates(start, n, per_conn, key_a, kb, float(step)))


@FAST
@given(layout=layouts(), key_a=int32s, seed=st.integers(0, 2**32))
def test_selected_chunk(layout, key_a, seed):
    n, start, k, per_conn, _ = layout
    kb, step = keys(k, seed), C.grid_step(0.3)
    idx = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    args = (idx, i32(start), per_conn, i32(key_a), kb, step)
    got = run_triton(T.selected_chunk, *args)
    assert torch.equal(got, T.selected_chunk.eager(*args))
    ref = np_candidates(start, n, per_conn, key_a, kb, float(step))[np.arange(n), idx.numpy()]
    assert np.array_equal(got.numpy(), ref)


# ---------------------------------------------------------------- score updates


def np_int8_update(q, d, coef, start, n, per_conn, key_a, kb, step, round_a, rb):
    w = np_candidates(start, n, per_conn, key_a, kb, step)
    r = np_uniform(start, n, round_a, rb)
    dc = d.numpy() * np.float32(coef)
    t = np.floor(q.numpy().astype(np.float32) + dc[:, None] * w + r)
    shift = np.maximum(t.max(axis=1, keepdims=True) - np.float32(127.0), np.float32(0.0))
    return np.clip(t - shift, -128, 127).astype(np.int8)


@FAST
@given(layout=layouts(), keys_ab=st.tuples(int32s, int32s), seed=st.integers(0, 2**32), dkind=directions,
       coef=st.sampled_from([0.0, -1.0, 3.0, -250.0, 1e4, -1e6]), qrange=st.sampled_from([(-128, 128), (100, 128)]))
def test_int8_update(layout, keys_ab, seed, dkind, coef, qrange):
    n, start, k, per_conn, max_bk = layout
    kb, rb, step = keys(k, seed), keys(k, seed, C.Stream.ROUND), C.grid_step(0.1)
    q = torch.randint(*qrange, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    d = direction(dkind, n, seed)
    args = (q, d, torch.tensor(coef), i32(start), per_conn, i32(keys_ab[0]), kb, step, i32(keys_ab[1]), rb)
    with tile(max_bk):
        got = run_triton(T.int8_update_rows, *args)
    assert torch.equal(got, T.int8_update_rows.eager(*args))
    if k <= 64:
        assert torch.equal(got, T.int8_update_unrolled.eager(*args))
    ref = np_int8_update(q, d, coef, start, n, per_conn, keys_ab[0], kb, float(step), keys_ab[1], rb)
    assert np.array_equal(got.numpy(), ref)


def test_int8_update_recentres_and_clips():
    """Levels pushed past 127 shift down together; those left more than 255 below clip at -128."""
    n, k = 64, 6
    q = torch.full((n, k), 120, dtype=torch.int8)
    q[:, 0] = -128
    d = torch.linspace(-1.0, 1.0, n)
    args = (q, d, torch.tensor(-3000.0), i32(5), 1, i32(1), keys(k, 1), C.grid_step(0.1), i32(2), keys(k, 1, C.Stream.ROUND))
    for max_bk in (None, 2):
        with tile(max_bk):
            got = run_triton(T.int8_update_rows, *args)
        assert torch.equal(got, T.int8_update_rows.eager(*args))
    assert (got.max(1).values == 127).float().mean() > 0.5  # re-centred rows
    assert (got == -128).any()  # clipped at the bottom


@FAST
@given(layout=layouts(), key_a=int32s, seed=st.integers(0, 2**32), dkind=directions,
       neg_lr=st.sampled_from([0.0, -0.1, 2.5, -1e3]))
def test_fp32_update_chunk(layout, key_a, seed, dkind, neg_lr):
    n, start, k, per_conn, max_bk = layout
    kb, step = keys(k, seed), C.grid_step(0.2)
    s = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    d = direction(dkind, n, seed + 1)
    args = (s, d, torch.tensor(neg_lr), i32(start), per_conn, i32(key_a), kb, step)
    with tile(max_bk):
        got = run_triton(T.fp32_update_chunk, *args)
    assert torch.equal(got, T.fp32_update_chunk.eager(*args))
    w = np_candidates(start, n, per_conn, key_a, kb, float(step))
    ref = s.numpy() + (d.numpy() * np.float32(neg_lr))[:, None] * w
    assert np.array_equal(got.numpy(), ref)


@FAST
@given(layout=layouts(), keys_ab=st.tuples(int32s, int32s), seed=st.integers(0, 2**32),
       inv=st.sampled_from([1.0, 0.5, 0.25, 2.0**-6, 2.0**-10]))
def test_requantize_chunk(layout, keys_ab, seed, inv):
    n, start, k, _, max_bk = layout
    rb = keys(k, seed, C.Stream.REQUANT)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    args = (q, torch.tensor(inv), i32(start), i32(keys_ab[0]), rb)
    with tile(max_bk):
        got = run_triton(T.requantize_chunk, *args)
    assert torch.equal(got, T.requantize_chunk.eager(*args))
    ref = np.floor(q.numpy().astype(np.float32) * np.float32(inv) + np_uniform(start, n, keys_ab[0], rb))
    ref = q.numpy() if inv == 1.0 else np.clip(ref, -128, 127).astype(np.int8)  # factor 1 keeps the levels
    assert np.array_equal(got.numpy(), ref)


# ---------------------------------------------------------------- implicit scores


def implicit_args(layout, seed, dkind, factor):
    n, start, k, per_conn, _ = layout
    d = direction(dkind, n, seed) * 0.05
    return (d, torch.tensor(factor), i32(start), per_conn, i32(C.key32(seed, 1)), keys(k, seed), C.grid_step(0.3),
            i32(C.key32(seed, 2)), keys(k, seed, C.Stream.INITIAL_SCORES), torch.tensor(0.03))


@FAST
@given(layout=layouts(), seed=st.integers(0, 2**32), dkind=directions, factor=st.sampled_from([1.0, 0.9, 1e-3]))
def test_implicit_chunk_and_greedy(layout, seed, dkind, factor):
    args = implicit_args(layout, seed, dkind, factor)
    with tile(layout[4]):
        scores = run_triton(T.implicit_chunk, *args)
        idx, value = run_triton(T.implicit_greedy_unrolled, *args)
    assert torch.equal(scores, T.implicit_chunk.eager(*args))
    ref_idx = T.implicit_chunk.eager(*args).argmax(-1)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(value, T.selected_chunk.eager(ref_idx, *args[2:7]))
    if layout[2] <= 64:
        e_idx, e_value = T.implicit_greedy_unrolled.eager(*args)
        assert torch.equal(idx, e_idx) and torch.equal(value, e_value)


# ---------------------------------------------------------------- selection


@FAST
@given(n=st.integers(1, 300), k=st.integers(1, 68).map(lambda k: 300 if k > 64 else k), seed=st.integers(0, 2**32),
       levels=st.sampled_from([3, 256]), max_bk=st.sampled_from([None, 4]))
def test_greedy_int8_and_fp32_lowest_index_on_ties(n, k, seed, levels, max_bk):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randint(0, levels, (n, k), generator=g) - min(levels, 128)).to(torch.int8)  # few levels: ties
    f = q.float() * 0.5
    f[f == 0] = torch.where(torch.rand(int((f == 0).sum()), generator=g) < 0.5, -0.0, 0.0)  # -0.0 ties 0.0
    f[::7, ::3] = float("-inf")
    with tile(max_bk):
        for s in (q, f, f.t().contiguous().t()):  # a strided (column-major) tensor too
            assert torch.equal(run_triton(T.argmax_rows, s), s.argmax(-1))
        if k in T._WORDS:
            words = q.view(T._WORDS[k])
            assert torch.equal(run_triton(T.packed_argmax, words), T.packed_argmax.eager(words))


def test_greedy_fp32_nan_and_infinities_as_torch():
    s = torch.tensor([[1.0, float("nan"), 2.0, float("nan")], [float("inf"), 1.0, float("inf"), 0.0],
                      [float("-inf")] * 4, [-0.0, 0.0, -0.0, -1.0], [float("nan"), float("inf"), 0, 0]])
    assert torch.equal(run_triton(T.argmax_rows, s), s.argmax(-1))


def perturbed(scores, scale, start, key_a, kb):
    """The Gumbel-perturbed scores in float64 (the reference the tolerance is measured on)."""
    c = T.connections(start, scores.shape[0], 1, "cpu")
    u = (((rng.bits(c, key_a, kb) >> 8) & 0xFFFFFF).to(torch.float32) + 0.5).double() * 2.0**-24
    return scores.double() * float(scale) - torch.log(-torch.log(u))


def assert_same_draws(got, want, v):
    """Indices equal, except where the perturbed scores at both lie within GUMBEL_TOLERANCE:
    ``log`` differs by about an ulp between torch on CPU, numpy and libdevice."""
    diff = (got != want).nonzero().flatten()
    gap = (v[diff, got[diff]] - v[diff, want[diff]]).abs()
    assert (gap <= TK.GUMBEL_TOLERANCE * v[diff, want[diff]].abs().clamp_min(1.0)).all(), gap
    assert len(diff) <= max(2, got.numel() // 1000)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 68).map(lambda k: 300 if k > 64 else k), seed=st.integers(0, 2**32),
       key_a=int32s, start=st.integers(0, 2**31 - 301), int8=st.booleans(), max_bk=st.sampled_from([None, 4]))
def test_sample_chunk(n, k, seed, key_a, start, int8, max_bk):
    g = torch.Generator().manual_seed(seed)
    if int8:
        scores, scale = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g), torch.tensor(0.02)
    else:
        scores, scale = torch.randn(n, k, generator=g) * 3, torch.tensor(1.0)
    kb = keys(k, seed, C.Stream.SAMPLE)
    args = (scores, scale, i32(start), i32(key_a), kb)
    with tile(max_bk):
        got = run_triton(T.sample_chunk, *args)
    assert_same_draws(got, T.sample_chunk.eager(*args), perturbed(scores, scale, start, key_a, kb))


def test_sample_chunk_many_rows():
    """Many draws: disagreements (if any) are rare, and every one a near-tie."""
    n, k = 20000, 16
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    kb = keys(k, 3, C.Stream.SAMPLE)
    args = (scores, torch.tensor(1.0), i32(7), i32(11), kb)
    got = run_triton(T.sample_chunk, *args)
    assert_same_draws(got, T.sample_chunk.eager(*args), perturbed(scores, 1.0, 7, 11, kb))


# ---------------------------------------------------------------- large K, one case of each kernel


@pytest.mark.parametrize("k", [300, 1000])
def test_large_k_every_kernel(k):
    n, start, seed = 37, 2**31 - 1 - 37, 5
    kb, rb, step = keys(k, seed), keys(k, seed, C.Stream.ROUND), C.grid_step(0.2)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    d = torch.randn(n, generator=g) * 50
    cases = [
        (T.candidate_chunk, (i32(start), n, 1, i32(3), kb, step)),
        (T.int8_update_rows, (q, d, torch.tensor(-100.0), i32(start), 1, i32(3), kb, step, i32(4), rb)),
        (T.fp32_update_chunk, (q.float(), d, torch.tensor(-0.1), i32(start), 0, i32(3), kb, step)),
        (T.requantize_chunk, (q, torch.tensor(0.25), i32(start), i32(4), rb)),
        (T.argmax_rows, (q,)),
        (T.implicit_chunk, implicit_args((n, start, k, 1, None), seed, "normal", 0.9)),
    ]
    for f, args in cases:
        assert torch.equal(run_triton(f, *args), f.eager(*args)), f.__name__
    args = implicit_args((n, start, k, 0, None), seed, "normal", 0.9)
    idx, value = run_triton(T.implicit_greedy_unrolled, *args)
    ref = T.implicit_chunk.eager(*args).argmax(-1)
    assert torch.equal(idx, ref) and torch.equal(value, T.selected_chunk.eager(ref, *args[2:7]))


# ---------------------------------------------------------------- dispatch


def test_every_hot_path_has_a_twin():
    for f in (T.candidate_chunk, T.selected_chunk, T.int8_update_rows, T.int8_update_unrolled, T.fp32_update_chunk,
              T.requantize_chunk, T.implicit_chunk, T.implicit_greedy_unrolled, T.packed_argmax, T.sample_chunk,
              T.argmax_rows):
        assert callable(f.triton), f.__name__
    assert T.int8_update_rows.triton is T.int8_update_unrolled.triton is TK.int8_update
    assert _backends.fused()(lambda x: x).triton is None


def test_dispatch_routes_cuda_tensors_to_the_twin(monkeypatch):
    # a kernel's torch path (the CPU kernel) and its CUDA kernel (the Triton twin while Triton is on)
    calls = []
    f = _backends.fused("x", triton=lambda x: calls.append("triton") or x)(lambda x: calls.append("torch") or x)
    t = torch.zeros(3)
    f(t)
    assert calls == ["torch"]  # the torch path
    with monkeypatch.context() as m:
        m.setattr(_backends, "triton_on", lambda: True)
        f.cuda(t)
        assert calls == ["torch", "triton"]
        m.setattr(_backends, "triton_on", lambda: False)  # Triton off: the CUDA kernel is the torch one
        f.cuda(t)
        assert calls == ["torch", "triton", "torch"]


def test_dispatch_predicate(monkeypatch):
    cuda_like = type("T", (), {"is_cuda": True})()
    assert _backends.runs_triton(cuda_like)
    assert not _backends.runs_triton(torch.zeros(2))  # CPU
    assert not _backends.runs_triton(None)
    monkeypatch.setenv("SEEDSLOT_TRITON", "0")
    assert not _backends.runs_triton(cuda_like)


def test_ops_register_a_cuda_kernel_and_a_fake():
    for name in ("candidates", "selected", "greedy", "packed_greedy", "sample", "int8_update", "fp32_update",
                 "requantize", "implicit_scores", "implicit_greedy", "incremental_greedy"):
        op = getattr(torch.ops.seedslot, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), name


def test_failing_twin_falls_back_with_one_warning(monkeypatch):
    def broken(x):
        raise RuntimeError("no compiler")

    f = _backends.fused("x", triton=broken)(lambda x: x + 1)
    monkeypatch.setattr(_backends, "triton_on", lambda: True)
    monkeypatch.setattr(_backends, "_triton_warned", False)
    with pytest.warns(RuntimeWarning, match="Triton kernel failed"):
        assert torch.equal(f.cuda(torch.zeros(2)), torch.ones(2))
    assert torch.equal(f.cuda(torch.zeros(2)), torch.ones(2))  # torch from then on


# ---------------------------------------------------------------- end to end


def _force_triton(monkeypatch):
    """Run the ops' CUDA kernels (the Triton kernels) on CPU tensors without a GPU."""
    if DEV.type == "cpu":
        monkeypatch.setattr(_backends, "cuda_kernels_on_cpu", True)


def _train(layer, steps, dev):
    """Forwards (sampling draws included), SlotSGD on fixed effective-weight gradients (set, not
    backpropagated, so CPU and GPU see identical ones); returns every forward's effective weight and
    the state after each step."""
    opt = ss.SlotSGD(layer.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        layer.train()
        weight = layer._effective("weight", layer._next_draw()).detach().cpu()
        for part in layer.parts:
            proxy = getattr(layer, f"slot_{part}")
            proxy.grad = (torch.randn(proxy.shape, generator=g) * 3).to(dev)
        opt.step()
        layer.eval()
        history.append((weight, layer.selected_index().cpu(), layer.selected_weight().cpu(),
                        {k: v.cpu().clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}))
    return history


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
@pytest.mark.parametrize("selection", ["greedy", "sample"])
def test_training_with_triton_kernels_equals_the_cpu_path(monkeypatch, kind, scores, selection):
    kw = dict(k=5 if kind == "linear" else 12, seed=3, scores=scores, selection=selection, bias=True)

    def make(dev):
        if kind == "linear":
            return ss.SlotLinear(9, 7, sharing="none", device=dev, **kw)
        return ss.SlotConv2d(3, 4, 3, sharing="layer", device=dev, **kw)

    want = _train(make("cpu"), 3, "cpu")
    used = []
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing twin would fall back to torch with a warning
        _force_triton(m)
        real = TK._launch
        m.setattr(TK, "_launch", lambda kernel, *a, **kw: used.append(kernel) or real(kernel, *a, **kw))
        got = _train(make(DEV), 3, DEV)
    assert len(used) >= 6  # the kernels really ran
    for (w1, i1, sw1, st1), (w2, i2, sw2, st2) in zip(want, got):
        assert torch.equal(w1, w2) and torch.equal(i1, i2) and torch.equal(sw1, sw2)
        assert st1.keys() == st2.keys() and all(torch.equal(st1[k], st2[k]) for k in st1)
