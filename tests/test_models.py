"""The paper's architectures in the three modes: shapes, layer placement, equivalences, bad input."""

import json

import pytest
import seedslot
import seedslot.layers
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

from seedslot import DenseSlotConv2d, DenseSlotLinear, SlotConv2d, SlotLinear
from seedslot.layers import SlotLayer
from seedslot.models import MODELS, MODES, build, count_connections

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_learned_output_shape(name, shape):
    c, s = shape
    model = build(name, mode="learned", in_channels=c, input_size=s).eval()
    with torch.no_grad():
        assert model(torch.randn(2, c, s, s)).shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet", "conv2", "conv4", "conv6"])
@pytest.mark.parametrize("mode", ["seeded", "dense"])
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_slot_output_shape(name, mode, shape):
    c, s = shape
    model = build(name, mode=mode, k=2, in_channels=c, input_size=s).eval()
    with torch.no_grad():
        assert model(torch.randn(2, c, s, s)).shape == (2, 10)


@pytest.mark.slow
def test_seeded_vgg19_at_k1():
    model = build("vgg19", mode="seeded", k=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        mnist = build("vgg19", mode="seeded", k=1, in_channels=1, input_size=28).eval()
        assert mnist(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert count_connections(model) == count_connections(build("vgg19", mode="learned"))
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 16 and all(not b.affine for b in bns)


@pytest.mark.parametrize("name, flat", [("conv2", 12544), ("conv4", 3200), ("conv6", 1024)])
@pytest.mark.parametrize("mode", MODES)
def test_paper_flattened_sizes_on_cifar_shape(name, flat, mode):
    model = build(name, mode=mode, k=1)
    assert model.build_args["in_channels"] == 3 and model.build_args["input_size"] == 32
    first_fc = next(m for m in model.classifier if not isinstance(m, (nn.Dropout, nn.ReLU)))
    assert first_fc.in_features == flat
    # dropout 0.5 before each of the first two FC layers, none before the last; no batchnorm
    kinds = [type(m).__name__ for m in model.classifier]
    fc = [i for i, m in enumerate(model.classifier) if hasattr(m, "in_features")]
    assert len(fc) == 3 and [kinds[i - 1] for i in fc] == ["Dropout", "Dropout", "ReLU"]
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_layer_placement_follows_the_paper():
    lenet = build("lenet", mode="learned")
    assert [m.out_features for m in lenet.modules() if isinstance(m, nn.Linear)] == [300, 100, 10]
    conv2 = build("conv2", mode="learned")
    kinds = [type(m).__name__ for m in conv2.classifier]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    vgg = build("vgg19", mode="learned")
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in vgg.features if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 16 == len(bns) and all(not b.affine for b in bns)
    assert all(c.padding == (1, 1) for c in convs)
    assert isinstance(vgg.features[-1], nn.AvgPool2d) and vgg.classifier[0].in_features == 512
    for name in MODELS:  # no biases anywhere, as in the authors' code
        layers = [m for m in build(name, mode="learned").modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers and all(m.bias is None for m in layers)


@pytest.mark.parametrize("name", ["lenet", "conv2", "conv4", "conv6"])
def test_modes_use_the_right_layers_and_count_the_same_connections(name):
    seeded, dense, learned = (build(name, mode=m, k=2) for m in MODES)
    assert all(isinstance(m, (SlotLinear, SlotConv2d)) for m in seeded.modules() if "Slot" in type(m).__name__)
    assert any(isinstance(m, (DenseSlotLinear, DenseSlotConv2d)) for m in dense.modules())
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in seeded.modules())
    for model in (seeded, dense):  # no bias part: as the learned model, no biases
        assert all(list(m.parts) == ["weight"] for m in model.modules() if isinstance(m, SlotLayer))
    assert count_connections(seeded) == count_connections(dense) == count_connections(learned)


@pytest.mark.parametrize("name", ["lenet", "conv2", "conv4", "conv6"])
def test_seeded_fp32_and_dense_give_identical_outputs(name):
    seeded = build(name, mode="seeded", k=4, seed=3, scores="fp32", in_channels=1, input_size=28).eval()
    dense = build(name, mode="dense", k=4, seed=3, in_channels=1, input_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(seeded(x), dense(x))


@pytest.mark.parametrize("mode", MODES)
def test_build_args_rebuild_identically(mode):
    a = build("conv4", mode=mode, k=3, seed=9, sharing="layer", in_channels=1, input_size=28)
    b = build(**a.build_args)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="resnet", mode="seeded"), "name must be one of 'lenet'"),
    (dict(name="lenet", mode="sparse"), "mode must be one of 'seeded', 'dense', 'learned'"),
    (dict(name="lenet", mode="seeded", k=0), "k must be an int >= 1"),
    (dict(name="lenet", mode="seeded", sharing="all"), "sharing must be one of"),
    (dict(name="lenet", mode="seeded", scores="int4"), "scores must be one of"),
    (dict(name="conv6", mode="seeded", input_size=8), "input_size is too small for conv6"),
    (dict(name="lenet", mode="seeded", seed=-1), "seed must be an int >= 0"),
    (dict(name="lenet", mode="dense", in_channels=0), "in_channels must be an int >= 1"),
    (dict(name="lenet", mode="learned", num_classes=True), "num_classes must be an int >= 1"),
    (dict(name="lenet", mode="learned", selection="best"), "selection must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        build(name, **kwargs)


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(["lenet", "conv2"]), mode=st.sampled_from(["seeded", "dense", "learned"]),
       k=st.integers(1, 9), seed=st.integers(0, 2**64 - 1), sharing=st.sampled_from(["none", "layer", "global"]),
       selection=st.sampled_from(["greedy", "sample"]), storage=st.sampled_from(["int8", "fp32", "implicit", "incremental"]),
       score_lambda=st.one_of(st.none(), st.floats(0.01, 4.0)))
def test_build_args_rebuild_every_model_identically(name, mode, k, seed, sharing, selection, storage, score_lambda):
    """``build(**m.build_args)`` gives the same model: same config on every layer, same state."""
    config = seedslot.SlotConfig(k=k, seed=seed, sharing=sharing, selection=selection,
                                 scores="implicit" if storage == "incremental" else storage,
                                 score_lambda=score_lambda, incremental=storage == "incremental")
    m = build(name, mode=mode, config=config, input_size=12 if name == "conv2" else None, num_classes=3)
    again = build(**json.loads(json.dumps(m.build_args)))  # build_args are JSON values
    assert again.build_args == m.build_args
    if mode != "learned":
        assert m.build_args["config"] == config.to_dict()
        layers = [(n, x) for n, x in m.named_modules() if isinstance(x, seedslot.layers.SlotLayer)]
        assert layers and all(x.config == dict(again.named_modules())[n].config for n, x in layers)
        assert all(x.config.replace(seed=0, score_lambda=None) == config.replace(seed=0, score_lambda=None)
                   for _, x in layers)
    a, b = m.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_incremental_reaches_every_door():
    """``incremental`` from layer keywords, slotify_, build, TrainConfig and the CLI's flag."""
    from seedslot.app.cli import _parser
    from seedslot.app.train import TrainConfig

    assert seedslot.SlotLinear(3, 2, scores="implicit", incremental=True).config.incremental
    net = seedslot.slotify_(torch.nn.Sequential(torch.nn.Linear(3, 2)), scores="implicit", incremental=True)
    assert net[0].config.incremental and "incremental=True" in repr(net[0])
    m = build("lenet", mode="seeded", scores="implicit", incremental=True)
    assert m.build_args["config"]["incremental"]
    assert all(x.config.incremental for x in build(**m.build_args).modules() if isinstance(x, seedslot.SlotLinear))
    assert TrainConfig(scores="implicit", incremental=True).slot_config().incremental
    args = _parser().parse_args(["train", "--scores", "implicit", "--incremental"])
    assert args.incremental is True
    with pytest.raises(ValueError, match="incremental"):
        seedslot.SlotLinear(3, 2, scores="int8", incremental=True)


def test_slot_config_dict_round_trip_and_errors():
    c = seedslot.SlotConfig(k=3, seed=2**64 + 5, scores="implicit", incremental=True, score_lambda=0.5)
    assert seedslot.SlotConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown slot setting 'kk'"):
        seedslot.SlotConfig.from_dict({"kk": 3})
    with pytest.raises(ValueError, match="k must be"):
        seedslot.SlotConfig.from_dict({"k": 0})


# ---------------------------------------------------------------- the ImageNet layout and the width knob

# torchvision's vgg19 / vgg19_bn: conv (and batch-norm) indices in ``features``, parameter counts.
_TV_CONVS = {"vgg19-imagenet": [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34],
             "vgg19_bn-imagenet": [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49]}
_TV_PARAMS = {"vgg19-imagenet": 143_667_240, "vgg19_bn-imagenet": 143_678_248}


@pytest.mark.parametrize("name", ["vgg19-imagenet", "vgg19_bn-imagenet"])
def test_imagenet_vgg19_has_torchvisions_names_and_size(name):
    from seedslot import models

    with torch.device("meta"):
        plain = models._architecture(name, 3, 224, 1000)
    keys = []
    for i in _TV_CONVS[name]:
        keys += [f"features.{i}.weight", f"features.{i}.bias"]
        if name == "vgg19_bn-imagenet":
            keys += [f"features.{i + 1}.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                      "num_batches_tracked")]
    keys += [f"classifier.{i}.{s}" for i in (0, 3, 6) for s in ("weight", "bias")]
    assert list(plain.state_dict()) == keys
    assert sum(p.numel() for p in plain.parameters()) == _TV_PARAMS[name]
    assert plain.classifier[0].weight.shape == (4096, 25088)
    assert count_connections(plain) == 143_667_240  # 143.7 M: Linear and Conv2d weights and biases
    with pytest.raises(ValueError, match="too small"):
        models._architecture(name, 3, 16, 10)  # five 2x2 max pools need 32 pixels


@pytest.mark.parametrize("name", ["vgg19-imagenet", "vgg19_bn-imagenet"])
def test_imagenet_vgg19_slotified_keys_equal_a_users_slotified_model(name):
    from seedslot import models
    from seedslot.convert import slotify_

    zoo = build(name, mode="seeded", k=2, width=1 / 16, input_size=32, seed=4)
    assert zoo.build_args["input_size"] == 32 and zoo.build_args["width"] == 1 / 16
    with torch.no_grad():
        assert zoo.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    own = models._architecture(name, 3, 32, 10, 1 / 16)  # "the user's torchvision model"
    slotify_(own, k=2, seed=4)
    assert list(own.state_dict()) == list(zoo.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), zoo.state_dict().values()))
    assert build(name, mode="learned", width=1 / 16, input_size=32).build_args["input_size"] == 32
    assert build(name, mode="learned", width=1 / 16).build_args["input_size"] == 224  # ImageNet by default


def test_width_multiplier_of_the_cifar_vgg19():
    wide = build("vgg19", mode="learned", width=1.5)
    convs = [m for m in wide.features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs][:3] == [96, 96, 192] and wide.classifier[0].in_features == 768
    assert wide.build_args["width"] == 1.5
    assert "width" not in build("vgg19", mode="learned").build_args  # unchanged build_args at width 1
    assert count_connections(build("vgg19", mode="learned", width=0.5)) < count_connections(build("vgg19", mode="learned")) / 3
    with pytest.raises(ValueError, match="width"):
        build("conv4", mode="learned", width=2)
    with pytest.raises(ValueError, match="width"):
        build("vgg19", mode="learned", width=0)
    from seedslot.checkpoints import CheckpointError
    from seedslot.models import check_build_args

    args = dict(build("vgg19", mode="learned", width=0.25).build_args)
    assert check_build_args(args, "f", available_bytes=10**9) == args
    with pytest.raises(CheckpointError, match="build_args.width"):
        check_build_args({**args, "name": "lenet"}, "f", available_bytes=10**9)
