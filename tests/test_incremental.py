"""Incremental implicit selection (SlotConfig(scores="implicit", incremental=True)): at every step
the same selections as full recomputation, exactly, whatever happened to the drift and factor."""

import copy
import importlib.util
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seedslot as ss
import seedslot.models
from seedslot import SlotConfig
from seedslot.ops import _backends
from seedslot.ops import _torch as K
from seedslot.memory import state_bytes

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(params=["numba", "torch"])
def path(request, monkeypatch):
    """A test on both CPU paths: the numba twin (one pass) and torch's scan and re-selection."""
    if request.param == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("SEEDSLOT_NUMBA", "1" if request.param == "numba" else "0")
    return request.param


both_paths = pytest.mark.usefixtures("path")


def pair(kind="linear", k=8, sharing="none", selection="greedy", seed=3, bias=True):
    cfg = SlotConfig(k=k, scores="implicit", incremental=True, seed=seed, sharing=sharing, selection=selection)
    make = ((lambda c: ss.SlotLinear(9, 7, bias=bias, config=c)) if kind == "linear"
            else (lambda c: ss.SlotConv2d(3, 4, 3, bias=bias, config=c)))
    return make(cfg), make(cfg.replace(incremental=False))


def check(inc, ref=None):
    """inc's greedy selection (index and value) equals a fresh full recomputation of its state."""
    if ref is None:
        ref = copy.deepcopy(inc)
        ref.storage = ss.storages.storage_for("implicit")
    ref.set_extra_state(inc.get_extra_state())
    with torch.no_grad():  # not load_state_dict: it refuses a non-finite drift
        for part in inc.parts:
            for name in (f"{part}_drift", f"{part}_scale"):
                getattr(ref, name).copy_(getattr(inc, name))
    for part in inc.parts:
        got_idx, got_val = inc.storage.greedy(inc, part)
        want_idx, want_val = ref.storage.greedy(ref, part)
        assert torch.equal(got_idx.long(), want_idx), part  # the cache keeps a uint8 index
        assert torch.equal(got_val, want_val), part
        assert torch.equal(inc.selected_index(part), ref.selected_index(part))


def at_breakpoints(layer, part, gen, ulps):
    """Put some connections' ratio a = A/c at (a few ulps from) a breakpoint between two of their
    candidates: where fp32 scores tie or nearly tie."""
    drift, c = getattr(layer, f"{part}_drift").view(-1), getattr(layer, f"{part}_scale")
    n, k = drift.shape[0], layer.k
    if k < 2:
        return
    offset = layer.parts[part][1]
    conn = torch.arange(offset, offset + n, dtype=torch.int32)
    ck = layer.candidate_keys
    w = K.signed24(K.bits(conn * ck.per_conn, ck.key, ck.keys)).to(torch.float32) * ck.step
    s0 = K.unit24(K.bits(conn, layer._score_key, layer._score_keys)) * layer._score_bound
    i = torch.randint(0, k, (n,), generator=gen)
    j = (i + torch.randint(1, k, (n,), generator=gen)) % k
    wi, wj = w.gather(1, i[:, None])[:, 0].double(), w.gather(1, j[:, None])[:, 0].double()
    si, sj = s0.gather(1, i[:, None])[:, 0].double(), s0.gather(1, j[:, None])[:, 0].double()
    a = ((si - sj) / (wi - wj)).float()  # the real breakpoint, rounded to fp32
    new = (a * c).float()
    for _ in range(ulps):
        new = torch.nextafter(new, torch.full_like(new, math.inf))
    pick = (torch.rand(n, generator=gen) < 0.5) & torch.isfinite(new)
    drift.copy_(torch.where(pick, new, drift))


@both_paths
@SETTINGS
@given(kind=st.sampled_from(["linear", "conv"]), k=st.sampled_from([1, 2, 3, 8, 9]),
       sharing=st.sampled_from(["none", "layer"]), seed=st.integers(0, 2**20),
       scale=st.sampled_from([1e-4, 1e-2, 1.0, 30.0]), wd=st.sampled_from([0.0, 0.05, 0.5]),
       ulps=st.integers(-1, 3))
def test_random_trajectories_select_as_full_recomputation(kind, k, sharing, seed, scale, wd, ulps):
    inc, ref = pair(kind, k, sharing, seed=seed % 7)
    gen = torch.Generator().manual_seed(seed)
    for step in range(12):
        for part in inc.parts:
            d = torch.randn(inc.parts[part][0], generator=gen) * scale * float(torch.rand((), generator=gen))
            inc.update_scores(part, d, 0.1, wd if step % 2 else 0.0, step)  # weight decay: c shrinks
            if ulps >= 0 and step % 4 == 3:
                at_breakpoints(inc, part, gen, ulps)
        check(inc, ref)


@both_paths
@SETTINGS
@given(seed=st.integers(0, 2**20), k=st.sampled_from([2, 8, 16]))
def test_ties_and_near_ties_at_every_breakpoint_ulp(seed, k):
    inc, ref = pair("linear", k)
    gen = torch.Generator().manual_seed(seed)
    check(inc, ref)  # fills the cache
    for ulps in range(0, 6):
        at_breakpoints(inc, "weight", gen, ulps)
        check(inc, ref)


@both_paths
def test_sample_selection_bypasses_the_cache_and_greedy_stays_exact():
    inc, ref = pair("linear", 8, selection="sample")
    opt_i, opt_r = ss.SlotSGD(inc.parameters(), lr=0.5, momentum=0.9), ss.SlotSGD(ref.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        for layer, opt in ((inc, opt_i), (ref, opt_r)):
            opt.zero_grad()
            layer.train()(x).square().sum().backward()
            opt.step()
        assert torch.equal(inc.weight_drift, ref.weight_drift)  # the same samples, the same updates
        inc.eval(), ref.eval()
        assert torch.equal(inc(x), ref(x))
        check(inc, ref)


@both_paths
def test_state_dict_round_trips_mid_run_and_new_seeds_empty_the_cache():
    inc, ref = pair("conv", 8)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        inc.update_scores("weight", torch.randn(inc.parts["weight"][0], generator=gen), 0.3, 0.0, step)
        check(inc, ref)
    assert set(inc.state_dict()) == set(ref.state_dict())  # the cache is not saved
    other, _ = pair("conv", 8, seed=11)  # other seeds (and so other keys) and drift
    other.update_scores("weight", torch.randn(other.parts["weight"][0], generator=gen), 0.3, 0.0, 0)
    inc.load_state_dict(other.state_dict())
    assert inc.seed == 11
    check(inc)
    fresh, _ = pair("conv", 8)
    fresh.load_state_dict(other.state_dict())
    assert torch.equal(fresh.selected_index(), inc.selected_index())
    lam = dict(other.state_dict())
    lam["_extra_state"] = {**ss.layers.decode_slot_state(lam["_extra_state"]), "score_lambda": 0.37}  # a new bound
    inc.load_state_dict(lam)
    check(inc)


@both_paths
def test_edits_of_the_drift_and_factor_deepcopy_and_to_need_no_invalidation():
    inc, ref = pair("linear", 8)
    check(inc, ref)
    with torch.no_grad():
        inc.weight_drift.copy_(torch.randn(inc.weight_drift.shape) * 0.05)  # a user's edit, no API
        check(inc, ref)
        inc.weight_scale.fill_(0.25)
        check(inc, ref)
        inc.weight_scale.fill_(0.0)  # outside the cached range of c: full recomputation
        check(inc, ref)
        inc.weight_scale.fill_(1.0)
        inc.weight_drift[0, 0] = float("nan")  # non-finite: full recomputation
        check(inc, ref)
        inc.weight_drift[0, 0] = 1e30
        check(inc, ref)
    dup = copy.deepcopy(inc).to("cpu")
    check(dup, ref)


def test_stale_rows_is_a_outside_the_open_interval():
    # (drift, lo, hi) with c = 0.5: a = 2 * drift; stale unless lo < a < hi strictly
    inf, nan = math.inf, math.nan
    cases = [(0.5, 0.0, 2.0, False), (0.0, 0.0, 2.0, True), (1.0, 0.0, 2.0, True),  # a == lo, a == hi
             (0.25, 0.6, 2.0, True), (nan, -inf, inf, True), (0.5, inf, -inf, True),  # NaN, an empty interval
             (inf, 0.0, inf, True), (-inf, -inf, 0.0, True), (0.5, -inf, inf, False),
             (3e38, 0.0, 3e38, True)]  # 2 * 3e38 overflows fp32 to inf: stale, and no numpy warning
    drift, lo, hi, stale = (torch.tensor(col, dtype=torch.float32) if i < 3 else list(col)
                            for i, col in enumerate(zip(*cases)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = K.incremental_stale_rows(drift.requires_grad_(), 0.5, lo, hi)
    assert rows.dtype == torch.int64 and rows.tolist() == [i for i, s in enumerate(stale) if s]


def test_kernel_select_at_matches_the_greedy_kernels():
    layer, _ = pair("linear", 16, bias=False)
    gen = torch.Generator().manual_seed(0)
    drift = torch.randn(63, generator=gen) * 0.3
    args = ss.storages.IncrementalImplicitScores._at_args(layer, "weight")
    start = torch.full((), 0, dtype=torch.int32)
    for kk in (1, 8, 16):
        ck = layer.candidate_keys._replace(keys=layer._cand_keys[:kk])
        full = (args[0], start, *ck, layer._score_key, layer._score_keys[:kk], layer._score_bound)
        conn = torch.arange(63, dtype=torch.int32)
        at = (args[0], *ck, layer._score_key, layer._score_keys[:kk], layer._score_bound)
        for fn in (K.implicit_select_at.eager, K.implicit_select_at.compiled):
            idx, val, lo, hi = fn(drift, conn, *at)
            want_idx, want_val = torch.ops.seedslot.implicit_greedy(drift, *full)  # the op
            assert torch.equal(idx, want_idx) and torch.equal(val, want_val)
            a = drift / args[0]
            inside = (a > lo) & (a < hi)
            assert inside.float().mean() > 0.5  # the intervals are not trivially empty


def test_compiled_model_bypasses_the_cache_and_matches_eager():
    torch.manual_seed(0)
    cfg = SlotConfig(k=4, scores="implicit", incremental=True)
    model = torch.nn.Sequential(ss.SlotLinear(6, 5, config=cfg), torch.nn.ReLU(), ss.SlotLinear(5, 3, config=cfg))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 6)
    for m in (eager, compiled):
        opt = ss.SlotSGD(m.parameters(), lr=1.0, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    assert torch.equal(eager[0].weight_drift, model[0].weight_drift)
    assert torch.equal(eager(x), compiled(x))


def test_config_state_bytes_and_repr():
    with pytest.raises(ValueError, match="implicit"):
        SlotConfig(scores="int8", incremental=True)
    with pytest.raises(ValueError, match="bool"):
        SlotConfig(scores="implicit", incremental=1)
    inc, ref = pair("linear", 8)
    conns = 9 * 7 + 7
    assert state_bytes(inc) - state_bytes(ref) == 13 * conns  # uint8 index, fp32 value, fp32 lo and hi
    assert inc.state_categories()["weight_lo"] == "scores"
    assert "incremental=True" in repr(inc) and "incremental" not in repr(ref)
    big, _ = pair("linear", 300)
    assert big.weight_sel.dtype == torch.int16


@both_paths
def test_training_run_is_bit_identical_to_full_recomputation():
    torch.manual_seed(0)
    a = ss.models.build("lenet", mode="seeded", config=SlotConfig(k=8, scores="implicit", incremental=True),
                        input_size=8)
    b = ss.models.build("lenet", mode="seeded", config=SlotConfig(k=8, scores="implicit"), input_size=8)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    opts = [ss.SlotSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) for m in (a, b)]
    for _ in range(8):
        for m, opt in zip((a, b), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and (torch.equal(t1, t2) if isinstance(t1, torch.Tensor) else t1 == t2), n1


def test_a_numba_that_does_not_import_falls_back_to_torch_with_a_warning(monkeypatch):
    real_import, real_spec = importlib.import_module, importlib.util.find_spec

    def broken(name, *args, **kwargs):
        if name == "seedslot.ops._numba":
            raise ImportError("numba needs an older numpy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "numba" else real_spec(name, *a))
    monkeypatch.setenv("SEEDSLOT_NUMBA", "1")
    _backends._numba_module.cache_clear()
    try:
        inc, ref = pair("linear", 8)
        with pytest.warns(RuntimeWarning, match="numba is installed but does not import.*older numpy"):
            check(inc, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check(inc, ref)  # the torch path from then on, without another warning
        assert _backends.numba_kernels() is None
    finally:
        _backends._numba_module.cache_clear()


@both_paths
def test_a_graph_keeps_the_weights_it_was_given_until_its_backward_and_training_copies_nothing():
    inc, ref = pair("linear", 8)
    x = torch.randn(5, 9, requires_grad=True)
    inc(x).sum().backward()  # a training step's forward and backward: the cache is back
    cache = inc.weight_val
    with torch.no_grad():
        inc.weight_drift.add_(torch.randn(inc.weight_drift.shape) * 0.05)
    held = inc(x)  # lends the cache to this graph
    assert inc.weight_val is cache  # not copied while nothing wrote to it
    w_held = inc.selected_weight().clone()
    with torch.no_grad():  # re-selections while the graph waits: they write into a copy
        inc.weight_drift.add_(torch.randn(inc.weight_drift.shape) * 0.05)
        assert not torch.equal(inc.selected_weight(), w_held)
        check(inc, ref)
    x.grad = None
    held.sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 7) @ w_held)  # the weights of the graph's forward
    cache = inc.weight_val
    for _ in range(3):  # a training loop: forward, backward, change the scores
        inc(x).sum().backward()
        with torch.no_grad():
            inc.weight_drift.add_(torch.randn(inc.weight_drift.shape) * 0.05)
    check(inc, ref)
    assert inc.weight_val is cache



@both_paths
def test_a_retained_graph_keeps_its_weights_across_a_step_and_a_selection():
    inc, _ = pair("linear", 8)
    opt = ss.SlotSGD(inc.parameters(), lr=0.5)
    x = torch.randn(5, 9, requires_grad=True)
    inc(x).square().sum().backward()
    opt.step()
    out = inc(x)
    w0, b0 = inc.selected_weight().clone(), inc.selected_bias().clone()
    first, second = out.sum(), out.square().sum()  # two losses of one forward
    first.backward(retain_graph=True)
    opt.step()
    with torch.no_grad():
        inc.eval()(x), inc.train()  # a selection re-selects before the second backward
    assert not torch.equal(inc.selected_weight(), w0)
    x.grad = None
    second.backward()
    assert torch.allclose(x.grad, (2 * (x.detach() @ w0.T + b0)) @ w0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scores", ["int8", "implicit", "incremental"])
def test_torch_func_transforms_see_the_selected_weights(scores):
    cfg = SlotConfig(k=8, scores="implicit" if scores == "incremental" else scores, incremental=scores == "incremental")
    layer = ss.SlotLinear(9, 7, config=cfg)
    x = torch.randn(5, 9)
    assert torch.allclose(torch.func.vmap(lambda xi: layer(xi[None])[0])(x), layer(x), atol=1e-6)
    assert torch.allclose(torch.func.grad(lambda xi: layer(xi[None]).sum())(x[0]), layer.selected_weight().sum(0))
    params = dict(layer.named_parameters())
    per_sample = torch.func.vmap(torch.func.grad(
        lambda p, xi: torch.func.functional_call(layer, p, (xi[None],)).square().sum()), in_dims=(None, 0))(params, x)
    layer(x).square().sum().backward()
    assert torch.allclose(per_sample["slot_weight"].sum(0), layer.slot_weight.grad, rtol=1e-5, atol=1e-5)
