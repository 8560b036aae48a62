"""Compact export: a trained slot model as its seeds plus ceil(log2 K) bits per connection.

An export file uses the checkpoint framing (magic, format version, length, SHA-256; see
:mod:`seedslot.checkpoints`) around a tensor-only body, so loading it never unpickles anything::

    JSON length (u32) | JSON header (utf-8) | packed indices and raw tensors

The JSON header holds the model's ``build_args`` (or null), the random stream version its seeds
regenerate (``stream_version``; absent in older files, which are version 1), one entry per slot layer (kind,
shapes, convolution settings, K, sharing, seeds, sigma, where its packed indices lie) and a table
of the other tensors (batch-norm statistics, parameters of layers that were not slotified).
Each part (weight, bias) of a slot layer stores the eval-mode (greedy) candidate index of every
connection in row-major order, ``bits = ceil(log2 K)`` bits each, least significant bit first.
:func:`load_exported` regenerates the selected values from the seeds and returns an ordinary
model, like :func:`seedslot.to_dense`, whose eval outputs equal the exported model's exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import types
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .candidates import (SHARING, Stream, CandidateKeys, candidate_values, glorot_sigma, grid_step, i32, selected_values,
                         stream_keys)
from .checkpoints import (CHECKPOINT_MAGIC, CheckpointError, check_stream_version, frame, load_state_into, read_bytes,
                          unframe)
from .convert import to_dense
from .files import atomic_write
from .attention import SlotMultiheadAttention
from .layers import (PADDING_MODES, DenseSlotConv1d, DenseSlotConv2d, DenseSlotConv3d, DenseSlotConvTranspose1d,
                     DenseSlotConvTranspose2d, DenseSlotConvTranspose3d, DenseSlotEmbedding, DenseSlotLinear, SlotConv1d,
                     SlotConv2d, SlotConv3d, SlotConvTranspose1d, SlotConvTranspose2d, SlotConvTranspose3d,
                     SlotEmbedding, SlotLayer, SlotLinear)
from .rng import STREAM_VERSION, key32

__all__ = ["export", "load_exported", "size_report", "exported_layers", "ExportedLayer"]

EXPORT_MAGIC = b"SEEDEXPT"
EXPORT_VERSION = 1

_JSON_LEN = struct.Struct("<I")
# "attention_<name>": the slot layer ``<name>`` of a SlotMultiheadAttention, whose weight becomes the
# ``<name>_weight`` of the nn.MultiheadAttention that holds it, and its bias in_proj_bias ("in_proj")
# or the third of in_proj_bias at _BIAS_THIRD[name] (the separate "q_proj", "k_proj", "v_proj").
_ATTENTION_KINDS = ("in_proj", "q_proj", "k_proj", "v_proj")
_BIAS_THIRD = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_KINDS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "embedding": nn.Embedding,
          "conv_transpose1d": nn.ConvTranspose1d, "conv_transpose2d": nn.ConvTranspose2d,
          "conv_transpose3d": nn.ConvTranspose3d, **{f"attention_{name}": nn.MultiheadAttention
                                                     for name in _ATTENTION_KINDS}}
_CONV_TYPES = (SlotConv1d, SlotConv2d, SlotConv3d, DenseSlotConv1d, DenseSlotConv2d, DenseSlotConv3d)
_CONV_TRANSPOSE_TYPES = (SlotConvTranspose1d, SlotConvTranspose2d, SlotConvTranspose3d, DenseSlotConvTranspose1d,
                         DenseSlotConvTranspose2d, DenseSlotConvTranspose3d)
_PACK_CHUNK = 1 << 20  # indices packed per step: a multiple of 8, so every step ends on a byte
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool)
}


def index_bits(k: int) -> int:
    """Bits needed for one index among ``k`` candidates: ceil(log2 k), 0 for k = 1."""
    return (k - 1).bit_length()


# ---------------------------------------------------------------- bit packing


def _pack(idx: torch.Tensor, bits: int) -> bytes:
    """Indices (any shape, values < 2**bits) packed ``bits`` each, least significant bit first."""
    if bits == 0:
        return b""
    flat = idx.reshape(-1).to(torch.int64).cpu().numpy()
    shifts = np.arange(bits, dtype=np.int64)
    out = []
    for a in range(0, flat.shape[0], _PACK_CHUNK):
        bit_matrix = ((flat[a : a + _PACK_CHUNK, None] >> shifts) & 1).astype(np.uint8)  # (n, bits)
        out.append(np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def _unpack(buf: bytes, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: (n,) int64."""
    if bits == 0:
        return torch.zeros(n, dtype=torch.int64)
    raw = np.frombuffer(buf, dtype=np.uint8)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for a in range(0, n, _PACK_CHUNK):
        m = min(_PACK_CHUNK, n - a)
        chunk = raw[a * bits // 8 : (a * bits + m * bits + 7) // 8]
        bit_matrix = np.unpackbits(chunk, count=m * bits, bitorder="little").reshape(m, bits)
        out[a : a + m] = bit_matrix.astype(np.int64) @ weights
    return torch.from_numpy(out)


# ---------------------------------------------------------------- encoding


def _layer_config(m: SlotLayer, in_attention: str | None) -> dict:
    """A slot layer's export entry, less its name and sections (``in_attention``: the child name it
    has in a SlotMultiheadAttention, such as "in_proj", or None)."""
    if in_attention:
        cfg: dict[str, Any] = {"kind": f"attention_{in_attention}"}
    elif isinstance(m, (SlotLinear, DenseSlotLinear)):
        cfg = {"kind": "linear"}
    elif isinstance(m, (SlotEmbedding, DenseSlotEmbedding)):
        cfg = {"kind": "embedding"}
    elif isinstance(m, _CONV_TYPES):
        padding = m.padding if isinstance(m.padding, str) else list(m.padding)
        cfg = {"kind": f"conv{len(m.kernel_size)}d", "stride": list(m.stride), "padding": padding,
               "dilation": list(m.dilation), "groups": m.groups}
        if m.padding_mode != "zeros":  # absent: zeros (files written before other modes were exported)
            cfg["padding_mode"] = m.padding_mode
    elif isinstance(m, _CONV_TRANSPOSE_TYPES):
        cfg = {"kind": f"conv_transpose{len(m.kernel_size)}d", "stride": list(m.stride), "padding": list(m.padding),
               "output_padding": list(m.output_padding), "dilation": list(m.dilation), "groups": m.groups}
    else:
        raise ValueError(f"cannot export slot layer of type {type(m).__name__}")
    cfg.update(weight_shape=list(m.weight_shape), bias="bias" in m.parts, k=m.k, seed=m.seed,
               candidate_seed=m.candidate_seed, sharing=m.sharing, sigma=m.sigma, bits=index_bits(m.k))
    return cfg


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def _encode(model: nn.Module, build_args: dict | None) -> list[bytes]:
    """The export file's content, in pieces."""
    if sys.byteorder != "little":
        raise RuntimeError("seedslot export files are little-endian; this machine is not")
    chunks: list[bytes] = []
    size = 0

    def add(data: bytes) -> list[int]:
        nonlocal size
        chunks.append(data)
        size += len(data)
        return [size - len(data), len(data)]

    layers = []
    slot_names = set()
    encoded: dict[int, dict] = {}  # a layer used in several places is stored once, named in each
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, SlotLayer):
            continue
        if not name:
            raise ValueError("export takes a model holding slot layers; wrap a lone layer in nn.Sequential")
        if id(m) not in encoded:
            parent, _, leaf = name.rpartition(".")
            in_attention = leaf in _ATTENTION_KINDS and isinstance(model.get_submodule(parent), SlotMultiheadAttention)
            cfg = _layer_config(m, leaf if in_attention else None)
            cfg["sections"] = {part: add(_pack(m.selected_index(part), cfg["bits"])) for part in m.parts}
            encoded[id(m)] = cfg
        cfg = {**encoded[id(m)], "name": name}
        layers.append(cfg)
        slot_names.add(name)

    tensors = []
    stored: dict[tuple, list[int]] = {}  # a tensor held under several names (tied weights) is stored once
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] in slot_names:
            continue  # scores, scales, seeds and counters: replaced by the packed indices
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot export {key!r}: only tensors can be stored, got {type(value).__name__}")
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"cannot export {key!r}: dtype {value.dtype} is not one of {', '.join(_DTYPES)}")
        same = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() == 0 or same not in stored:
            stored[same] = add(_tensor_bytes(value))
        tensors.append({"name": key, "dtype": dtype, "shape": list(value.shape), "section": stored[same]})

    header = {"build_args": build_args, "stream_version": STREAM_VERSION, "layers": layers, "tensors": tensors}
    try:
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"build_args must be JSON-serialisable: {e}") from e
    return frame(EXPORT_MAGIC, EXPORT_VERSION, [_JSON_LEN.pack(len(head)) + head, *chunks])


def export(model: nn.Module, path: str | os.PathLike, *, build_args: dict | None = None) -> int:
    """Write ``model``'s eval-mode selection to ``path`` atomically; returns the file's size.

    ``build_args`` (default: ``model.build_args`` if present) lets :func:`load_exported` rebuild
    the architecture by itself; without it, the loader needs a ``model`` of the same architecture.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    if build_args is None:
        build_args = getattr(model, "build_args", None)
    if build_args is not None and not isinstance(build_args, dict):
        raise ValueError(f"build_args must be a dict or None; got {type(build_args).__name__}")
    parts = _encode(model, build_args)
    atomic_write(path, parts)
    return sum(len(p) for p in parts)


def size_report(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s export next to the bytes of the same network's ordinary fp32 weights.

    ``fp32_bytes`` sums the tensors of ``to_dense(model).state_dict()`` (the selected weights as
    fp32 plus every other state tensor), without any file-format overhead.
    """
    dense_bytes = sum(t.numel() * t.element_size() for t in to_dense(model).state_dict().values()
                      if isinstance(t, torch.Tensor))
    parts = _encode(model, getattr(model, "build_args", None))
    return {"export_bytes": sum(len(p) for p in parts), "fp32_bytes": dense_bytes}


# ---------------------------------------------------------------- decoding


def _section(data: memoryview, section, source: str) -> memoryview:
    start, length = section
    if not (isinstance(start, int) and isinstance(length, int) and 0 <= start and 0 <= length
            and start + length <= len(data)):
        raise CheckpointError(f"{source}: tampered: section {section!r} lies outside the file")
    return data[start : start + length]


def _part_offset(cfg: dict, part: str) -> int:
    """The index of a part's first connection: the bias follows the weight."""
    return 0 if part == "weight" else math.prod(cfg["weight_shape"])


@torch.no_grad()
def _regenerate(cfg: dict, part: str, idx: torch.Tensor) -> torch.Tensor:
    """The values of candidates ``idx`` of one part, as a seeded layer regenerates them
    (``selected_values`` with the keys ``SlotLayer.candidate_keys`` holds)."""
    offset = _part_offset(cfg, part)
    per_conn = 1 if cfg["sharing"] == "none" else 0
    # Keys of the candidates in use only (candidate j's key does not depend on K): a file's K
    # costs nothing, its connections bound the work.
    used, idx = torch.unique(idx, return_inverse=True)
    key_a = i32(key32(cfg["candidate_seed"], Stream.CANDIDATES, 0))
    keys_b = torch.tensor([key32(cfg["candidate_seed"], Stream.CANDIDATES, 1, j) for j in used.tolist()], dtype=torch.int32)
    return selected_values(idx, offset, CandidateKeys(per_conn, key_a, keys_b, grid_step(cfg["sigma"])))


def _check_layer(cfg, source: str) -> None:
    """CheckpointError naming the first field of an exported layer entry outside its accepted range."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: tampered: a layer entry must be an object; got {type(cfg).__name__}")
    name = cfg.get("name")

    def bad(field: str, accepted: str):
        value = cfg.get(field, "(missing)")
        return CheckpointError(f"{source}: tampered: layer {name!r:.80} {field} must be {accepted}; got {value!r:.80}")

    def ints(value, n: int, lo: int, hi: int = 2**31 - 1) -> bool:
        return (isinstance(value, list) and len(value) == n
                and all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value))

    if not isinstance(name, str):
        raise bad("name", "a string")
    if cfg.get("kind") not in _KINDS:
        raise bad("kind", ", ".join(map(repr, _KINDS)))
    conv = cfg["kind"].startswith("conv")
    transpose = cfg["kind"].startswith("conv_transpose")
    dims = int(cfg["kind"][-2]) if conv else 0
    groups = cfg.get("groups")
    if conv and (isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups < 2**31):
        raise bad("groups", "an int >= 1")
    shape = cfg.get("weight_shape")
    if not ints(shape, dims + 2, 1) or math.prod(shape) + _bias_shape(cfg)[0] > 2**31 - 1:
        raise bad("weight_shape", f"{dims + 2} ints >= 1 with at most 2**31 - 1 connections")
    attention = cfg["kind"].removeprefix("attention_") if cfg["kind"].startswith("attention_") else None
    if attention and not name.endswith(f".{attention}"):
        raise bad("name", f"'<attention>.{attention}' for kind {cfg['kind']!r}")
    if attention in ("in_proj", "q_proj") and shape[0] != (3 if attention == "in_proj" else 1) * shape[1]:
        raise bad("weight_shape", "(3E, E)" if attention == "in_proj" else "(E, E)")
    if not isinstance(cfg.get("bias"), bool) or (cfg["kind"] == "embedding" and cfg["bias"]):
        raise bad("bias", "false for an embedding" if cfg["kind"] == "embedding" else "true or false")
    for field in ("k", "bits", "seed", "candidate_seed"):
        v = cfg.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or not (1 if field == "k" else 0) <= v < 2**63:
            raise bad(field, "an int in [0, 2**63)" if field != "k" else "an int in [1, 2**63)")
    if cfg["bits"] != index_bits(cfg["k"]):
        raise bad("bits", f"ceil(log2 k) = {index_bits(cfg['k'])}")
    if cfg.get("sharing") not in SHARING:
        raise bad("sharing", f"one of {', '.join(map(repr, SHARING))}")
    rf = math.prod(shape[2:])
    sigma = glorot_sigma(shape[1] * rf, shape[0] * rf)
    if cfg.get("sigma") != sigma:
        raise bad("sigma", f"the Glorot bound of its shape, {sigma!r}")
    if conv:
        for field in ("stride", "dilation"):
            if not ints(cfg.get(field), dims, 1):
                raise bad(field, f"{dims} ints >= 1")
        padding = cfg.get("padding")
        if (transpose or padding not in ("valid", "same")) and not ints(padding, dims, 0):
            raise bad("padding", f"{dims} ints >= 0" if transpose else f"'valid', 'same' or {dims} ints >= 0")
        if cfg.get("padding_mode", "zeros") not in (("zeros",) if transpose else PADDING_MODES):
            raise bad("padding_mode", ", ".join(map(repr, ("zeros",) if transpose else PADDING_MODES)))
        if transpose and not (ints(cfg.get("output_padding"), dims, 0) and all(
                o < max(s, d) for o, s, d in zip(cfg["output_padding"], cfg["stride"], cfg["dilation"]))):
            raise bad("output_padding", f"{dims} ints >= 0, each below its stride or dilation")
    if not isinstance(cfg.get("sections"), dict):
        raise bad("sections", "an object")


def _bias_shape(cfg: dict) -> list[int]:
    """The shape of an exported layer's bias: one per output (a transposed convolution's weight is
    (in, out / groups, ...))."""
    shape = cfg["weight_shape"]
    return [shape[1] * cfg["groups"]] if cfg["kind"].startswith("conv_transpose") else shape[:1]


def _target(cfg: dict) -> tuple[str, dict[str, str]]:
    """The qualified name of the plain module that holds an exported layer's weights, and the
    state_dict key of each part: a SlotMultiheadAttention's projection fills its nn.MultiheadAttention
    (a separate projection's bias only its third of in_proj_bias: :data:`_BIAS_THIRD`)."""
    if cfg["kind"].startswith("attention_"):
        owner, _, leaf = cfg["name"].rpartition(".")
        return owner, {"weight": f"{owner}.{leaf}_weight", "bias": f"{owner}.in_proj_bias"}
    return cfg["name"], {part: f"{cfg['name']}.{part}" for part in ("weight", "bias")}


def _fits(cfg: dict, target: nn.Module) -> str | None:
    """Why the plain module ``target`` cannot hold the exported layer ``cfg``, or None."""
    kind = _KINDS[cfg["kind"]]
    if not isinstance(target, kind) or type(target).forward is not kind.forward:  # subclasses as slotify_ takes them
        return f"expected {kind.__name__}, the model has {type(target).__name__}"
    if kind is nn.MultiheadAttention:
        leaf = cfg["kind"].removeprefix("attention_")
        if target._qkv_same_embed_dim != (leaf == "in_proj"):
            return ("a separate q/k/v projection exported, the model's attention has one in_proj_weight"
                    if target._qkv_same_embed_dim else
                    "an input projection exported, the model's attention has separate q/k/v projection weights")
        weight, bias = getattr(target, f"{leaf}_weight"), target.in_proj_bias is not None
    else:
        weight, bias = target.weight, getattr(target, "bias", None) is not None
    if list(weight.shape) != cfg["weight_shape"] or bias != cfg["bias"]:
        return (f"weight {cfg['weight_shape']} bias={cfg['bias']} exported, the model has "
                f"{list(weight.shape)} bias={bias}")
    if kind is nn.Embedding and target.max_norm is not None:
        return "an embedding exported, the model's renormalises (max_norm)"
    if cfg["kind"].startswith("conv"):
        mine = {"stride": list(target.stride), "dilation": list(target.dilation), "groups": target.groups,
                "padding": target.padding if isinstance(target.padding, str) else list(target.padding),
                "padding_mode": target.padding_mode}
        if cfg["kind"].startswith("conv_transpose"):
            mine["output_padding"] = list(target.output_padding)
        theirs = {key: cfg.get(key, "zeros") for key in mine}
        if mine != theirs:
            return f"convolution {theirs} exported, the model has {mine}"
    return None


def _skeleton(build_args: dict | None, model: nn.Module | None, source: str, available_bytes: int) -> nn.Module:
    """A plain module with the exported architecture (its weights are overwritten)."""
    if model is not None:
        return to_dense(model)
    from . import models  # only needed for exports that name their architecture

    models.check_build_args(build_args, source, available_bytes=available_bytes, export=True)
    try:  # the learned mode builds the same plain layers without any slot state
        return to_dense(models.build(**{**build_args, "mode": "learned"}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: does not fit the model: build_args {build_args} cannot be built: {e}") from e


def load_exported(path: str | os.PathLike, model: nn.Module | None = None, map_location=None) -> nn.Module:
    """The ordinary ``nn.Module`` (eval mode, plain Linear/Conv2d) stored in an export file, on
    ``map_location`` (a device; default the CPU): its weights are the same on every device.

    The architecture comes from the file's ``build_args`` through ``seedslot.models.build``, or
    from ``model`` (a plain or slot module of the same architecture; its own weights are ignored).
    Raises :class:`~seedslot.CheckpointError` for a truncated, corrupted, tampered, newer or
    foreign file, or one that does not fit the architecture.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module or None; got {type(model).__name__}")
    header, payload, source = _read(path)
    build_args = header["build_args"]
    if model is None and build_args is None:
        raise ValueError(f"{source} holds no build_args: pass model=, a module with the exported architecture")
    plain = _skeleton(build_args, model, source, len(payload))
    try:
        plain = _decode(header, payload, plain, source)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{source}: tampered: malformed export header ({type(e).__name__}: {e})") from e
    return plain if map_location is None else plain.to(map_location)


def _read(path: str | os.PathLike) -> tuple[dict, memoryview, str]:
    """An export file's header, its payload and its name for messages (CheckpointError for a file
    that is not an intact export of this stream version)."""
    source = os.fspath(path)
    data = read_bytes(path)
    if data.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(f"{source}: not a seedslot export: it is a training checkpoint (run `seedslot export`)")
    _, body = unframe(data, EXPORT_MAGIC, EXPORT_VERSION, "seedslot export", source)
    # The hash matched, so a header that does not parse was written that way on purpose.
    try:
        (head_len,) = _JSON_LEN.unpack_from(body)
        header = json.loads(bytes(body[_JSON_LEN.size : _JSON_LEN.size + head_len]))
        payload = body[_JSON_LEN.size + head_len :]
        header["build_args"], header["layers"], header["tensors"]  # noqa: B018 - present, or malformed
    except (KeyError, TypeError, ValueError, RecursionError, struct.error) as e:
        raise CheckpointError(f"{source}: tampered: malformed export header ({type(e).__name__}: {e})") from e
    check_stream_version(header.get("stream_version", 1), source)  # files from before the field: version 1
    return header, payload, source


def _indices(cfg: dict, payload: memoryview, source: str) -> dict[str, torch.Tensor]:
    """The stored candidate index of every connection of a checked layer entry, per part, in the
    part's shape (CheckpointError where the sections do not hold them)."""
    name = cfg["name"]
    shapes = {"weight": cfg["weight_shape"], "bias": _bias_shape(cfg)}
    if set(cfg["sections"]) != ({"weight", "bias"} if cfg["bias"] else {"weight"}):
        raise CheckpointError(f"{source}: tampered: layer {name!r} has parts {sorted(cfg['sections'])}")
    out = {}
    for part, section in cfg["sections"].items():
        n = math.prod(shapes[part])
        buf = _section(payload, section, source)
        if len(buf) != (n * cfg["bits"] + 7) // 8:  # bits == index_bits(k): _check_layer
            raise CheckpointError(f"{source}: tampered: layer {name!r} {part} has the wrong number of bytes")
        idx = _unpack(buf, n, cfg["bits"])
        if n and int(idx.max()) >= cfg["k"]:
            raise CheckpointError(f"{source}: tampered: layer {name!r} {part} selects a candidate >= K")
        out[part] = idx.view(shapes[part])
    return out


class ExportedLayer(NamedTuple):
    """A slot layer as an export file holds it (:func:`exported_layers`)."""

    name: str
    settings: dict  # seed, candidate_seed, k, sharing
    index: dict[str, torch.Tensor]  # part -> the stored selection, in the part's shape
    candidates: dict[str, torch.Tensor]  # part -> all K candidates regenerated from the seeds, (*shape, K)
    values: dict[str, torch.Tensor]  # part -> the selected weights load_exported makes, in the part's shape


@torch.no_grad()
def exported_layers(path: str | os.PathLike) -> list[ExportedLayer]:
    """Every slot layer of an export file, checked as :func:`load_exported` checks it, with what
    its seeds regenerate: what :mod:`seedslot.testing` compares with a model (no architecture needed)."""
    header, payload, source = _read(path)
    out = []
    for cfg in header["layers"]:
        _check_layer(cfg, source)
        index = _indices(cfg, payload, source)
        per_conn = 1 if cfg["sharing"] == "none" else 0
        key_a, keys_b = stream_keys(cfg["candidate_seed"], Stream.CANDIDATES, cfg["k"])
        keys = CandidateKeys(per_conn, i32(key_a), keys_b, grid_step(cfg["sigma"]))
        candidates = {part: candidate_values(idx.numel(), _part_offset(cfg, part), keys).view(*idx.shape, cfg["k"])
                      for part, idx in index.items()}
        out.append(ExportedLayer(cfg["name"], {f: cfg[f] for f in ("seed", "candidate_seed", "k", "sharing")}, index,
                                 candidates, {part: _regenerate(cfg, part, idx.reshape(-1)).view(idx.shape)
                                              for part, idx in index.items()}))
    return out


def _decode(header: dict, payload: memoryview, plain: nn.Module, source: str) -> nn.Module:
    """Fill ``plain`` with the regenerated selected weights and the stored tensors."""
    state: dict[str, torch.Tensor] = {}
    thirds: dict[str, dict[int, torch.Tensor]] = {}  # in_proj_bias key -> the separate projections' biases
    for cfg in header["layers"]:
        _check_layer(cfg, source)
        name = cfg["name"]
        owner, keys = _target(cfg)
        try:
            target = plain.get_submodule(owner)
        except AttributeError:
            raise CheckpointError(f"{source}: does not fit the model: it has no layer {owner!r}") from None
        reason = _fits(cfg, target)
        if reason:
            raise CheckpointError(f"{source}: does not fit the model: layer {name!r}: {reason}")
        for part, idx in _indices(cfg, payload, source).items():
            value = _regenerate(cfg, part, idx.reshape(-1)).view(idx.shape)
            third = _BIAS_THIRD.get(cfg["kind"].removeprefix("attention_")) if part == "bias" else None
            if third is None:
                state[keys[part]] = value
            else:
                thirds.setdefault(keys[part], {})[third] = value
    for key, parts in thirds.items():
        if sorted(parts) != [0, 1, 2]:
            raise CheckpointError(f"{source}: tampered: {key} is filled by the biases of only "
                                  f"{', '.join(name for name, i in _BIAS_THIRD.items() if i in parts)}")
        state[key] = torch.cat([parts[i] for i in range(3)])
    for entry in header["tensors"]:
        buf = _section(payload, entry["section"], source)
        dtype = _DTYPES[entry["dtype"]]
        shape = [int(s) for s in entry["shape"]]
        if len(buf) != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{source}: tampered: tensor {entry['name']!r} has the wrong number of bytes")
        raw = torch.tensor(np.frombuffer(buf, dtype=np.uint8))  # a copy: the file's bytes stay read-only
        state[entry["name"]] = raw.view(dtype).view(shape)
    try:
        load_state_into(plain, state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    _check_loaded(plain, state, source)
    return plain.eval()


def _check_loaded(plain: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError unless ``plain`` now holds every tensor of the file bit for bit: a skeleton
    whose tensors are tied where the exported model's were not keeps only the last of two values."""
    own = plain.state_dict()

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    for key, want in state.items():
        got = own[key]
        if not torch.equal(bits(got), bits(want)):
            tied = [k for k, t in own.items() if k != key and isinstance(t, torch.Tensor) and t.numel()
                    and t.data_ptr() == got.data_ptr()]
            why = f"it is tied to {', '.join(tied)} in the model" if tied else "the model does not keep its value"
            raise CheckpointError(f"{source}: does not fit the model: {key}: {why}, and the file holds other values "
                                  f"(pass a skeleton with the exported model's ties)")


class _CallableModule(types.ModuleType):
    """This module, callable: ``seedslot.export(model, path)`` is :func:`export`, while
    ``seedslot.export.size_report`` and ``from seedslot.export import ...`` keep working."""

    def __call__(self, model: nn.Module, path: str | os.PathLike, *, build_args: dict | None = None) -> int:
        return export(model, path, build_args=build_args)


sys.modules[__name__].__class__ = _CallableModule
