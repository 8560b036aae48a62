"""slotify_ and to_dense: whole-model conversion in place, and back to an ordinary model."""

import pytest
import torch
from torch import nn

import seedslot as ss


def net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 6 * 6, 16, bias=True), nn.ReLU()), nn.Linear(16, 3, bias=False),
    )


def test_converts_every_linear_and_conv_in_place():
    model = net()
    out = ss.slotify_(model, k=4, seed=3)
    assert out is model
    assert isinstance(model[0], ss.SlotConv2d) and isinstance(model[3][0], ss.SlotLinear)
    assert isinstance(model[4], ss.SlotLinear) and "bias" in model[3][0].parts
    assert model[0].score_lambda == 1.0 and model[4].score_lambda == 0.1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_same_model_and_seed_same_network_and_names_give_distinct_seeds():
    a, b = ss.slotify_(net(), seed=5), ss.slotify_(net(), seed=5)
    for la, lb in zip(a.modules(), b.modules()):
        if isinstance(la, ss.SlotLinear | ss.SlotConv2d):
            assert la.seed == lb.seed and torch.equal(la.selected_weight(), lb.selected_weight())
    seeds = {m.seed for m in a.modules() if hasattr(m, "seed")}
    assert len(seeds) == 3
    c = ss.slotify_(net(), seed=6)
    assert not torch.equal(c[4].selected_weight(), a[4].selected_weight())


def test_global_sharing_uses_one_set_of_unit_draws():
    model = ss.slotify_(net(), k=5, seed=2, sharing="global")
    units = [m.candidates().reshape(-1, 5)[0] / m.sigma for m in model.modules() if isinstance(m, ss.SlotLinear | ss.SlotConv2d)]
    for u in units[1:]:
        torch.testing.assert_close(u, units[0], rtol=1e-6, atol=0)


def test_filter_fn_dense_and_options():
    model = ss.slotify_(net(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear), dense=True, k=3, selection="sample")
    assert type(model[0]) is nn.Conv2d
    assert isinstance(model[4], ss.DenseSlotLinear) and model[4].k == 3 and model[4].selection == "sample"


def test_bad_input_leaves_model_untouched():
    model = net()
    with pytest.raises(ValueError, match="sharing"):
        ss.slotify_(model, sharing="rows")
    with pytest.raises(ValueError, match="k"):
        ss.slotify_(model, k=0)
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Linear


@pytest.mark.parametrize("dense", [False, True])
def test_to_dense_gives_identical_eval_outputs(dense):
    model = ss.slotify_(net(), k=4, seed=1, dense=dense).eval()
    plain = ss.to_dense(model)
    assert not any(isinstance(m, ss.layers.SlotLayer) for m in plain.modules())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), plain(x))
    assert isinstance(model[0], ss.layers.SlotLayer)  # the original is left as it was


@pytest.mark.parametrize("dense", [False, True])
def test_shared_modules_stay_shared(dense):
    lin, conv = nn.Linear(8, 8), nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Sequential(conv, conv))
    ss.slotify_(model, k=4, seed=1, dense=dense)
    assert isinstance(model[0], ss.layers.SlotLayer) and model[2] is model[0]
    assert isinstance(model[3][0], ss.layers.SlotLayer) and model[3][1] is model[3][0]
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()}) == (4 if dense else 4)
    plain = ss.to_dense(model.eval())
    assert type(plain[0]) is nn.Linear and plain[2] is plain[0]
    assert type(plain[3][0]) is nn.Conv2d and plain[3][1] is plain[3][0]
    x = torch.randn(3, 8)
    assert torch.equal(model[:3](x), plain[:3](x))


def test_slotify_api_semantics_are_explicit():
    """Issue 24, item 17: tied Parameters, dtypes, and a second slotify_ with another config."""
    import seedslot
    from torch import nn

    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    net = nn.Sequential(a, b)
    report = seedslot.slotify_(net, k=2, report=True)  # never untied silently: both stay learned, reported
    assert net[0] is a and net[1] is b and b.weight is a.weight
    assert {w.reason for w in report.learned if w.name.endswith("weight")} == {"tied"}
    with pytest.raises(ValueError, match="tied"):
        seedslot.slotify_(nn.Sequential(a, b), k=2, strict=True)
    assert type(a) is nn.Linear  # nothing was changed
    for dtype in (torch.float64, torch.bfloat16):
        model = seedslot.slotify_(nn.Sequential(nn.Linear(4, 3)).to(dtype), k=4)
        assert model(torch.randn(2, 4, dtype=dtype)).dtype == dtype
    model = seedslot.slotify_(nn.Sequential(nn.Linear(3, 3)), k=2)
    with pytest.raises(ValueError, match="already a slot layer with k=2"):
        seedslot.slotify_(model, k=4)
    seedslot.slotify_(model, k=2)  # the same config: nothing to do
    # a second pass (say after a first one with a filter_fn) keeps the slot layers and says so: their
    # proxies are not weights left learned, and strict has nothing to refuse
    model.append(nn.Linear(3, 2))
    report = seedslot.slotify_(model, k=2, strict=True, report=True)
    assert [(c.name, c.target) for c in report.kept] == [("0", "SlotLinear")]
    assert [c.name for c in report.converted] == ["1"] and report.learned == []
    assert report.seeded == (9 + 3) + (6 + 2) and report.seeded_share == 1.0 and "kept       0: already a SlotLinear" in str(report)


def test_a_keyword_next_to_a_config_is_refused_even_at_its_default():
    """Issue 24, item 17: ``SlotLinear(config=SlotConfig(k=4), k=8)`` used to ignore ``k=8`` (the default)."""
    import seedslot
    from seedslot.models import build

    config = seedslot.SlotConfig(k=4)
    every = ({"k": 8}, {"seed": 0}, {"scores": "int8"}, {"score_lambda": None}, {"incremental": False})
    makers = [(lambda **kw: seedslot.SlotLinear(3, 2, config=config, **kw), every),
              (lambda **kw: seedslot.slotify_(nn.Sequential(nn.Linear(3, 2)), config, **kw), every),
              (lambda **kw: build("lenet", mode="seeded", config=config, **kw), every),
              (lambda **kw: seedslot.SlotConv1d(3, 2, 3, config=config, **kw), ({"k": 8}, {"scores": "int8"})),
              (lambda **kw: seedslot.DenseSlotConv2d(3, 2, 3, config=config, **kw), ({"k": 8}, {"seed": 0}))]
    for make, keywords in makers:
        for kw in keywords:
            with pytest.raises(ValueError, match=f"not both; got config and {next(iter(kw))}"):
                make(**kw)
    assert seedslot.SlotLinear(3, 2, k=8).config.k == 8 and seedslot.SlotLinear(3, 2).config.k == 8
