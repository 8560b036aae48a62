"""Slot layers: selection, forward/backward against torch's ops, state, memory, bad input."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import seedslot as ss
from seedslot import models, storages
from seedslot.testing import assert_same_candidates, assert_same_selection

CONV_CASES = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
]


def seeded_and_dense(kind, bias=False, **kw):
    args = (6, 4) if kind == "linear" else (4, 6, 3)
    if kind == "linear":
        return ss.SlotLinear(*args, bias=bias, **kw), ss.DenseSlotLinear(*args, bias=bias, **{k: v for k, v in kw.items() if k != "scores"})
    return ss.SlotConv2d(*args, bias=bias, **kw), ss.DenseSlotConv2d(*args, bias=bias, **{k: v for k, v in kw.items() if k != "scores"})


@pytest.mark.parametrize("scores", ["int8", "fp32"])
@pytest.mark.parametrize("dense", [False, True])
def test_selected_weight_is_candidates_at_argmax(scores, dense):
    layer = (ss.DenseSlotConv2d(3, 5, 3, k=7, seed=2) if dense else ss.SlotConv2d(3, 5, 3, k=7, seed=2, scores=scores))
    s = layer.weight_scores.detach()
    idx = s.argmax(-1)
    expected = layer.candidates().gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(layer.selected_weight(), expected)
    assert torch.equal(layer.selected_index(), idx)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_forward_backward_match_f_conv2d(case, bias):
    layer = ss.SlotConv2d(4, 6, 3, bias=bias, k=5, seed=1, **case)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    y = layer(x)
    w = layer.selected_weight().requires_grad_()
    b = layer.selected_bias().requires_grad_() if bias else None
    ref = F.conv2d(x, w, b, **case)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (ref * g).sum().backward()
    assert torch.equal(gx, x.grad)
    assert torch.equal(layer.slot_weight.grad, w.grad)
    if bias:
        assert torch.equal(layer.slot_bias.grad, b.grad)


def test_linear_forward_backward_match_f_linear():
    layer = ss.SlotLinear(7, 3, bias=True, k=4, seed=5)
    x = torch.randn(5, 7)
    y = layer(x)
    w, b = layer.selected_weight().requires_grad_(), layer.selected_bias().requires_grad_()
    ref = F.linear(x, w, b)
    assert torch.equal(y, ref)
    y.sum().backward()
    ref.sum().backward()
    assert torch.equal(layer.slot_weight.grad, w.grad) and torch.equal(layer.slot_bias.grad, b.grad)


def test_dense_straight_through_gradient():
    layer = ss.DenseSlotLinear(7, 3, k=4, seed=5)
    x = torch.randn(5, 7)
    layer(x).sum().backward()
    w = layer.selected_weight().requires_grad_()
    F.linear(x, w).sum().backward()
    assert torch.equal(layer.weight_scores.grad, w.grad.unsqueeze(-1) * layer.weight_candidates)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("sharing", ["none", "layer", "global"])
def test_dense_and_seeded_fp32_are_bit_identical_at_start(kind, sharing):
    seeded, dense = seeded_and_dense(kind, bias=True, k=5, seed=11, sharing=sharing, scores="fp32")
    assert_same_candidates(seeded, dense)  # weight and bias
    for part in ("weight", "bias"):
        assert torch.equal(getattr(seeded, f"{part}_scores"), getattr(dense, f"{part}_scores").detach())
    assert_same_selection(seeded, dense)  # indices and selected values of weight and bias


def test_bias_is_a_slot():
    layer = ss.SlotLinear(4, 3, bias=True, k=6, seed=0)
    assert layer.bias_scores.shape == (3, 6)
    cands = layer.candidates("bias")
    assert cands.shape == (3, 6) and (cands.abs() < layer.sigma).all()
    assert not torch.equal(cands, layer.candidates()[:, 0, :])  # its own connections


def test_sample_selection_train_and_eval():
    layer = ss.SlotLinear(30, 20, k=4, seed=3, selection="sample", scores="fp32", score_lambda=50.0)
    x = torch.randn(2, 30)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # eval: deterministic, the greedy choice
    assert torch.equal(layer(x), F.linear(x, layer.selected_weight()))
    assert int(layer.draws) == 0
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b) and int(layer.draws) == 2
    # Reproducible: the same draw counter gives the same sample.
    layer.draws.zero_()
    assert torch.equal(layer(x), a)


def test_sample_follows_softmax():
    layer = ss.SlotLinear(1, 1, k=3, seed=0, selection="sample", scores="fp32")
    layer.weight_scores.copy_(torch.tensor([[[0.0, 1.0, 2.0]]]))
    counts = torch.zeros(3)
    for draw in range(3000):
        counts[layer._select("weight", draw)] += 1
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert ((counts / 3000 - p).abs() < 0.03).all()


def test_state_dict_round_trip_reproduces_outputs():
    a = ss.SlotConv2d(3, 4, 3, bias=True, k=5, seed=8)
    opt = ss.SlotSGD(a.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(2, 3, 7, 7)
    for _ in range(3):
        opt.zero_grad()
        a(x).square().sum().backward()
        opt.step()
    sd = a.state_dict()
    assert not any(k.startswith("slot_") for k in sd)
    b = ss.SlotConv2d(3, 4, 3, bias=True, k=5, seed=99)  # the seed comes from the state dict
    b.load_state_dict(sd)
    assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError, match="k="):
        ss.SlotConv2d(3, 4, 3, bias=True, k=6).load_state_dict(sd)


def test_proxy_holds_no_storage_after_copy_and_move():
    layer = ss.SlotLinear(100, 100, k=4)
    assert layer.slot_weight.untyped_storage().nbytes() == 4
    moved = layer.to(torch.float32).to("cpu")
    assert moved.slot_weight.untyped_storage().nbytes() == 4
    clone = copy.deepcopy(layer)
    clone(torch.randn(1, 100))
    assert clone.slot_weight.untyped_storage().nbytes() == 4
    assert_same_selection(clone, layer)


def _bytes_per_conn(model, opt, conns):
    return ss.memory.state_bytes(model, opt) / conns


@pytest.mark.parametrize("sharing", ["none", "layer", "global"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_implicit_scores_start_as_the_fp32_scores_bit_for_bit(kind, sharing):
    fp32, _ = seeded_and_dense(kind, bias=True, k=5, seed=11, sharing=sharing, scores="fp32")
    implicit, _ = seeded_and_dense(kind, bias=True, k=5, seed=11, sharing=sharing, scores="implicit")
    assert_same_selection(implicit, fp32)  # indices and selected values of weight and bias
    for part in ("weight", "bias"):
        assert torch.equal(implicit.score_values(part), getattr(fp32, f"{part}_scores"))
        assert getattr(implicit, f"{part}_drift").shape == fp32.parts[part][0]  # one value per connection
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 4, 7, 7)
    assert torch.equal(implicit(x), fp32(x))
    assert not hasattr(implicit, "weight_scores")


def test_implicit_state_dict_carries_lambda_and_stays_fp32():
    torch.manual_seed(0)
    trained = ss.SlotLinear(30, 20, k=4, seed=3, scores="implicit")  # paper's lambda 0.1
    opt = ss.SlotSGD(trained.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(8, 30)
    for _ in range(5):
        opt.zero_grad()
        trained(x).square().sum().backward()
        opt.step()
    other = ss.SlotLinear(30, 20, k=4, seed=9, scores="implicit", score_lambda=1.0)
    other.load_state_dict(trained.state_dict())  # seeds and lambda come with the state
    assert other.score_lambda == trained.score_lambda
    assert torch.equal(other.score_values(), trained.score_values())
    assert_same_candidates(other, trained)
    assert_same_selection(other, trained)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        layer = ss.SlotLinear(3, 2, scores="implicit")
    finally:
        torch.set_default_dtype(default)
    assert layer.weight_drift.dtype == layer.weight_scale.dtype == torch.float32


def test_implicit_sampling_draws_as_fp32_scores_and_eval_is_greedy():
    fp32, implicit = (ss.SlotLinear(30, 20, k=4, seed=3, selection="sample", scores=s, score_lambda=50.0)
                      for s in ("fp32", "implicit"))
    x = torch.randn(3, 30)
    draws = [implicit(x) for _ in range(3)]
    assert all(torch.equal(d, fp32(x)) for d in draws)  # same scores, same keyed Gumbel noise
    assert not torch.equal(draws[0], draws[1])  # a new draw at every training forward
    implicit.eval()
    assert torch.equal(implicit(x), x @ implicit.selected_weight().T)
    assert torch.equal(implicit.selected_index(), fp32.weight_scores.argmax(-1))


@pytest.mark.parametrize("k", [8, 64])
def test_implicit_state_per_connection_does_not_grow_with_k(k):
    model = torch.nn.Sequential(ss.SlotLinear(256, 128, k=k, scores="implicit"), torch.nn.ReLU(),
                                ss.SlotLinear(128, 10, k=k, scores="implicit"))
    conns = 256 * 128 + 128 * 10
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 256)).sum().backward()
    opt.step()
    const = 2 * (64 + 16 * k)  # per layer: scale, seeds' keys, draw counter, proxy
    assert 12 * conns <= ss.memory.state_bytes(model, opt) <= 12 * conns + const  # drift, G, momentum
    opt.zero_grad(set_to_none=True)
    assert ss.memory.state_bytes(model, opt) <= 8 * conns + const


@pytest.mark.parametrize("k", [8, 64])
def test_resident_state_per_connection(k):
    torch.manual_seed(0)
    model = torch.nn.Sequential(ss.SlotLinear(256, 128, k=k), torch.nn.ReLU(), ss.SlotLinear(128, 10, k=k))
    conns = 256 * 128 + 128 * 10
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 256)).sum().backward()
    opt.step()
    # K int8 scores + 4 (G) + 4 (momentum) per connection, plus per-layer constants (scale, seeds'
    # keys, draw counter, proxy storage): at most 64 + 12*k bytes a layer.
    const = 2 * (64 + 12 * k)
    assert ss.memory.state_bytes(model, opt) <= (k + 8) * conns + const
    opt.zero_grad(set_to_none=True)
    assert ss.memory.state_bytes(model, opt) <= (k + 4) * conns + const
    dense = torch.nn.Sequential(ss.DenseSlotLinear(256, 128, k=k), torch.nn.ReLU(), ss.DenseSlotLinear(128, 10, k=k))
    dopt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    dense(torch.randn(8, 256)).sum().backward()
    dopt.step()
    assert ss.memory.state_bytes(dense, dopt) >= 16 * k * conns


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-6, 1e6),
    scale=st.floats(1e-3, 1e20),
    momentum=st.sampled_from([0.0, 0.9]),
    steps=st.integers(1, 4),
)
def test_int8_scores_never_overflow(lr, scale, momentum, steps):
    layer = ss.SlotLinear(5, 4, bias=True, k=5, seed=1)
    opt = ss.SlotSGD(layer.parameters(), lr=lr, momentum=momentum)
    x = torch.randn(3, 5)
    for _ in range(steps):
        opt.zero_grad()
        (layer(x).sum() * scale).backward()
        opt.step()
    for part in ("weight", "bias"):
        q = getattr(layer, f"{part}_scores")
        assert q.dtype == torch.int8
        assert q.max() <= 127 and q.min() >= -128
        assert torch.isfinite(getattr(layer, f"{part}_scale"))


def test_recentring_keeps_selection():
    # A real SlotSGD step pushes levels past 127: the update kernel must shift all K levels of such
    # a connection down together (its top lands on 127; argmax is invariant to the shift), so the
    # selection is the argmax of the unclipped levels. Clipping alone would tie them at 127.
    layer = ss.SlotLinear(40, 30, k=8, seed=2)
    lr = 0.04  # moves a level by up to lr * |G| * sigma / scale = 50.8 levels: no coarsening
    q0, scale, w = layer.weight_scores.double(), layer.weight_scale.double(), layer.candidates().double()
    opt = ss.SlotSGD(layer.parameters(), lr=lr)
    (-layer(torch.ones(1, 40)).sum()).backward()  # G = -1 for every connection
    assert torch.equal(layer.slot_weight.grad, torch.full((30, 40), -1.0))
    opt.step()
    levels = q0 + lr * w / scale  # the new levels before stochastic rounding (which moves each by < 1)
    top2 = levels.topk(2, dim=-1).values
    pushed = top2[..., 0] >= 128.0  # a level went past 127
    clear = top2[..., 0] - top2[..., 1] >= 2.0  # a winner that rounding cannot change
    assert pushed.float().mean() > 0.5 and (pushed & clear).float().mean() > 0.3
    assert (layer.weight_scores.amax(-1)[pushed] == 127).all()
    chosen = layer.selected_index()
    assert torch.equal(chosen[pushed & clear], levels.argmax(-1)[pushed & clear])
    assert torch.equal(chosen[clear], levels.argmax(-1)[clear])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(k=0), "k"),
        (dict(k=2.0), "k"),
        (dict(k=True), "k"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(sharing="row"), "sharing"),
        (dict(selection="topk"), "selection"),
        (dict(scores="int4"), "scores"),
        (dict(score_lambda=-1.0), "score_lambda"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ss.SlotLinear(3, 2, **kwargs)
    if "scores" not in kwargs:
        with pytest.raises(ValueError, match=name):
            ss.DenseSlotConv2d(3, 2, 3, **kwargs)


def test_bad_arguments_list_accepted_values():
    with pytest.raises(ValueError, match="'none', 'layer', 'global'"):
        ss.SlotConv2d(3, 2, 3, sharing="all")
    with pytest.raises(ValueError, match="groups"):
        ss.SlotConv2d(3, 2, 3, groups=2)


def test_large_fan_in_sigma_is_small_but_exact():
    layer = ss.SlotLinear(4096, 4096, k=2)
    assert layer.sigma == pytest.approx(math.sqrt(6 / 8192), rel=1e-7)


@pytest.mark.parametrize("cls", [ss.SlotConv2d, ss.DenseSlotConv2d])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(padding="same", stride=2), "padding='same' needs stride 1"),
        (dict(padding="bogus"), "padding must be 'valid', 'same'"),
        (dict(padding=-1), "padding must be"),
        (dict(padding=(1, -1)), "padding must be"),
        (dict(stride=0), "stride must be"),
        (dict(dilation=0), "dilation must be"),
        (dict(kernel_size=0), "kernel_size must be"),
        (dict(kernel_size=(3, 0)), "kernel_size must be"),
        (dict(kernel_size=2.5), "kernel_size must be"),
        (dict(stride=(1, 2, 3)), "stride must be"),
    ],
)
def test_conv_refuses_bad_geometry_at_construction(cls, kwargs, message):
    # nn.Conv2d refuses some of these at construction, the others at its first forward
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        cls(2, 2, **kwargs)


def test_slot_config_is_the_keywords_validated_once():
    cfg = ss.SlotConfig(k=4, sharing="layer", selection="sample", scores="implicit", score_lambda=0.5, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 5
    x = torch.randn(2, 6)
    for cls, args in ((ss.SlotLinear, (6, 5)), (ss.SlotConv2d, (2, 3, 3))):
        a, b = cls(*args, bias=True, config=cfg), cls(*args, bias=True, k=4, sharing="layer", selection="sample",
                                                     scores="implicit", score_lambda=0.5, seed=3)
        assert a.storage is b.storage is storages.STORAGES["implicit"] and a.scores == "implicit"
        assert repr(a) == repr(b) and "scores='implicit'" in repr(a)
        inp = x if cls is ss.SlotLinear else torch.randn(2, 2, 5, 5)
        assert torch.equal(a(inp), b(inp))
        with pytest.raises(ValueError, match="config or as keywords, not both"):
            cls(*args, config=cfg, k=2)
    dense = ss.DenseSlotLinear(6, 5, config=cfg)  # scores does not apply
    assert (dense.k, dense.seed, dense.sharing, dense.score_lambda) == (4, 3, "layer", 0.5)
    assert "scores" not in repr(dense) and "scores='int8'" in repr(ss.SlotLinear(2, 2))
    m1 = ss.slotify_(torch.nn.Sequential(torch.nn.Linear(6, 5)), cfg)
    m2 = ss.slotify_(torch.nn.Sequential(torch.nn.Linear(6, 5)), k=4, sharing="layer", selection="sample",
                     scores="implicit", score_lambda=0.5, seed=3)
    assert repr(m1) == repr(m2) and torch.equal(m1(x), m2(x))
    built = models.build("lenet", mode="seeded", config=cfg)
    assert built.build_args == models.build("lenet", mode="seeded", k=4, sharing="layer", selection="sample",
                                               scores="implicit", score_lambda=0.5, seed=3).build_args


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must be an int >= 1"), (dict(seed=-1), "seed must be an int >= 0"),
    (dict(sharing="row"), "sharing must be one of 'none', 'layer', 'global'"),
    (dict(selection="topk"), "selection must be one of"), (dict(scores="int4"), "scores must be one of"),
    (dict(score_lambda=float("nan")), "score_lambda must be a finite float > 0 or None"),
])
def test_slot_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ss.SlotConfig(**kwargs)


@pytest.mark.parametrize("mine, theirs", [("int8", "fp32"), ("fp32", "int8")])
def test_a_state_of_another_score_storage_is_refused_not_cast(mine, theirs):
    """Issue 24, item 5: int8 <- fp32 would cast the scores to zeros; fp32 <- int8 would keep the
    int8 scale (updates thousands of times too small)."""
    make = lambda scores: ss.slotify_(torch.nn.Sequential(torch.nn.Linear(5, 4)), k=4, seed=1, scores=scores)  # noqa: E731
    model, other = make(mine), make(theirs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="another score storage"):
        model.load_state_dict(other.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("reentrant", [False, True])
def test_sample_selection_under_activation_checkpointing_is_refused_greedy_is_exact(reentrant):
    """Issue 24, item 4: the recomputed forward would draw another sample (wrong gradients without
    a word); greedy recomputes the same selection, so its gradients are bit-equal."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(6, 5, requires_grad=True)
    for selection in ("greedy", "sample"):
        def make():
            return ss.slotify_(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)),
                               k=4, seed=2, selection=selection)

        plain, ckpt = make(), make()
        grads = []
        for model, use in ((plain, False), (ckpt, True)):
            model.train()
            out = checkpoint(model, x, use_reentrant=reentrant) if use else model(x)
            if selection == "sample" and use:
                with pytest.raises(RuntimeError, match="selection='sample' cannot be recomputed"):
                    out.sum().backward()
                break
            out.sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()] + [x.grad.clone()])
            x.grad = None
        if selection == "greedy":
            assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit", "dense"])
def test_channels_last_is_supported_and_leaves_the_model_usable(scores):
    """Issue 24, item 15: the memory format is for activations; the slot state keeps its layout."""
    kw = dict(dense=True) if scores == "dense" else dict(scores=scores)
    model = ss.slotify_(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)),
                        k=4, seed=1, **kw)
    x = torch.randn(2, 3, 9, 9)
    ref = model(x)
    model.to(memory_format=torch.channels_last)
    y = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref)
    assert all(b.is_contiguous() for b in model.buffers())
    y.sum().backward()
    (ss.SlotSGD if scores != "dense" else torch.optim.SGD)(model.parameters(), lr=0.1).step()
    model(x)  # and later forwards
