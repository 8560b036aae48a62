"""The counter-based random function: determinism, equivalence of its three implementations."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seedslot import candidates as C
from seedslot import ops
from seedslot.ops import _backends
from seedslot.ops import _chunks
from seedslot.ops import _torch as T
from seedslot.rng import bits, derive, key32, noise_bits

from seedslot.testing import connection_offsets, seeds

from reference import np_bits, np_noise_bits

keys = st.integers(-(2**31), 2**31 - 1)


@settings(max_examples=40, deadline=None)
@given(
    conn=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=50),
    key_a=keys,
    keys_b=st.lists(keys, min_size=1, max_size=9),
)
def test_torch_matches_numpy_reference(conn, key_a, keys_b):
    c = torch.tensor(conn, dtype=torch.int32)
    kb = torch.tensor(keys_b, dtype=torch.int32)
    ref = np_bits(np.array(conn), key_a, np.array(keys_b))
    assert np.array_equal(bits(c, key_a, kb).numpy().view(np.uint32), ref)
    ref_noise = np_noise_bits(np.array(conn), key_a, np.array(keys_b))
    assert np.array_equal(noise_bits(c, key_a, kb).numpy().view(np.uint32), ref_noise)


@settings(max_examples=40, deadline=None)
@given(offset=connection_offsets(rows=64), seed=seeds(max_seed=2**100), k=st.integers(1, 9),
       shared=st.booleans())
def test_streams_at_any_offset_match_the_reference(offset, seed, k, shared):
    """Keys from any seed (edge values and beyond 64 bits), connections up to 2**31 - 1."""
    conn = np.arange(64, dtype=np.int64) + offset
    key_a, keys_b = C.stream_keys(seed, C.Stream.CANDIDATES, k)
    c = torch.tensor(conn * (0 if shared else 1), dtype=torch.int32)
    assert np.array_equal(bits(c, key_a, keys_b).numpy().view(np.uint32),
                          np_bits(conn * (0 if shared else 1), key_a, keys_b.numpy()))
    assert np.array_equal(noise_bits(c, key_a, keys_b).numpy().view(np.uint32),
                          np_noise_bits(conn * (0 if shared else 1), key_a, keys_b.numpy()))


def test_mix32_known_values():
    # lowbias32 of a few inputs, computed independently in pure Python integers.
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    from seedslot.rng import mix32

    got = mix32(torch.tensor(np.array(xs, dtype=np.uint32).view(np.int32))).numpy().view(np.uint32)
    assert [int(v) for v in got] == [lowbias32(x) for x in xs]


def test_derive_is_pure_and_separates_inputs():
    assert derive(1, 2, 3) == derive(1, 2, 3)
    assert len({derive(s, t) for s in range(20) for t in range(5)}) == 100
    assert derive(2**70 + 5) != derive(5)  # big ints are folded, not truncated
    assert -(2**31) <= key32(7, 1) < 2**31
    with pytest.raises(ValueError):
        derive(-1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([2, 4, 8]), n=st.integers(1, 200),
       per_conn=st.sampled_from([0, 1]), offset=st.integers(0, 2**31 - 300), ties=st.booleans())
def test_greedy_values_are_the_argmax_and_its_candidate(seed, k, n, per_conn, offset, ties):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3 if ties else -128, 3 if ties else 128, (n, k), dtype=torch.int8, generator=g)
    ck = C.CandidateKeys(per_conn, C.i32(seed ^ 11), C.stream_keys(seed, C.Stream.CANDIDATES, k)[1], C.grid_step(0.05))
    idx, value = T.packed_greedy.eager(q.view(T._WORDS[k]), C.i32(offset), *ck)
    assert torch.equal(idx, q.argmax(-1))  # the lowest index on ties
    assert torch.equal(value, C.selected_values(idx, offset, ck))


def test_greedy_values_dispatch(monkeypatch):
    # the packed pass where compiled kernels run (it is the compiled path's: eager argmax is faster)
    q = torch.randint(-128, 128, (300, 8), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    ck = C.CandidateKeys(1, C.i32(5), C.stream_keys(5, C.Stream.CANDIDATES, 8)[1], C.grid_step(0.05))
    assert ops.greedy_values(q, 7, ck) is None  # the suite runs eager (conftest)
    assert ops.greedy_values(q[:, :3].contiguous(), 7, ck) is None
    monkeypatch.setenv("SEEDSLOT_COMPILE", "1")
    assert ops.greedy_values(torch.zeros(5, 16, dtype=torch.int8), 7, ck) is None  # K > 8: two passes
    idx, value = ops.greedy_values(q, 7, ck)
    assert torch.equal(idx, q.argmax(-1)) and torch.equal(value, C.selected_values(idx, 7, ck))


def _kernel_cases():
    kb = C.stream_keys(5, C.Stream.CANDIDATES, 8)[1]
    rb = C.stream_keys(5, C.Stream.ROUND, 8)[1]
    step = C.grid_step(0.05)
    n = 3001
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (n, 8), dtype=torch.int8, generator=g)
    d = torch.randn(n, generator=g) * 3
    i32 = C.i32
    return [
        (T.candidate_chunk, (i32(17), n, 1, i32(123), kb, step)),
        (T.selected_chunk, (torch.randint(0, 8, (n,), generator=g), i32(17), 1, i32(123), kb, step)),
        (T.int8_update_rows, (q, d, torch.tensor(-250.0), i32(17), 1, i32(123), kb, step, i32(99), rb)),
        (T.int8_update_unrolled, (q, d, torch.tensor(-250.0), i32(17), 1, i32(123), kb, step, i32(99), rb)),
        (T.int8_update_packed, (q.view(torch.int64).view(-1), d, torch.tensor(-250.0), i32(17), 1, i32(123), kb, step,
                                i32(99), rb)),
        (T.connection_hashes, (d, torch.tensor(-250.0), i32(17), 1, i32(123), i32(99))),
        (T.int8_update_hashed, (q, *T.connection_hashes.eager(d, torch.tensor(-250.0), i32(17), 1, i32(123), i32(99)), kb,
                                step, rb)),
        (T.fp32_update_chunk, (q.float(), d, torch.tensor(-0.1), i32(17), 0, i32(123), kb, step)),
        (T.requantize_chunk, (q, torch.tensor(0.25), i32(3), i32(4), rb)),
        (T.sample_chunk, (q, torch.tensor(0.01), i32(3), i32(4), rb)),
        (T.packed_argmax, (q.view(torch.int64),)),
        (T.packed_greedy, (q.view(torch.int64), i32(17), 1, i32(123), kb, step)),
        (T.implicit_chunk, (d, torch.tensor(0.9), i32(17), 1, i32(123), kb, step, i32(7), rb, torch.tensor(0.05))),
        (T.implicit_greedy_unrolled, (d, torch.tensor(0.9), i32(17), 0, i32(123), kb, step, i32(7), rb, torch.tensor(0.05))),
    ]


@pytest.mark.slow
def test_compiled_equals_eager_bit_for_bit():
    def equal(x, y):  # a kernel returns a tensor or a tuple of tensors
        return all(torch.equal(a, b) for a, b in zip(*((t,) if isinstance(t, torch.Tensor) else t for t in (x, y))))

    for fn, args in _kernel_cases():
        assert equal(fn.eager(*args), fn.compiled(*args)), fn.__name__
        # A second row count runs the dynamic-shape kernel: still equal.
        if isinstance(args[0], torch.Tensor) and args[0].dim():
            short = (args[0][:77],) + tuple(a[:77] if isinstance(a, torch.Tensor) and a.shape[:1] == args[0].shape[:1] else a for a in args[1:])
            assert equal(fn.eager(*short), fn.compiled(*short)), fn.__name__


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    f = _backends.fused()(lambda x: x + 1)
    monkeypatch.setenv("SEEDSLOT_COMPILE", "1")
    monkeypatch.setattr(_backends, "_warned", False)

    def boom():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(type(f), "compiled", property(lambda self: boom()))
    with pytest.warns(RuntimeWarning, match="eager"):
        assert int(f(torch.tensor(1))) == 2
    assert int(f(torch.tensor(2))) == 3  # silent from now on, eager


def test_same_bits_in_a_fresh_process():
    code = (
        "import torch, hashlib, seedslot as ss;"
        "l = ss.SlotConv2d(3, 8, 3, k=5, seed=42);"
        "print(hashlib.sha256(l.candidates().numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    from seedslot import SlotConv2d

    here = hashlib.sha256(SlotConv2d(3, 8, 3, k=5, seed=42).candidates().numpy().tobytes()).hexdigest()
    assert out == here


@pytest.mark.slow
def test_regen_bench_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("regen", Path(__file__).parent.parent / "bench" / "regen.py")
    regen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regen)
    out = tmp_path / "r.json"
    regen.main(["--layer", "64,32", "--k", "4", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["compiled_per_second"] > 0 and result["eager_per_second"] > 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 9), factor=st.floats(0.0, 2.0), spread=st.floats(0.0, 1e4),
       per_conn=st.sampled_from([0, 1]))
def test_implicit_greedy_is_the_argmax_of_the_implicit_scores(seed, k, factor, spread, per_conn):
    g = torch.Generator().manual_seed(seed)
    n = 257
    drift = torch.randn(n, generator=g) * spread
    drift[::7] = 0.0  # factor 0 and no drift: all K scores equal, the lowest index wins
    args = (torch.tensor(factor), C.i32(seed % 1000), per_conn, C.i32(seed), C.stream_keys(seed, C.Stream.CANDIDATES, k)[1],
            C.grid_step(0.05), C.i32(seed ^ 5), C.stream_keys(seed, C.Stream.INITIAL_SCORES, k)[1], torch.tensor(0.01))
    expected = T.implicit_chunk.eager(drift, *args).argmax(-1)
    idx, value = T.implicit_greedy_unrolled.eager(drift, *args)
    assert torch.equal(idx, expected)
    assert torch.equal(value, T.candidate_chunk.eager(args[1], n, per_conn, args[3], args[4], args[5]).gather(
        -1, idx.unsqueeze(-1)).squeeze(-1))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 12), coef=st.floats(-1e4, 1e4), per_conn=st.sampled_from([0, 1]))
def test_unrolled_int8_update_equals_the_rows_form(seed, k, coef, per_conn):
    g = torch.Generator().manual_seed(seed)
    n = 257
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    args = (q, torch.randn(n, generator=g), torch.tensor(coef), C.i32(seed % 1000), per_conn, C.i32(seed),
            C.stream_keys(seed, C.Stream.CANDIDATES, k)[1], C.grid_step(0.05), C.i32(seed ^ 3), C.stream_keys(seed, C.Stream.ROUND, k)[1])
    assert torch.equal(T.int8_update_unrolled.eager(*args), T.int8_update_rows.eager(*args))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([2, 4, 8, 9, 16, 64]), n=st.integers(1, 300),
       coef=st.floats(-1e4, 1e4), per_conn=st.sampled_from([0, 1]), start=st.integers(0, 2**31 - 400))
def test_packed_and_hashed_int8_updates_equal_the_rows_form(seed, k, n, coef, per_conn, start):
    # K <= 8: the levels packed in one word; above: the per-connection hashes made apart. The same
    # levels, re-centring and clipping included (levels up to +-128)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    d, coef_t, start_t, key_a, round_a = torch.randn(n, generator=g) * 10, torch.tensor(coef), C.i32(start), C.i32(seed), C.i32(seed ^ 3)
    keys_b, step, round_b = C.stream_keys(seed, C.Stream.CANDIDATES, k)[1], C.grid_step(0.05), C.stream_keys(seed, C.Stream.ROUND, k)[1]
    args = (d, coef_t, start_t, per_conn, key_a, keys_b, step, round_a, round_b)
    want = T.int8_update_rows.eager(q, *args)
    if k <= 8:
        words = T.packed_words(q)
        assert words is not None and words.shape == (n, 1)
        got = T.int8_update_packed.eager(words.view(-1), *args).view(torch.int8).view(n, k)
    else:
        hashes = T.connection_hashes.eager(d, coef_t, start_t, per_conn, key_a, round_a)
        got = T.int8_update_hashed.eager(q, *hashes, keys_b, step, round_b)
    assert torch.equal(got, want)
    assert torch.equal(torch.ops.seedslot.int8_update(q, *args), want)  # the dispatch


@pytest.mark.parametrize("triton, kernel", [(False, "int8_update_hashed"), (True, "int8_update_rows")])
def test_int8_update_dispatch_above_k8(monkeypatch, triton, kernel):
    # the CPU runs the hashed form; CUDA with Triton the rows form, whose Triton twin it has
    n, k = 50, 24
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    args = (torch.randn(n) * 10, torch.tensor(-300.0), C.i32(5), 1, C.i32(7), C.stream_keys(2, C.Stream.CANDIDATES, k)[1],
            C.grid_step(0.05), C.i32(9), C.stream_keys(2, C.Stream.ROUND, k)[1])
    calls, rows = [], T.int8_update_rows.eager
    # the CPU kernel and, with Triton on, the CUDA kernel of the op
    run = ops._int8_update_cuda if triton else ops._int8_update_cpu
    monkeypatch.setattr(_backends, "triton_on", lambda: triton)
    monkeypatch.setattr(T, kernel, _backends.fused()(lambda *a: calls.append(kernel) or rows(q, *args)))
    run(q, *args)
    assert calls == [kernel]


@pytest.mark.slow
def test_compiled_hashed_int8_update_equals_the_rows_form_on_a_full_chunk():
    # the size and K the CPU path runs at (one FUSED_CHUNK_VALUES chunk at K = 64), compiled
    n, k = _chunks.FUSED_CHUNK_VALUES // 64, 64
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    d, coef, start, key_a, round_a = torch.randn(n, generator=g) * 10, torch.tensor(-300.0), C.i32(12345), C.i32(7), C.i32(9)
    keys_b, step, round_b = C.stream_keys(2, C.Stream.CANDIDATES, k)[1], C.grid_step(0.05), C.stream_keys(2, C.Stream.ROUND, k)[1]
    hashes = T.connection_hashes.compiled(d, coef, start, 1, key_a, round_a)
    got = T.int8_update_hashed.compiled(q, *hashes, keys_b, step, round_b)
    assert torch.equal(got, T.int8_update_rows.eager(q, d, coef, start, 1, key_a, keys_b, step, round_a, round_b))
