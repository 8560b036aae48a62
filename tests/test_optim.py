"""SlotSGD: equivalence with torch.optim.SGD on the dense reference, schedulers, state, safety."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import seedslot as ss

CONV_CASES = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
]


def _pair(kind, sharing, bias, case=None, scores="fp32"):
    kw = dict(k=6, seed=7, sharing=sharing, bias=bias, score_lambda=1.0)
    if kind == "linear":
        return ss.SlotLinear(12, 8, scores=scores, **kw), ss.DenseSlotLinear(12, 8, **kw)
    return ss.SlotConv2d(4, 6, 3, scores=scores, **kw, **case), ss.DenseSlotConv2d(4, 6, 3, **kw, **case)


def _train_side_by_side(seeded, dense, x, target, steps, nesterov=False, momentum=0.9, wd=0.0):
    opt_s = ss.SlotSGD(seeded.parameters(), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for _ in range(steps):
        for model, opt in ((seeded, opt_s), (dense, opt_d)):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()


@pytest.mark.parametrize("scores", ["fp32", "implicit"])
@pytest.mark.parametrize("sharing", ["none", "layer", "global"])
@pytest.mark.parametrize("kind, case", [("linear", None)] + [("conv", c) for c in CONV_CASES])
def test_seeded_slotsgd_equals_dense_torch_sgd(kind, case, sharing, scores):
    torch.manual_seed(0)
    seeded, dense = _pair(kind, sharing, bias=True, case=case, scores=scores)
    x = torch.randn(16, 12) if kind == "linear" else torch.randn(4, 4, 9, 9)
    target = torch.randn_like(dense(x))
    _train_side_by_side(seeded, dense, x, target, steps=40)
    for part in ("weight", "bias"):
        assert torch.equal(seeded.selected_index(part), dense.selected_index(part))
        # Same updates up to fp32 rounding order (G*W_k momentum vs W_k * momentum of G; implicit:
        # s0 - W * sum of steps instead of a running sum of products).
        torch.testing.assert_close(
            seeded.score_values(part), getattr(dense, f"{part}_scores").detach(), rtol=1e-5, atol=1e-6
        )
    # The selection really moved: this is a test of training, not of initial state.
    init = type(seeded)(*(12, 8) if kind == "linear" else (4, 6, 3), bias=True, k=6, seed=7,
                        sharing=sharing, scores=scores, score_lambda=1.0, **(case or {}))
    assert not torch.equal(init.selected_index(), seeded.selected_index())


@pytest.mark.parametrize("scores", ["fp32", "implicit"])
@pytest.mark.parametrize("nesterov, momentum, wd", [(True, 0.9, 0.0), (False, 0.0, 0.1)])
def test_nesterov_and_weight_decay_without_momentum_match_torch(nesterov, momentum, wd, scores):
    torch.manual_seed(0)
    seeded, dense = _pair("linear", "none", bias=False, scores=scores)
    x = torch.randn(16, 12)
    target = torch.randn(16, 8)
    _train_side_by_side(seeded, dense, x, target, steps=30, nesterov=nesterov, momentum=momentum, wd=wd)
    torch.testing.assert_close(seeded.score_values(), dense.weight_scores.detach(), rtol=1e-5, atol=1e-6)


def test_implicit_weight_decay_with_momentum_equals_fp32_scores():
    """Decoupled decay with momentum (not torch's rule) is the same rule for both seeded kinds."""
    torch.manual_seed(0)
    x, target = torch.randn(16, 12), torch.randn(16, 8)
    fp32, implicit = (ss.SlotLinear(12, 8, k=6, seed=7, scores=s, score_lambda=1.0) for s in ("fp32", "implicit"))
    opts = [ss.SlotSGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.5) for m in (fp32, implicit)]
    for _ in range(30):
        for m, opt in zip((fp32, implicit), opts):
            opt.zero_grad()
            F.mse_loss(m(x), target).backward()
            opt.step()
    assert implicit.weight_scale.item() < 0.5  # the factor on s0 really shrank
    torch.testing.assert_close(implicit.score_values(), fp32.weight_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(implicit.selected_index(), fp32.selected_index())


def test_weight_decay_on_int8_scales_scores():
    layer = ss.SlotLinear(4, 3, k=4)
    before = layer.weight_scores.float() * layer.weight_scale
    opt = ss.SlotSGD(layer.parameters(), lr=0.1, weight_decay=0.5)
    layer.slot_weight.grad = torch.zeros(3, 4)
    opt.step()
    after = layer.weight_scores.float() * layer.weight_scale
    torch.testing.assert_close(after, before * 0.95)


def test_mixed_model_plain_params_get_exact_torch_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ss.slotify_(model, filter_fn=lambda m, fqn: fqn == "2")
    ref = copy.deepcopy(model[0])
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = torch.randn(8, 6)
    for _ in range(5):
        opt.zero_grad()
        ref_opt.zero_grad()
        model(x).sum().backward()
        model[0].weight.grad.clone()
        ref.weight.grad = model[0].weight.grad.clone()
        ref.bias.grad = model[0].bias.grad.clone()
        opt.step()
        ref_opt.step()
        assert torch.equal(model[0].weight, ref.weight) and torch.equal(model[0].bias, ref.bias)


def test_lr_scheduler_drives_the_update():
    layer = ss.SlotLinear(8, 4, k=4, scores="fp32")
    opt = ss.SlotSGD(layer.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    x = torch.randn(4, 8)
    layer(x).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = layer.weight_scores.clone()
    layer(x).sum().backward()
    opt.step()
    assert torch.equal(layer.weight_scores, before)


def _run(model, opt, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(x.shape[0]) % 3).backward()
        opt.step()


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    x = torch.randn(12, 10)
    a = nn.Sequential(ss.SlotLinear(10, 16, k=8, seed=1), nn.ReLU(), ss.SlotLinear(16, 3, k=8, seed=2))
    opt_a = ss.SlotSGD(a.parameters(), lr=0.5, momentum=0.9)
    _run(a, opt_a, x, 3)
    b = copy.deepcopy(a)
    opt_b = ss.SlotSGD(b.parameters(), lr=0.5, momentum=0.9)
    b(x)  # a forward pass registers the copied layers
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as after torch.save/load
    _run(a, opt_a, x, 4)
    _run(b, opt_b, x, 4)
    for la, lb in ((a[0], b[0]), (a[2], b[2])):
        assert torch.equal(la.weight_scores, lb.weight_scores)
        assert torch.equal(la.weight_scale, lb.weight_scale)


def test_int8_training_is_reproducible_bit_for_bit():
    def train():
        torch.manual_seed(0)
        model = nn.Sequential(ss.SlotLinear(10, 16, k=8, seed=1), nn.ReLU(), ss.SlotLinear(16, 3, k=8, seed=2))
        _run(model, ss.SlotSGD(model.parameters(), lr=0.5, momentum=0.9), torch.randn(12, 10), 6)
        return model[0].weight_scores.clone()

    assert torch.equal(train(), train())


def _bad_step(opt, check, match=None):
    """A step that must fail: from step() when eager, at the next read (check()) when deferred."""
    with pytest.raises(FloatingPointError, match=match):
        opt.step()
        assert check == "deferred"  # eager raised already
        opt.check()


@pytest.mark.parametrize("check", ss.optim.CHECKS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_changes_nothing(bad, check):
    model = nn.Sequential(nn.Linear(4, 4), ss.SlotLinear(4, 3, k=4))
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9, check=check)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # momentum state exists now
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(2, 4)).sum().backward()
    model[1].slot_weight.grad[0, 0] = bad
    _bad_step(opt, check, "non-finite gradient in parameter 2 of param group 0")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, momentum=-0.1), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, nesterov=True), "nesterov"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ss.SlotSGD(ss.SlotLinear(3, 2).parameters(), **kwargs)


def _synthetic(n=1200, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, classes, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, (x @ teacher).argmax(1)


def _accuracy(scores, steps=300):
    torch.manual_seed(0)
    x, y = _synthetic()
    model = nn.Sequential(ss.SlotLinear(20, 64, k=8, seed=1, scores=scores), nn.ReLU(),
                          ss.SlotLinear(64, 4, k=8, seed=2, scores=scores))
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        b = slice((i * 64) % 1000, (i * 64) % 1000 + 64)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    with torch.no_grad():
        return (model(x[1000:]).argmax(1) == y[1000:]).float().mean().item()


def test_int8_and_implicit_learn_as_well_as_fp32():
    fp32, int8, implicit = _accuracy("fp32"), _accuracy("int8"), _accuracy("implicit")
    assert fp32 > 0.8  # the problem is learnable by a slot MLP (chance is 0.25)
    assert int8 >= fp32 - 0.02
    assert implicit >= fp32 - 0.02


@pytest.mark.parametrize("lr, wd", [(3.0, 1.0), (1.0, 1.0), (50.0, 0.02), (50.0, 0.03)])
def test_decay_that_would_not_shrink_is_refused_at_construction(lr, wd):
    # The decay multiplies every score by 1 - lr * weight_decay; at or below 0 it is no decay at all
    # (int8 scales would turn negative or zero), so it is refused.
    with pytest.raises(ValueError, match="lr \\* weight_decay must be < 1"):
        ss.SlotSGD(ss.SlotLinear(16, 4, k=8, seed=1).parameters(), lr=lr, weight_decay=wd)


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_decay_that_would_not_shrink_is_refused_at_step_and_changes_nothing(scores):
    layer = ss.SlotLinear(16, 4, k=8, seed=1, scores=scores)
    opt = ss.SlotSGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 6.0)
    layer(torch.randn(8, 16)).sum().backward()
    opt.step()
    sched.step()  # lr 3: lr * weight_decay = 3
    before = copy.deepcopy(layer.state_dict())
    state = copy.deepcopy(opt.state_dict())
    layer(torch.randn(8, 16)).sum().backward()
    with pytest.raises(ValueError, match="lr \\* weight_decay must be < 1.*param group 0"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor))
    assert str(opt.state_dict()) == str(state)


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_strong_decay_keeps_int8_selection_equal_to_its_scores(scores):
    layer = ss.SlotLinear(16, 4, k=8, seed=1, scores=scores)
    opt = ss.SlotSGD(layer.parameters(), lr=3.0, weight_decay=0.33)  # shrink 0.01 each step
    for _ in range(200):  # without gradient signal the scale would underflow to 0
        opt.zero_grad()
        (layer(torch.randn(8, 16)).sum() * 0).backward()
        opt.step()
    assert scores != "int8" or float(layer.weight_scale) > 0
    assert torch.equal(layer.selected_index(), layer.score_values().argmax(-1))


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("check", ss.optim.CHECKS)
def test_update_beyond_fp32_range_raises_and_changes_nothing(scores, momentum, check):
    model = nn.Sequential(nn.Linear(4, 4), ss.SlotLinear(4, 3, k=4, scores=scores))
    opt = ss.SlotSGD(model.parameters(), lr=1e30, momentum=momentum, check=check)
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(2, 4)).sum().backward()
    model[1].slot_weight.grad.fill_(1e12)  # finite, but lr * grad is not an fp32 number
    _bad_step(opt, check, "update.*param group 0")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert not opt.state_dict()["state"]


@pytest.mark.parametrize("check", ss.optim.CHECKS)
def test_update_beyond_fp32_range_of_an_ordinary_parameter_raises(check):
    model = nn.Sequential(nn.Linear(4, 4), ss.SlotLinear(4, 3, k=4))
    opt = ss.SlotSGD(model.parameters(), lr=1e30, check=check)
    model(torch.randn(2, 4)).sum().backward()
    model[0].weight.grad.fill_(1e12)
    before = copy.deepcopy(model.state_dict())
    _bad_step(opt, check, "update of parameter 0 of param group 0")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------- deferred checks, multi-tensor form



def _model(layers, scores, k, seed=0):
    """A small MLP of ordinary and seeded linears: ``layers`` says which are seeded."""
    torch.manual_seed(seed)
    mods, width = [], 5
    for i, seeded in enumerate(layers):
        mods.append(ss.SlotLinear(width, 4, k=k, seed=i + 1, scores=scores, bias=i % 2 == 0) if seeded
                    else nn.Linear(width, 4))
        mods.append(nn.ReLU())
        width = 4
    return nn.Sequential(*mods)


def _train_mlp(model, steps, bad_at=None, **kw):
    """Train ``steps`` steps; a NaN gradient at step ``bad_at`` (its error caught where it is raised)."""
    opt = ss.SlotSGD(model.parameters(), lr=0.2, **kw)
    g = torch.Generator().manual_seed(3)
    for s in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 5, generator=g)).square().mean().backward()
        if s == bad_at:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        try:
            opt.step()
            if s == bad_at + 1 if bad_at is not None else False:
                opt.check()  # deferred: the bad step and this one were skipped; the error is raised here
        except FloatingPointError:
            assert s == bad_at or (s == bad_at + 1 and kw.get("check", "deferred") == "deferred")
    return model.state_dict(), opt.state_dict()


def _same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for key in ma:
        if isinstance(ma[key], torch.Tensor):
            assert ma[key].dtype == mb[key].dtype and torch.equal(ma[key], mb[key]), key
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, sa in oa["state"].items():
        sb = ob["state"][i]
        assert sa.keys() == sb.keys(), i
        for key in sa:
            assert torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(st.booleans(), min_size=1, max_size=4), scores=st.sampled_from(["int8", "fp32", "implicit"]),
       k=st.sampled_from([2, 3, 8]), momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(),
       wd=st.sampled_from([0.0, 0.05]))
def test_every_check_and_foreach_form_gives_the_same_bits(layers, scores, k, momentum, nesterov, wd):
    # eager per-parameter (today's step) is the reference; deferred checks and the multi-tensor
    # form (and the device-side weight decay they use) must give its bits exactly
    nesterov = nesterov and momentum > 0
    kw = dict(momentum=momentum, nesterov=nesterov, weight_decay=wd)
    ref = _train_mlp(_model(layers, scores, k), 3, check="eager", foreach=False, **kw)
    for check in ss.optim.CHECKS:
        for foreach in (False, True):
            _same(ref, _train_mlp(_model(layers, scores, k), 3, check=check, foreach=foreach, **kw))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_a_deferred_bad_step_skips_until_read_and_rolls_back(scores, foreach):
    # deferred: the bad step and the one after it change nothing on the device; check() raises and
    # rolls the host state back (step counts), so training goes on exactly as eager's
    # with its error read after step 3, deferred skipped steps 2 and 3: an eager run whose steps 2
    # and 3 both raised is the reference
    kw = dict(momentum=0.9, nesterov=True, weight_decay=0.01)
    eager = _run_bad_twice(scores, foreach, kw)
    deferred = _train_mlp(_model([True, False, True], scores, 4), 6, bad_at=2, check="deferred", foreach=foreach, **kw)
    _same(eager, deferred)


def _run_bad_twice(scores, foreach, kw):
    model = _model([True, False, True], scores, 4)
    opt = ss.SlotSGD(model.parameters(), lr=0.2, check="eager", foreach=foreach, **kw)
    g = torch.Generator().manual_seed(3)
    for s in range(6):
        opt.zero_grad()
        model(torch.randn(6, 5, generator=g)).square().mean().backward()
        if s in (2, 3):
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
            with pytest.raises(FloatingPointError):
                opt.step()
        else:
            opt.step()
    return model.state_dict(), opt.state_dict()


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_deferred_bad_first_step_leaves_no_state_and_state_dict_raises(scores):
    model = _model([True, True], scores, 4)
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(3, 5)).sum().backward()
    model[0].slot_weight.grad.fill_(math.inf)
    opt.step()  # no error yet: nothing was read
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    with pytest.raises(FloatingPointError, match="non-finite gradient in parameter 0 of param group 0"):
        opt.state_dict()
    assert not opt.state_dict()["state"]  # read: the momentum buffers and step counts are gone again
    opt.check()  # nothing pending any more


def test_deferred_check_reads_once_and_only_after_steps(monkeypatch):
    model = _model([True, False], "int8", 4)
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    opt.check()
    reads = []
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or bool(t.item()))
    opt.check()  # no step since the last read: no read
    assert not reads


def test_check_and_foreach_arguments_are_checked():
    params = ss.SlotLinear(4, 3, k=2).parameters()
    with pytest.raises(ValueError, match="check must be one of 'deferred', 'eager'; got 'later'"):
        ss.SlotSGD(params, lr=0.1, check="later")
    with pytest.raises(ValueError, match="foreach must be True or False"):
        ss.SlotSGD(ss.SlotLinear(4, 3, k=2).parameters(), lr=0.1, foreach=1)


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
@pytest.mark.parametrize("lr", [1e36, 1e37, 1e38, 3e38])
def test_a_huge_lr_never_stores_inf_and_an_error_changes_nothing(scores, lr):
    """Issue 24, item 7: each update fits fp32, the state after it must too."""
    torch.manual_seed(0)
    model = ss.slotify_(nn.Sequential(nn.Linear(4, 3)), k=4, scores=scores)
    opt = ss.SlotSGD(model.parameters(), lr=lr, momentum=0.0)
    for _ in range(40):
        model(torch.randn(5, 4)).sum().backward()
        before = copy.deepcopy(model.state_dict())
        try:
            opt.step()
        except FloatingPointError as e:
            assert "no score or weight was changed" in str(e)
            after = model.state_dict()
            assert all(torch.equal(v, after[k]) for k, v in before.items() if isinstance(v, torch.Tensor))
            break
        finally:
            opt.zero_grad()
        state = [v for v in model.state_dict().values() if isinstance(v, torch.Tensor)]
        assert all(bool(torch.isfinite(v.float()).all()) for v in state)


def _optimizer_ops(plain_layers: int, momentum: float, wd: float) -> int:
    """ATen operators (views aside) one steady-state SlotSGD.step dispatches for a seeded layer
    followed by ``plain_layers`` ordinary linears."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(ss.SlotLinear(5, 4, k=2, seed=1, scores="implicit"), *(nn.Linear(4, 4) for _ in range(plain_layers)))
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=wd)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 5)).sum().backward()
        with Ops() as ops:
            opt.step()
    return ops.count


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.01)])
def test_optimizer_ops_per_step_do_not_grow_with_ordinary_layers(momentum, wd):
    # deferred checks and the multi-tensor form: the gradients, ordinary parameters and momentum
    # buffers of any number of layers take the same operators (each seeded part adds its update)
    assert _optimizer_ops(1, momentum, wd) == _optimizer_ops(4, momentum, wd)


def test_deferred_checks_give_eager_bits_in_float64():
    # the momentum factor is a tensor on the deferred path: in fp64 it must hold the double itself
    def run(check):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, check=check)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 5, generator=g, dtype=torch.float64)).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run("eager"), run("deferred")))
