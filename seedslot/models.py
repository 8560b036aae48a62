"""The paper's networks: Lenet-300-100, CONV-2/4/6 and VGG-19, in three modes.

``build`` makes the ordinary torch model (no biases, as in the authors' code), Glorot-initialises
it (the "learned" baseline), and for the slot modes converts it with :func:`seedslot.slotify_`:
``"seeded"`` gives seedslot's layers, ``"dense"`` the paper's dense reference. Flattened sizes
follow from the input shape, so every model also runs on 1-channel 28x28 images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import UNSET, SlotConfig
from .convert import slotify_
from .layers import SlotLayer
from .rng import torch_seed
from .validate import check_choice, check_int

__all__ = ["MODELS", "IMAGENET_MODELS", "ALL_MODELS", "MODES", "build", "build_from_checkpoint", "check_build_args", "count_connections"]

MODELS = ("lenet", "conv2", "conv4", "conv6", "vgg19")
# torchvision's vgg19 / vgg19_bn layout (ImageNet: 224x224 inputs, 143.7 M connections), same state_dict names
IMAGENET_MODELS = ("vgg19-imagenet", "vgg19_bn-imagenet")
ALL_MODELS = MODELS + IMAGENET_MODELS
WIDTH_MODELS = ("vgg19", *IMAGENET_MODELS)  # the models a width multiplier applies to
MODES = ("seeded", "dense", "learned")

_INIT = 0x1417  # stream tag of the Glorot initialisation of learned weights

# (channels, padding) of the conv pairs, each pair followed by a 2x2 max pool
_CONV_PAIRS = {
    "conv2": [(64, 0)],
    "conv4": [(64, 0), (128, 0)],
    "conv6": [(64, 0), (128, 0), (256, 1)],
}
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


class Net(nn.Module):
    """``features`` (convolutions, may be empty), flatten, ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))  # (B, num_classes)


def _lenet(c: int, s: int, num_classes: int) -> Net:
    return Net(nn.Sequential(), nn.Sequential(
        nn.Linear(c * s * s, 300, bias=False), nn.ReLU(),
        nn.Linear(300, 100, bias=False), nn.ReLU(),
        nn.Linear(100, num_classes, bias=False),
    ))


def _conv(name: str, c: int, s: int, num_classes: int) -> Net:
    layers: list[nn.Module] = []
    for out, pad in _CONV_PAIRS[name]:
        for _ in range(2):
            layers += [nn.Conv2d(c, out, 3, padding=pad, bias=False), nn.ReLU()]
            c, s = out, s - 2 + 2 * pad
        layers.append(nn.MaxPool2d(2))
        s //= 2
        _check_size(name, s)
    return Net(nn.Sequential(*layers), nn.Sequential(
        nn.Dropout(0.5), nn.Linear(c * s * s, 256, bias=False), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(256, 256, bias=False), nn.ReLU(),
        nn.Linear(256, num_classes, bias=False),
    ))


def _channels(v: int, width: float) -> int:
    return max(1, round(v * width))


def _vgg19(c: int, s: int, num_classes: int, width: float = 1.0) -> Net:
    layers: list[nn.Module] = []
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            s //= 2
            _check_size("vgg19", s)
        else:
            v = _channels(v, width)
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v, affine=False), nn.ReLU()]
            c = v
    # The paper's 2x2 average pool (32x32 inputs arrive here at 2x2); smaller inputs arrive at 1x1.
    pool = min(2, s)
    layers.append(nn.AvgPool2d(pool))
    s //= pool
    return Net(nn.Sequential(*layers), nn.Sequential(nn.Linear(c * s * s, num_classes, bias=False)))


class VGG(nn.Module):
    """torchvision's VGG layout: ``features``, ``avgpool`` (adaptive, 7x7), flatten, ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _vgg19_imagenet(c: int, s: int, num_classes: int, batch_norm: bool, width: float = 1.0) -> VGG:
    """torchvision's ``vgg19`` / ``vgg19_bn`` (configuration E, biases, affine batch norm, dropout
    0.5, a 25088x4096 first classifier layer): the same modules at the same indices, so the same
    state_dict names. ``width`` scales every channel count and the classifier's 4096."""
    name = "vgg19_bn-imagenet" if batch_norm else "vgg19-imagenet"
    layers: list[nn.Module] = []
    for v in [*_VGG19, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            s //= 2
            _check_size(name, s)
        else:
            v = _channels(v, width)
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
    hidden = _channels(4096, width)
    return VGG(nn.Sequential(*layers), nn.Sequential(
        nn.Linear(c * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    ))


def _check_size(name: str, s: int) -> None:
    if s < 1:
        raise ValueError(f"input_size is too small for {name}: the feature map shrinks to nothing")


def build(
    name: str,
    *,
    mode: str,
    k: int = UNSET,
    seed: int = UNSET,
    sharing: str = UNSET,
    selection: str = UNSET,
    scores: str = UNSET,
    in_channels: int | None = None,
    num_classes: int = 10,
    input_size: int | None = None,
    score_lambda: float | None = UNSET,
    incremental: bool = UNSET,
    config: SlotConfig | dict | None = None,
    width: float = 1.0,
) -> nn.Module:
    """The model ``name`` in ``mode``; ``model.build_args`` holds every argument, the slot settings
    as ``config`` (:meth:`SlotConfig.to_dict`), so that ``build(**model.build_args)`` rebuilds it
    identically. The slot settings come as ``config`` (a :class:`~seedslot.SlotConfig` or its dict)
    or as the keywords ``k``, ``seed``, ``sharing``, ``selection``, ``scores``, ``score_lambda`` and
    ``incremental``, not both.

    ``in_channels``/``input_size`` default to the paper's dataset: 1x28x28 (MNIST) for lenet,
    3x32x32 (CIFAR-10) otherwise, 3x224x224 for the ImageNet layouts (``vgg19-imagenet``,
    ``vgg19_bn-imagenet``: torchvision's vgg19 / vgg19_bn, biases and all, so that their
    state_dict names are torchvision's). ``width`` multiplies the channel counts of the VGG-19s
    (and the ImageNet classifier's 4096): "larger" (or smaller) networks on the same data; it
    enters ``build_args`` only when it is not 1. ``k``, ``sharing``, ``selection`` and ``scores`` apply to the
    slot modes (``scores`` to "seeded" only); the learned mode draws its Glorot weights from
    ``seed``. ``score_lambda`` scales the score initialisation U(0, lambda*sigma); None is the
    paper's (1 for conv, 0.1 for linear layers; the authors' code uses 1 everywhere).
    """
    check_choice("name", name, ALL_MODELS)
    check_choice("mode", mode, MODES)
    width = check_width(name, width)
    # checked in every mode, so that build_args always mean something
    if isinstance(config, dict):
        config = SlotConfig.from_dict(config)
    config = SlotConfig.resolve(config, "build", k=k, seed=seed, sharing=sharing, selection=selection, scores=scores,
                                score_lambda=score_lambda, incremental=incremental)
    in_channels = check_int("in_channels", (1 if name == "lenet" else 3) if in_channels is None else in_channels, 1)
    input_size = check_int("input_size", _default_size(name) if input_size is None else input_size, 1)
    check_int("num_classes", num_classes, 1)
    args = dict(name=name, mode=mode, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                config=config.to_dict())
    if width != 1.0:
        args["width"] = width

    # torch's default layer init draws from the global RNG; building must not shift a run's dropout.
    with torch.random.fork_rng(devices=[]):
        model = _architecture(name, in_channels, input_size, num_classes, width)

    if mode == "learned":
        g = torch.Generator().manual_seed(torch_seed(config.seed, _INIT))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight, generator=g)
                    if m.bias is not None:  # the ImageNet layouts: zero, as torchvision initialises them
                        nn.init.zeros_(m.bias)
    else:
        slotify_(model, config, dense=mode == "dense")
    model.build_args = args
    return model


def _architecture(name: str, c: int, s: int, num_classes: int, width: float = 1.0) -> nn.Module:
    if name == "lenet":
        return _lenet(c, s, num_classes)
    if name == "vgg19":
        return _vgg19(c, s, num_classes, width)
    if name in IMAGENET_MODELS:
        return _vgg19_imagenet(c, s, num_classes, name == "vgg19_bn-imagenet", width)
    return _conv(name, c, s, num_classes)


def _default_size(name: str) -> int:
    return 28 if name == "lenet" else 224 if name in IMAGENET_MODELS else 32


def check_width(name: str, width) -> float:
    """``width`` as a float: a finite number in (0, 64], and 1 for models without a width knob."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (math.isfinite(width) and 0 < width <= 64):
        raise ValueError(f"width must be a finite number in (0, 64]; got {width!r}")
    if width != 1 and name not in WIDTH_MODELS:
        raise ValueError(f"width applies to {', '.join(WIDTH_MODELS)}; got width={width!r} for {name!r}")
    return float(width)


_MAX_LAYER = 2**31 - 1  # connections of one layer, as slot layers allow
_SLOT_KEYS = tuple(SlotConfig.__dataclass_fields__)  # flat in build_args written before ``config``
_BUILD_KEYS = ("name", "mode", "in_channels", "num_classes", "input_size", "config", "width", *_SLOT_KEYS)


def check_build_args(args, source: str, *, available_bytes: int, export: bool = False) -> dict:
    """``args`` (a file's ``build_args``) checked without building anything; CheckpointError naming
    the first bad field otherwise. Besides types, names and ranges, the model must fit the file:
    no layer above 2**31 - 1 connections, and the connections times the bytes each takes in the
    file (a checkpoint's model state: K int8 or fp32 scores, a drift, K scores and candidates, or
    a weight; an export: ceil(log2 K) bits) at most ``available_bytes``, what the file holds."""
    from .checkpoints import CheckpointError

    def bad(field: str, accepted: str):
        if field in _SLOT_KEYS and isinstance(args.get("config"), dict):  # a slot setting, inside config
            field, value = f"config.{field}", args["config"].get(field, "(missing)")
        else:
            value = args.get(field, "(missing)")
        return CheckpointError(f"{source}: tampered: build_args.{field} must be {accepted}; got {value!r:.80}")

    if not isinstance(args, dict):
        raise CheckpointError(f"{source}: tampered: build_args must be a dict; got {type(args).__name__}")
    for key in args:
        if key not in _BUILD_KEYS:
            raise CheckpointError(f"{source}: tampered: build_args has an unknown field {key!r:.80}; "
                                  f"accepted: {', '.join(_BUILD_KEYS)}")
    for field, accepted in (("name", ALL_MODELS), ("mode", MODES)):
        if args.get(field) not in accepted:
            raise bad(field, f"one of {', '.join(map(repr, accepted))}")
    for field in ("in_channels", "input_size", "num_classes"):
        v = args.get(field, 1)
        if v is None and field in ("in_channels", "input_size"):  # the dataset's default
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_LAYER:
            raise bad(field, f"an int in [1, {_MAX_LAYER}]")
    flat = {key: args[key] for key in _SLOT_KEYS if key in args}
    if flat and "config" in args:
        raise CheckpointError(f"{source}: tampered: build_args has both config and {', '.join(flat)}")
    try:
        config = SlotConfig.from_dict(args.get("config", flat))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: tampered: build_args.config: {str(e):.200}") from None
    if config.k > _MAX_LAYER or config.seed >= 2**64:
        raise bad("config", f"k <= {_MAX_LAYER} and seed < 2**64")
    name = args["name"]
    try:
        width = check_width(name, args.get("width", 1.0))
    except ValueError as e:
        raise bad("width", f"a finite number in (0, 64], and 1 for models other than {', '.join(WIDTH_MODELS)}") from e
    c = args.get("in_channels") or (1 if name == "lenet" else 3)
    size = args.get("input_size") or _default_size(name)
    if c * size * size > _MAX_LAYER:
        raise bad("input_size", f"such that in_channels * input_size**2 <= {_MAX_LAYER}")
    try:
        with torch.device("meta"):
            plain = _architecture(name, c, size, args.get("num_classes", 10), width)
    except ValueError as e:
        raise bad("input_size", f"large enough for {name} ({e})") from None
    layers = [m.weight.numel() for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if max(layers) > _MAX_LAYER:
        raise bad("input_size" if name == "lenet" else "num_classes", f"such that no layer exceeds {_MAX_LAYER} connections")
    k, mode, scores = config.k, args["mode"], config.scores
    if export:  # export.index_bits, and at least one bit: a file of K = 1 cannot announce a network for nothing
        bits = max((k - 1).bit_length(), 1)
    else:
        bits = {"learned": 32, "dense": 64 * k}.get(mode) or {"int8": 8 * k, "fp32": 32 * k, "implicit": 32}[scores]
    if sum(layers) * bits > 8 * available_bytes:
        raise CheckpointError(
            f"{source}: tampered: build_args (k={k}, input_size={size}, ...) describe {sum(layers)} connections of "
            f"{bits / 8:g} bytes each; the file holds {available_bytes} bytes"
        )
    if not export and mode == "seeded" and scores == "implicit" and k > sum(layers):
        # the file holds one drift per connection and nothing per candidate; building K candidates costs
        # memory and time in K, so K is bounded by what the file does hold
        raise bad("k", f"at most the model's {sum(layers)} connections for scores 'implicit'")
    return args


def held_bytes(values) -> int:
    """The bytes the storages of the tensors among ``values`` really hold, each storage once: a
    stride-0 view (``zeros(1).expand(2**55)``) counts its one element, not its shape's."""
    storages = {}
    for t in values:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[(s.data_ptr(), s.device)] = s.nbytes()
    return sum(storages.values())


def build_from_checkpoint(payload: dict, source: str) -> nn.Module:
    """The model a training checkpoint's ``build_args`` describe, checked first against what the
    file holds (:func:`check_build_args`) and against the random stream version its seeds were
    written for; its state is loaded separately. CheckpointError for a
    payload that is not a training checkpoint or whose ``build_args`` cannot be built."""
    from .checkpoints import CheckpointError, check_stream_version

    if "model" not in payload or "build_args" not in payload:
        raise CheckpointError(f"{source}: not a seedslot training checkpoint (no model or build_args)")
    check_stream_version(payload.get("stream_version", 1), source)  # checkpoints from before the field: version 1
    if not isinstance(payload["model"], dict):
        raise CheckpointError(f"{source}: tampered: model must be a state_dict; got {type(payload['model']).__name__}")
    check_build_args(payload["build_args"], source, available_bytes=held_bytes(payload["model"].values()))
    try:
        return build(**payload["build_args"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: build_args {payload['build_args']} cannot be built: {e}") from None


def count_connections(model: nn.Module) -> int:
    """Weights (connections) of the slot, Linear and Conv2d layers: the same count in every mode."""
    n = 0
    for m in model.modules():
        if isinstance(m, SlotLayer):
            n += sum(math.prod(shape) for shape, _ in m.parts.values())
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            n += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return n
