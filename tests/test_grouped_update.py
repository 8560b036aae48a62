"""SlotSGD's multi-tensor score update (issue 26): with ``foreach=True`` every seeded part of a param
group is updated by one ``update_group`` call per score storage, whose launches do not grow with the
number of layers (implicit: multi-tensor ops; int8 and fp32 on CUDA: packed Triton kernels over a
table of the parts), with the bits of the per-part update (``foreach=False``).

On the CPU the int8 and fp32 storages loop over their parts inside ``update_group``; the packed
kernels run here in Triton's interpreter on CPU tensors (``cuda_kernels_on_cpu``, as in
test_triton_kernels.py), compared with the CPU's per-part path.
"""

import contextlib
import copy
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import seedslot as ss
from seedslot.ops import _backends

SCORES = ("int8", "fp32", "implicit", "incremental")


@st.composite
def layer_lists(draw, max_layers=4):
    """Specs of 1..max_layers seeded layers: kind, K 1..40, storage, sharing, bias, and whether an
    int8 part starts at a scale that weight decay takes below the normal fp32 range."""
    return [dict(conv=draw(st.booleans()), k=draw(st.integers(1, 40)), scores=draw(st.sampled_from(SCORES)),
                 sharing=draw(st.sampled_from(["none", "layer"])), bias=draw(st.booleans()),
                 tiny=draw(st.booleans()))
            for _ in range(draw(st.integers(1, max_layers)))]


def build(specs):
    layers = []
    for i, s in enumerate(specs):
        kw = dict(k=s["k"], seed=i + 1, sharing=s["sharing"], bias=s["bias"])
        incremental = s["scores"] == "incremental"
        kw.update(scores="implicit" if incremental else s["scores"], incremental=incremental)
        layer = ss.SlotConv2d(2, 3, 2, **kw) if s["conv"] else ss.SlotLinear(5, 3 + i, **kw)
        if s["tiny"] and s["scores"] == "int8":
            layer.weight_scale.fill_(1.2e-38)  # 0.95 of it is below float32's tiny: decay zeroes the levels
        layers.append(layer)
    return nn.ModuleList(layers)


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(model, scales, foreach, check="deferred", momentum=0.9, nesterov=False, wd=0.1, packed=False):
    """SlotSGD steps on set gradients (``scales[s]`` times normal draws; NaN: a bad step), and what
    the model and optimizer hold after each (the error a bad step raised, if any), on the CPU.
    ``packed``: on DEV, with the CUDA kernels (see :func:`_packed_kernels`)."""
    dev = DEV if packed else torch.device("cpu")
    model.to(dev)
    opt = ss.SlotSGD(model.parameters(), lr=0.5, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                     check=check, foreach=foreach)
    g = torch.Generator().manual_seed(0)
    history = []
    with _packed_kernels(packed):
        for scale in scales:
            opt.zero_grad()
            for layer in model:
                for part in layer.parts:
                    proxy = getattr(layer, f"slot_{part}")
                    proxy.grad = (torch.randn(proxy.shape, generator=g) * scale).to(dev)
            error = None
            try:
                opt.step()
                opt.check()
            except FloatingPointError as e:
                error = str(e)
            state = opt.state_dict()["state"]
            history.append((error, {k: v.cpu().clone() for k, v in model.state_dict().items()},
                            {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                             for i, s in state.items()}))
    return history


@contextlib.contextmanager
def _packed_kernels(on):
    """While ``on``, the ops' CUDA kernels (the packed Triton kernels) run on DEV: the GPU, or CPU
    tensors in Triton's interpreter."""
    old = _backends.cuda_kernels_on_cpu
    _backends.cuda_kernels_on_cpu = on and DEV.type == "cpu"
    try:
        yield
    finally:
        _backends.cuda_kernels_on_cpu = old


def assert_same(a, b):
    assert len(a) == len(b)
    for (e1, m1, o1), (e2, m2, o2) in zip(a, b):
        assert e1 == e2
        assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1), \
            [k for k in m1 if not torch.equal(m1[k], m2[k])]
        assert o1.keys() == o2.keys()
        for i in o1:
            assert o1[i].keys() == o2[i].keys()
            assert all(torch.equal(v, o2[i][k]) if torch.is_tensor(v) else v == o2[i][k] for k, v in o1[i].items())


steps = st.lists(st.sampled_from([1.0, 3.0, 1e3, 1e6, float("nan")]), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None)
@given(layer_lists(), steps, st.sampled_from(["deferred", "eager"]), st.sampled_from([0.0, 0.9]), st.booleans(),
       st.sampled_from([0.0, 0.1]))
def test_grouped_update_equals_per_part(specs, scales, check, momentum, nesterov, wd):
    model = build(specs)
    want = train(copy.deepcopy(model), scales, False, check, momentum, nesterov and momentum > 0, wd)
    got = train(model, scales, True, check, momentum, nesterov and momentum > 0, wd)
    assert_same(got, want)


triton_runs = pytest.mark.skipif(
    not _backends.triton_available() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the packed kernels need triton, and a GPU or Triton's interpreter (TRITON_INTERPRET=1, conftest.py)")


_MIXED = [dict(conv=False, k=3, scores="int8", sharing="none", bias=True, tiny=True),
          dict(conv=True, k=9, scores="int8", sharing="layer", bias=False, tiny=False),
          dict(conv=True, k=40, scores="fp32", sharing="none", bias=True, tiny=False)]


@triton_runs
@settings(max_examples=12, deadline=None)
@given(layer_lists(max_layers=3), steps, st.sampled_from([0.0, 0.9]), st.sampled_from([0.0, 0.1]),
       st.sampled_from([None, 4]))
@example(_MIXED, [1.0, 1e6, float("nan"), 3.0], 0.9, 0.1, 4)  # zeroed levels, a coarser grid, a skipped step
def test_packed_kernels_equal_the_cpu_per_part_update(specs, scales, momentum, wd, max_block_k):
    from seedslot.ops import _triton as TK

    model = build(specs)
    want = train(copy.deepcopy(model), scales, False, momentum=momentum, wd=wd)
    old = TK.MAX_BLOCK_K
    TK.MAX_BLOCK_K = max_block_k or old  # 4: K above it spans several column tiles
    try:
        got = train(model, scales, True, momentum=momentum, wd=wd, packed=True)
    finally:
        TK.MAX_BLOCK_K = old
    assert_same(got, want)


class _Launches(TorchDispatchMode):
    """Counts the dispatched ATen operators that run a kernel (views are left out) and the
    Triton launches."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        if schema.is_mutable or not any(r.alias_info is not None for r in schema.returns):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _step_launches(scores, layers, foreach=True):
    """(operators, Triton launches) of one steady-state SlotSGD step over ``layers`` seeded layers of
    one storage, with momentum, weight decay and deferred checks, the packed kernels on."""
    from seedslot.ops import _triton as TK

    torch.manual_seed(0)
    model = nn.ModuleList([ss.SlotLinear(4, 3, k=(2, 5)[i % 2], seed=i + 1, scores=scores, bias=True, device=DEV)
                           for i in range(layers)])
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, foreach=foreach)
    launches = []
    real = TK._launch
    with _packed_kernels(True):
        for step in range(3):
            for layer in model:
                for part in layer.parts:
                    proxy = getattr(layer, f"slot_{part}")
                    proxy.grad = torch.randn(proxy.shape, device=DEV)
            if step < 2:
                opt.step()
                continue
            TK._launch = lambda kernel, *a, **kw: launches.append(kernel) or real(kernel, *a, **kw)
            try:
                with _Launches() as counted:
                    opt.step()
            finally:
                TK._launch = real
    opt.check()
    return counted.ops, len(launches)


@triton_runs
@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_launches_per_step_do_not_grow_with_the_layers(scores):
    # K 2 and 5 in both models: column tiles 2 and 8 wide, a packed launch each
    assert _step_launches(scores, 2) == _step_launches(scores, 6)
    # the counter sees the per-part path grow
    assert _step_launches(scores, 2, foreach=False)[0] < _step_launches(scores, 6, foreach=False)[0]


@triton_runs
@pytest.mark.parametrize("scores", ["int8", "fp32"])
def test_packed_step_is_one_graph(monkeypatch, scores):
    # the packed path, as SlotSGD takes it on CUDA, reads nothing back to the host either
    from test_step_graph import _explain_step

    if DEV.type == "cpu":
        monkeypatch.setattr(_backends, "cuda_kernels_on_cpu", True)
    explained = _explain_step(scores)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
