"""Transposed convolutions and nn.MultiheadAttention's input projection as slot layers: they compute
as torch's modules with the selected weights, their dense twins agree with them, slotify_ converts
and reports them, and training, compile, state_dict, to_dense and export cover them."""

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import seedslot as ss
from seedslot.candidates import glorot_sigma
from seedslot.checkpoints import CheckpointError
from seedslot.convert import layer_seed
from seedslot.export import exported_layers
from seedslot.testing import assert_same_candidates, assert_same_selection, fingerprint

from export_files import reframe
from train_steps import assert_compiled_trains_as_eager

TRANSPOSE = {1: ss.SlotConvTranspose1d, 2: ss.SlotConvTranspose2d, 3: ss.SlotConvTranspose3d}
DENSE_TRANSPOSE = {1: ss.DenseSlotConvTranspose1d, 2: ss.DenseSlotConvTranspose2d, 3: ss.DenseSlotConvTranspose3d}
TORCH_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


# ---------------------------------------------------------------- transposed convolutions


@st.composite
def transpose_geometry(draw):
    dims = draw(st.integers(1, 3))
    n = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(dims))  # noqa: E731
    stride, dilation = n(1, 3), n(1, 2)
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    groups = draw(st.integers(1, 3))
    return dict(dims=dims, in_channels=groups * draw(st.integers(1, 2)), out_channels=groups * draw(st.integers(1, 2)),
                kernel_size=n(1, 3), stride=stride, padding=n(0, 2), output_padding=output_padding, groups=groups,
                bias=draw(st.booleans()), dilation=dilation, size=n(2, 4), k=draw(st.integers(1, 6)),
                seed=draw(st.integers(0, 2**40)), sharing=draw(st.sampled_from(["none", "layer", "global"])))


@settings(max_examples=30, deadline=None)
@given(transpose_geometry())
def test_conv_transpose_computes_as_torch_and_its_dense_twin_agrees(g):
    """Any geometry: the output is F.conv_transposeNd of the selected weights (nn.ConvTransposeNd's
    shape), the weight gradient reaches the proxy, and the dense twin at the same seed holds the
    same candidates, selection and forward."""
    dims, size = g.pop("dims"), g.pop("size")
    settings_ = dict(k=g.pop("k"), seed=g.pop("seed"), sharing=g.pop("sharing"))
    layer = TRANSPOSE[dims](**g, **settings_, scores="fp32")
    dense = DENSE_TRANSPOSE[dims](**g, **settings_)
    plain = TORCH_TRANSPOSE[dims](**g)
    spatial = [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in zip(
        size, g["stride"], g["padding"], g["dilation"], g["kernel_size"], g["output_padding"])]
    assume(min(spatial) >= 1)  # torch refuses an empty output
    x = torch.randn(2, g["in_channels"], *size)
    expected_shape = plain(x).shape
    assert list(expected_shape) == [2, g["out_channels"], *spatial]
    w = layer.selected_weight().requires_grad_()
    b = layer.selected_bias().requires_grad_() if g["bias"] else None
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    ref = conv(x, w, b, g["stride"], g["padding"], g["output_padding"], g["groups"], g["dilation"])
    y = layer(x)
    assert y.shape == expected_shape == ref.shape
    assert layer.weight.shape == plain.weight.shape and torch.equal(y, ref)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (ref * grad).sum().backward()
    assert torch.equal(layer.slot_weight.grad, w.grad)
    if g["bias"]:
        assert layer.bias.shape == (g["out_channels"],) and torch.equal(layer.slot_bias.grad, b.grad)
    assert_same_candidates(layer, dense)
    assert_same_selection(layer, dense)
    assert torch.equal(dense(x), y)


def test_conv_transpose_output_size_and_repr():
    layer = ss.SlotConvTranspose2d(4, 2, 3, stride=2, padding=1, k=4, seed=1)
    x = torch.randn(1, 4, 5, 5)
    assert layer(x).shape == (1, 2, 9, 9)
    assert layer(x, output_size=[10, 10]).shape == layer(x, output_size=(1, 2, 10, 10)).shape == (1, 2, 10, 10)
    with pytest.raises(ValueError, match="requested an output size"):
        layer(x, output_size=[12, 12])
    assert "output_padding=(0, 0)" in repr(layer) and layer.output_padding == (0, 0)


def test_conv_transpose_glorot_bound_is_the_weights_and_the_adjoint_convolutions():
    """fan_in = weight.size(1) * receptive field, fan_out = weight.size(0) * receptive field, as for
    every slot layer: the bound of the convolution out -> in whose adjoint it is."""
    layer = ss.SlotConvTranspose2d(4, 6, 3, groups=2, k=2)
    assert layer.weight_shape == (4, 3, 3, 3)
    assert layer.sigma == glorot_sigma(3 * 9, 4 * 9) == ss.SlotConv2d(6, 4, 3, groups=2, k=2).sigma
    assert layer.score_lambda == 1.0  # a convolution's lambda


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_padding=2, stride=2), "output_padding"),
    (dict(padding_mode="reflect"), "padding_mode must be 'zeros'"),
    (dict(padding="same"), "padding"),
    (dict(groups=3), "groups"),
])
@pytest.mark.parametrize("cls", [ss.SlotConvTranspose2d, ss.DenseSlotConvTranspose2d])
def test_conv_transpose_refuses_bad_geometry_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(4, 2, 3, **kwargs, k=2)


@pytest.mark.parametrize("dense", [False, True])
def test_slotify_converts_every_conv_transpose_and_to_dense_gives_them_back(dense):
    model = nn.Sequential(nn.ConvTranspose1d(2, 4, 3, stride=2), nn.Flatten(), nn.Unflatten(1, (4, 1, 1, 11)),
                          nn.ConvTranspose3d(4, 2, (1, 2, 2), stride=(1, 2, 1), output_padding=(0, 1, 0), bias=False))
    report = ss.slotify_(model, k=4, seed=3, dense=dense, strict=True, report=True)
    kinds = ("DenseSlot" if dense else "Slot") + "ConvTranspose"
    assert [c.target for c in report.converted] == [f"{kinds}1d", f"{kinds}3d"] and not report.learned
    assert report.converted[0].connections == 2 * 4 * 3 + 4  # weight and bias (one per output channel)
    x = torch.randn(2, 2, 5)
    plain = ss.to_dense(model.eval())
    assert type(plain[0]) is nn.ConvTranspose1d and type(plain[3]) is nn.ConvTranspose3d
    assert plain[3].output_padding == (0, 1, 0) and plain[3].bias is None
    with torch.no_grad():
        assert torch.equal(plain(x), model(x)) and model(x).shape == (2, 2, 1, 3, 12)


def test_a_conv_transpose_whose_padding_mode_was_changed_is_reported_unsupported():
    conv = nn.ConvTranspose2d(2, 2, 3)
    conv.padding_mode = "reflect"  # torch's forward would refuse it
    report = ss.slotify_(nn.Sequential(conv), k=2, report=True)
    assert not report.converted and "padding_mode 'reflect'" in report.learned[0].detail


# ---------------------------------------------------------------- nn.MultiheadAttention


def attention(**kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True, **kw))


def run(model, x, **kw):
    return model[0](x, x, x, **kw)[0]


def test_attention_input_projection_becomes_a_slot_linear_read_through_properties():
    model = attention()
    plain_keys = set(model.state_dict())
    report = ss.slotify_(model, k=4, seed=1, report=True, strict=True)
    mha = model[0]
    assert isinstance(mha, ss.SlotMultiheadAttention) and isinstance(mha, nn.MultiheadAttention)
    assert isinstance(mha.in_proj, ss.SlotLinear) and isinstance(mha.out_proj, ss.SlotLinear)
    assert [(c.name, c.source, c.replaces) for c in report.converted][0] == (
        "0.in_proj", "MultiheadAttention", ("0.in_proj_weight", "0.in_proj_bias"))
    assert report.converted[0].connections == 3 * 8 * 8 + 3 * 8 and not report.learned
    assert mha.in_proj.sigma == glorot_sigma(8, 24)  # the (3E, E) projection as one linear map
    assert torch.equal(mha.in_proj_weight.detach(), mha.in_proj.selected_weight())
    assert torch.equal(mha.in_proj_bias.detach(), mha.in_proj.selected_bias())
    with pytest.raises(AttributeError):
        mha.in_proj_weight = torch.zeros(24, 8)
    keys = set(model.state_dict())
    assert "0.in_proj_weight" not in keys and "0.in_proj.weight_scores" in keys and "0.in_proj._extra_state" in keys
    assert set(ss.to_dense(model).state_dict()) == plain_keys  # back to nn.MultiheadAttention's keys
    assert type(ss.to_dense(model)[0]) is nn.MultiheadAttention


def test_attention_trains_its_input_projection_through_the_straight_through_path():
    """The proxy's gradient is what an ordinary nn.MultiheadAttention computing with the selected
    weights gives its in_proj_weight; SlotSGD then moves the scores."""
    model = attention()
    ss.slotify_(model, k=4, seed=2)
    plain = ss.to_dense(model).train()
    x = torch.randn(3, 5, 8)
    run(model, x).square().sum().backward()
    run(plain, x).square().sum().backward()
    mha = model[0]
    torch.testing.assert_close(mha.in_proj.slot_weight.grad, plain[0].in_proj_weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mha.in_proj.slot_bias.grad, plain[0].in_proj_bias.grad, rtol=1e-5, atol=1e-6)
    before = mha.in_proj.score_values().clone()
    ss.SlotSGD(ss.slot_parameters(model), lr=0.5).step()
    assert not torch.equal(before, mha.in_proj.score_values())


def test_attention_fast_path_computes_with_the_selection(monkeypatch):
    model = attention()
    ss.slotify_(model, k=4, seed=3)
    model.eval()
    calls = []
    native = torch._native_multi_head_attention

    def spy(*args):
        calls.append(args[5])  # in_proj_weight
        return native(*args)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        fast = run(model, x, need_weights=False)
    assert len(calls) == 1 and torch.equal(calls[0], model[0].in_proj.selected_weight())
    slow = run(model, x, need_weights=False)  # gradients enabled: the ordinary path
    assert len(calls) == 1
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)


def test_attention_ties_filters_sharing_and_bias_kv():
    def tied():
        a, b = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, add_bias_kv=True)
        b.in_proj_weight = a.in_proj_weight
        return nn.ModuleDict(dict(a=a, b=b))

    model = tied()
    report = ss.slotify_(model, k=4, report=True)
    assert type(model["a"]) is type(model["b"]) is nn.MultiheadAttention
    assert model["a"].in_proj_weight is model["b"].in_proj_weight
    assert {w.name: w.reason for w in report.learned if w.name.startswith("b.") and "proj" not in w.name} == {
        "b.bias_k": "vector", "b.bias_v": "vector"}  # not tied: only the projections are
    assert {w.name for w in report.learned if w.reason == "tied"} >= {"a.in_proj_weight", "b.in_proj_weight"}
    with pytest.raises(ValueError, match=r"a\.in_proj_weight \(MultiheadAttention\) would stay learned: tied"):
        ss.slotify_(tied(), strict=True)

    shared = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    model = nn.ModuleDict(dict(x=shared, y=shared, z=nn.MultiheadAttention(8, 2)))
    bias_k = shared.bias_k
    report = ss.slotify_(model, k=4, report=True, strict=True, filter_fn=lambda m, fqn: fqn != "z")
    assert model["x"] is model["y"] and isinstance(model["x"], ss.SlotMultiheadAttention)
    assert model["x"].bias_k is bias_k  # the same Parameter: an optimizer holding it keeps training it
    assert {w.name: w.reason for w in report.learned if w.name.startswith("x.")} == {"x.bias_k": "vector",
                                                                                     "x.bias_v": "vector"}
    assert type(model["z"]) is nn.MultiheadAttention and report.learned[-1].reason == "filtered"
    again = ss.slotify_(model, k=4, report=True, filter_fn=lambda m, fqn: fqn != "z")  # nothing more to do
    assert not again.converted and not any(w.name.startswith("x.bias") and w.reason != "vector"
                                           for w in again.learned)


def test_dense_attention_and_other_dtypes():
    model = attention()
    ss.slotify_(model, k=4, dense=True)
    assert isinstance(model[0].in_proj, ss.DenseSlotLinear)
    run(model, torch.randn(2, 3, 8)).sum().backward()
    assert model[0].in_proj.weight_scores.grad is not None
    model = attention().double()
    ss.slotify_(model, k=4)
    assert model[0].in_proj_weight.dtype == torch.float64 and run(model, torch.randn(2, 3, 8).double()).dtype == torch.float64
    copied = copy.deepcopy(model)
    assert torch.equal(copied[0].in_proj_weight, model[0].in_proj_weight)


# ---------------------------------------------------------------- separate q/k/v projections


class Cross(nn.Module):
    """Cross-attention from E = 8 queries to keys of dimension 6 and values of dimension 5: separate
    q_proj_weight (8, 8), k_proj_weight (8, 6) and v_proj_weight (8, 5)."""

    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, q, k, v):
        return self.head(self.attn(q, k, v)[0].mean(1))


SEPARATE = [dict(), dict(bias=False), dict(add_bias_kv=True)]
PROJECTIONS = {"q_proj": 8, "k_proj": 6, "v_proj": 5}  # name -> in_features


def cross(**kw):
    torch.manual_seed(0)
    return Cross(**kw)


def cross_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(4, n, d, generator=g, dtype=dtype) for n, d in ((3, 8), (5, 6), (5, 5)))


def selected_attention(mha):
    """An ordinary nn.MultiheadAttention holding ``mha``'s selected projections, built by hand."""
    bias = mha.in_proj_bias is not None
    plain = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True, bias=bias,
                                  add_bias_kv=mha.bias_k is not None, dtype=mha.q_proj_weight.dtype)
    with torch.no_grad():
        for name in PROJECTIONS:
            getattr(plain, f"{name}_weight").copy_(getattr(mha, name).selected_weight())
        if bias:
            plain.in_proj_bias.copy_(torch.cat([getattr(mha, name).selected_bias() for name in PROJECTIONS]))
            plain.out_proj.bias.copy_(mha.out_proj.selected_bias())
        plain.out_proj.weight.copy_(mha.out_proj.selected_weight())
        if mha.bias_k is not None:
            plain.bias_k.copy_(mha.bias_k), plain.bias_v.copy_(mha.bias_v)
    return plain


@pytest.mark.parametrize("kw", SEPARATE)
def test_separate_projections_become_three_slot_linears(kw):
    model = cross(**kw)
    plain_keys = set(model.state_dict())
    report = ss.slotify_(model, k=4, seed=1, report=True, strict=True)
    mha = model.attn
    assert isinstance(mha, ss.SlotMultiheadAttention) and isinstance(mha.out_proj, ss.SlotLinear)
    bias = kw.get("bias", True)
    third = ("attn.in_proj_bias",) if bias else ()
    assert [(c.name, c.source, c.replaces, c.connections) for c in report.converted[:3]] == [
        (f"attn.{name}", "MultiheadAttention", (f"attn.{name}_weight", *third), 8 * n + 8 * bias)
        for name, n in PROJECTIONS.items()]
    assert {w.reason for w in report.learned} <= {"vector"} and not [w for w in report.learned if "proj" in w.name]
    assert mha.in_proj_weight is None and not mha._qkv_same_embed_dim
    for name, n in PROJECTIONS.items():
        layer = getattr(mha, name)
        assert isinstance(layer, ss.SlotLinear) and layer.weight_shape == (8, n)
        assert layer.seed == layer_seed(1, f"attn.{name}") and layer.sigma == glorot_sigma(n, 8)
        assert torch.equal(getattr(mha, f"{name}_weight").detach(), layer.selected_weight())
        with pytest.raises(AttributeError):
            setattr(mha, f"{name}_weight", torch.zeros(8, n))
    if bias:
        assert torch.equal(mha.in_proj_bias.detach(),
                           torch.cat([getattr(mha, name).selected_bias() for name in PROJECTIONS]))
    else:
        assert mha.in_proj_bias is None
    keys = set(model.state_dict())
    assert {"attn.q_proj.weight_scores", "attn.v_proj._extra_state"} <= keys and not keys & {
        "attn.q_proj_weight", "attn.in_proj_bias"}
    dense = ss.to_dense(model.eval())
    assert type(dense.attn) is nn.MultiheadAttention and set(dense.state_dict()) == plain_keys
    assert (dense.attn.kdim, dense.attn.vdim) == (6, 5) and (dense.attn.in_proj_bias is None) != bias
    again = ss.slotify_(model, k=4, seed=1, report=True, strict=True)  # converted already: kept as it is
    assert not again.converted and {c.name for c in again.kept} >= {"attn.q_proj", "attn.k_proj", "attn.v_proj"}
    x = cross_inputs()
    # Gradients on: torch's matmul folds a batched input differently when the weight needs no
    # gradient, so both sides compute with weights that require one.
    assert torch.equal(dense(*x), model(*x))


@pytest.mark.parametrize("kw", SEPARATE)
def test_separate_projections_train_with_the_gradient_of_a_plain_attention(kw):
    """The proxies' gradients are those an ordinary nn.MultiheadAttention computing with the
    selected weights gives its q/k/v_proj_weight and the thirds of its in_proj_bias; a few SlotSGD
    steps lower the loss on a fixed batch."""
    model = cross(**kw)
    ss.slotify_(model, k=8, seed=2)
    x = cross_inputs()
    mha = model.attn
    plain = selected_attention(mha)
    model.attn(*x)[0].square().sum().backward()
    plain(*x)[0].square().sum().backward()
    for i, name in enumerate(PROJECTIONS):
        layer = getattr(mha, name)
        torch.testing.assert_close(layer.slot_weight.grad, getattr(plain, f"{name}_weight").grad, rtol=1e-5, atol=1e-6)
        if kw.get("bias", True):
            torch.testing.assert_close(layer.slot_bias.grad, plain.in_proj_bias.grad[8 * i : 8 * i + 8],
                                       rtol=1e-5, atol=1e-6)
    model.zero_grad()
    y = torch.tensor([0, 1, 2, 0])
    opt = ss.SlotSGD(ss.slot_parameters(model), lr=0.1, momentum=0.9)
    before = {name: getattr(mha, name).score_values().clone() for name in PROJECTIONS}
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(*x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[name], getattr(mha, name).score_values()) for name in PROJECTIONS)


def test_a_tied_separate_projection_stays_plain_and_is_reported_tied():
    def tied_across():
        a, b = nn.MultiheadAttention(8, 2, kdim=6, vdim=5), nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
        b.k_proj_weight = a.k_proj_weight
        return nn.ModuleDict(dict(a=a, b=b))

    model = tied_across()
    report = ss.slotify_(model, k=4, report=True)
    assert type(model["a"]) is type(model["b"]) is nn.MultiheadAttention
    assert model["a"].k_proj_weight is model["b"].k_proj_weight
    tied = {w.name for w in report.learned if w.reason == "tied"}
    assert {"a.k_proj_weight", "b.k_proj_weight", "a.q_proj_weight", "b.v_proj_weight"} <= tied
    assert not [c for c in report.converted if "_proj" in c.name and "out_proj" not in c.name]
    with pytest.raises(ValueError, match=r"would stay learned: tied"):
        ss.slotify_(tied_across(), strict=True)

    within = nn.MultiheadAttention(8, 2, kdim=8, vdim=5)  # q and k both (8, 8): one Parameter for both
    within.k_proj_weight = within.q_proj_weight
    model = nn.Sequential(within)
    report = ss.slotify_(model, k=4, report=True)
    assert type(model[0]) is nn.MultiheadAttention and model[0].k_proj_weight is model[0].q_proj_weight
    assert {w.name: w.reason for w in report.learned if w.name.endswith("proj_weight")} == {
        "0.q_proj_weight": "tied", "0.k_proj_weight": "tied", "0.v_proj_weight": "tied"}
    assert "0.q_proj_weight is also 0.k_proj_weight" in str(report)


def test_separate_projections_dense_reference_and_float64():
    model = cross(add_bias_kv=True)
    ss.slotify_(model, k=4, dense=True)
    assert all(isinstance(getattr(model.attn, name), ss.DenseSlotLinear) for name in PROJECTIONS)
    model(*cross_inputs()).sum().backward()
    assert all(getattr(model.attn, name).weight_scores.grad is not None for name in PROJECTIONS)
    assert torch.equal(ss.to_dense(model.eval())(*cross_inputs()), model(*cross_inputs()))
    model = cross().double()
    ss.slotify_(model, k=4)
    x = cross_inputs(torch.float64)
    assert model.attn.k_proj_weight.dtype == model.attn.in_proj_bias.dtype == torch.float64
    assert model(*x).dtype == torch.float64
    dense = ss.to_dense(model.eval())
    assert dense.attn.v_proj_weight.dtype == dense.head.weight.dtype == torch.float64
    assert torch.equal(dense(*x), model(*x))
    assert torch.equal(copy.deepcopy(model).attn.v_proj_weight, model.attn.v_proj_weight)


def test_compiled_separate_projections_train_as_eager():
    eager = cross(add_bias_kv=True)
    ss.slotify_(eager, k=4, seed=5, strict=True)
    assert isinstance(eager.attn, ss.SlotMultiheadAttention)
    assert_compiled_trains_as_eager(eager, cross_inputs(), torch.tensor([0, 1, 2, 0]), F.cross_entropy, "aot_eager")


@pytest.mark.parametrize("kw", SEPARATE)
def test_separate_projections_state_dict_and_export(tmp_path, kw):
    model = cross(**kw)
    ss.slotify_(model, k=8, seed=6, scores="implicit")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = cross(**kw)
    ss.slotify_(other, k=8, seed=7, scores="implicit")
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = cross_inputs()
    model.eval(), other.eval()
    assert torch.equal(other(*x), model(*x))  # gradients on: see test_separate_projections_become_three_slot_linears
    path = os.path.join(tmp_path, "cross.slot")
    ss.export(model, path)
    assert fingerprint(path) == fingerprint(model)
    assert [layer.name for layer in exported_layers(path)] == ["attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                "attn.out_proj", "head"]
    plain = ss.load_exported(path, model=cross(**kw))
    assert type(plain.attn) is nn.MultiheadAttention and not isinstance(plain.attn, ss.SlotMultiheadAttention)
    assert torch.equal(plain(*x), model(*x))
    if kw.get("bias", True):
        assert torch.equal(plain.attn.in_proj_bias, model.attn.in_proj_bias.detach())
    for name in PROJECTIONS:
        assert torch.equal(getattr(plain.attn, f"{name}_weight"), getattr(model.attn, name).selected_weight())


def test_load_exported_refuses_a_skeleton_or_header_that_does_not_fit_separate_projections(tmp_path):
    model = cross()
    ss.slotify_(model, k=4, seed=8)
    path = os.path.join(tmp_path, "cross.slot")
    ss.export(model, path)
    with open(path, "rb") as f:
        good = f.read()
    headers = []
    reframe(good, lambda h: headers.append(h) or h)
    assert [cfg["kind"] for cfg in headers[0]["layers"]][:3] == [
        "attention_q_proj", "attention_k_proj", "attention_v_proj"]
    wrong = {"one in_proj_weight": nn.MultiheadAttention(8, 2, batch_first=True),
             r"weight \[8, 6\] bias=True exported, the model has \[8, 7\]":
                 nn.MultiheadAttention(8, 2, kdim=7, vdim=5, batch_first=True),
             r"q_proj.: weight \[8, 8\] bias=True exported, the model has \[8, 8\] bias=False":
                 nn.MultiheadAttention(8, 2, kdim=6, vdim=5, bias=False, batch_first=True)}
    for words, attn in wrong.items():
        skeleton = cross()
        skeleton.attn = attn
        with pytest.raises(CheckpointError, match=words):
            ss.load_exported(path, model=skeleton)

    def edit(change):
        return lambda h: change(h["layers"]) or h

    edits = {
        "name must be '<attention>.k_proj'": edit(lambda layers: layers[1].update(name="attn.q_proj")),
        r"weight_shape must be \(E, E\)": edit(lambda layers: layers[1].update(kind="attention_q_proj",
                                                                                 name="attn.q_proj")),
        "in_proj_bias is filled by the biases of only q_proj, k_proj": edit(lambda layers: layers.__delitem__(2)),
    }
    bad = os.path.join(tmp_path, "bad.slot")
    for words, change in edits.items():
        with open(bad, "wb") as f:
            f.write(reframe(good, change))
        with pytest.raises(CheckpointError, match=words):
            ss.load_exported(bad, model=cross())


# ---------------------------------------------------------------- compile, state_dict and export


class Tiny(nn.Module):
    """Attention over a sequence, then a transposed convolution of it."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.ConvTranspose1d(8, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.up(self.attn(x, x, x, need_weights=False)[0].transpose(1, 2)).flatten(1)


def test_compiled_attention_and_conv_transpose_train_as_eager():
    torch.manual_seed(0)
    eager = Tiny()
    ss.slotify_(eager, k=4, seed=5)
    assert_compiled_trains_as_eager(eager, (torch.randn(4, 3, 8),), torch.randn(4, 12), F.mse_loss, "aot_eager")


def test_state_dict_round_trip_and_export(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    ss.slotify_(model, k=8, seed=6, scores="implicit")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = Tiny()
    ss.slotify_(other, k=8, seed=7, scores="implicit")
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 8)
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    path = os.path.join(tmp_path, "tiny.slot")
    ss.export(model, path)
    plain = ss.load_exported(path, model=Tiny())
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.up) is nn.ConvTranspose1d
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    wrong = Tiny()
    wrong.up.output_padding = (0,)
    with pytest.raises(CheckpointError, match="output_padding"):
        ss.load_exported(path, model=wrong)
    separate = Tiny()
    separate.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=4)
    with pytest.raises(CheckpointError, match="separate q/k/v"):
        ss.load_exported(path, model=separate)
