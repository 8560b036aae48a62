"""Tools for testing seedslot's promise in your own suite: a seed stands for its candidates.

seedslot stores seeds and candidate indices, never weights, so your tests can check that a model
regenerates what it had. This module gives them:

- assertions :func:`assert_same_candidates`, :func:`assert_same_selection` and
  :func:`assert_regenerates`, which fail with an ``AssertionError`` naming the layer, the first
  differing connection and both values (as ``torch.testing.assert_close`` does for tensors);
- :func:`fingerprint`, a short digest of every slot layer's seeds, candidates and greedy
  selections, for golden tests ("this model still selects what it selected"). It is stable across
  seedslot versions for the same random stream version (:data:`seedslot.rng.STREAM_VERSION`):
  a fingerprint changes only if the model's seeds, K, sharing, candidates or selections change,
  or if a new seedslot generates another stream (and then says so with a new stream version);
- hypothesis strategies :func:`slot_configs`, :func:`slot_layers` and :func:`connection_offsets`.
  They need hypothesis (``pip install seedslot[testing]``); the rest of the module does not.

Everything here uses seedslot's public API only: the layers' ``candidates()``,
``selected_index()``, ``selected_weight()``, ``state_dict()``, :func:`seedslot.export.export`
and :func:`seedslot.export.load_exported`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .layers import SlotLayer
from .rng import STREAM_VERSION

try:
    from hypothesis import strategies as _st
except ImportError:  # only the strategies need it
    _st = None

_STRATEGIES = ("slot_configs", "slot_layers", "connection_offsets", "seeds")

__all__ = ["fingerprint", "assert_same_candidates", "assert_same_selection", "assert_regenerates", "EDGE_SEEDS",
           "STREAM_VERSION", *(_STRATEGIES if _st is not None else ())]

# Seeds at the edges of the integer widths seeds pass through (int32 keys, 64-bit words, files).
EDGE_SEEDS = (0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
              2**100 + 7)

VIA = ("state_dict", "export", "threads", "process", "device")


# ---------------------------------------------------------------- what a model holds


def _layers(obj: nn.Module) -> dict[str, SlotLayer]:
    """The slot layers of ``obj`` (itself, if it is one) by qualified name ("" for ``obj`` itself);
    a layer used in several places under each of its names, as exports list it."""
    if not isinstance(obj, nn.Module):
        raise TypeError(f"expected a slot layer or a module holding slot layers; got {type(obj).__name__}")
    return {name: m for name, m in obj.named_modules(remove_duplicate=False) if isinstance(m, SlotLayer)}


def _label(name: str) -> str:
    return f"layer {name!r}" if name else "the layer"


@torch.no_grad()
def _snapshot(obj: nn.Module, *, candidates: bool = True, selection: bool = True) -> dict:
    """``{name: {"meta": {...}, "parts": {part: {"candidates", "index", "value"}}}}`` on the CPU:
    everything the assertions and the fingerprint compare, read through the layers' public API."""
    snap = {}
    for name, layer in _layers(obj).items():
        parts = {}
        for part in layer.parts:
            entry = {}
            if candidates:
                entry["candidates"] = layer.candidates(part).detach().cpu()
            if selection:
                entry["index"] = layer.selected_index(part).cpu()
                value = layer.selected_weight() if part == "weight" else layer.selected_bias()
                entry["value"] = value.detach().cpu().reshape(entry["index"].shape)
            parts[part] = entry
        snap[name] = {"meta": {"seed": layer.seed, "candidate_seed": layer.candidate_seed, "k": layer.k,
                               "sharing": layer.sharing}, "parts": parts}
    return snap


# ---------------------------------------------------------------- fingerprint


def _digest(t: torch.Tensor, dtype: str) -> str:
    """SHA-256 of a tensor's values as little-endian ``dtype`` (numpy's name), row-major."""
    return hashlib.sha256(np.ascontiguousarray(t.numpy(), dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).hexdigest()


def _records(snap: dict) -> list[dict]:
    return [{"name": name, **layer["meta"], "stream_version": STREAM_VERSION,
             "parts": {part: {"shape": list(e["index"].shape), "candidates": _digest(e["candidates"], "float32"),
                              "selection": _digest(e["index"], "int64")}
                       for part, e in layer["parts"].items()}}
            for name, layer in snap.items()]


def fingerprint(model: nn.Module | str | os.PathLike) -> str:
    """A 16-hex-digit digest of ``model``'s slot layers: each one's qualified name, seeds, K,
    sharing, the stream version, a digest of all its candidates and its current greedy selections.

    ``model`` is a slot layer, a module holding slot layers, or the path of an export file (the
    selections it stores, with the candidates its seeds regenerate): a model and its export have
    the same fingerprint. The same model gives the same fingerprint on every device, thread count
    and process, after a ``state_dict`` round trip, and in every seedslot version that generates
    the same stream version; the score storage and float outputs do not enter it.
    """
    snap = _export_snapshot(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else _snapshot(model)
    if not snap:
        raise ValueError("fingerprint takes a model holding slot layers (or an export file of one); it holds none")
    text = json.dumps(_records(snap), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _export_snapshot(path: str) -> dict:
    """The snapshot of an export file: its layers' candidates regenerated from the stored seeds, the
    stored selections and the weights :func:`~seedslot.export.load_exported` makes of them."""
    from .export import exported_layers

    return {layer.name: {"meta": layer.settings,
                         "parts": {part: {"candidates": layer.candidates[part], "index": layer.index[part],
                                          "value": layer.values[part]} for part in layer.index}}
            for layer in exported_layers(path)}


# ---------------------------------------------------------------- assertions


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of its width, so that comparisons are bit for bit (NaN, -0.0)."""
    if t.dtype.is_floating_point:
        return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """``(flat index of the first difference, number of differences)``, or None if bit-identical."""
    diff = (_bits(a).reshape(-1) != _bits(b).reshape(-1)).nonzero()
    return None if diff.numel() == 0 else (int(diff[0]), diff.numel())


def _where(flat: int, shape) -> str:
    """A connection's index in its part's shape, e.g. "(2, 0, 1, 1)"."""
    return str(tuple(int(i) for i in np.unravel_index(flat, tuple(shape)))) if len(shape) else "()"


def _pairs(a: dict, b: dict, context: str) -> Iterable[tuple[str, dict, dict]]:
    if list(a) != list(b):
        only_a, only_b = [n for n in a if n not in b], [n for n in b if n not in a]
        raise AssertionError(f"{context}the models hold different slot layers: only in a: {only_a}, only in b: "
                             f"{only_b}" if only_a or only_b else f"{context}slot layers in another order: {list(a)} "
                             f"and {list(b)}")
    for name in a:
        for key in ("k", "sharing"):
            if a[name]["meta"][key] != b[name]["meta"][key]:
                raise AssertionError(f"{context}{_label(name)}: {key} is {a[name]['meta'][key]!r} in a, "
                                     f"{b[name]['meta'][key]!r} in b")
        yield name, a[name]["parts"], b[name]["parts"]


def _compare_candidates(a: dict, b: dict, context: str = "") -> None:
    for name, pa, pb in _pairs(a, b, context):
        for part in pa:
            ca, cb = pa[part]["candidates"], pb[part]["candidates"]
            if ca.shape != cb.shape:
                raise AssertionError(f"{context}{_label(name)} {part}: candidates of shape {tuple(ca.shape)} in a, "
                                     f"{tuple(cb.shape)} in b")
            first = _first_difference(ca, cb)
            if first is not None:
                flat, count = first
                conn, j = divmod(flat, ca.shape[-1])
                raise AssertionError(
                    f"{context}{_label(name)} {part}: candidates differ at connection {_where(conn, ca.shape[:-1])} "
                    f"candidate {j}: {ca.reshape(-1)[flat].item()!r} in a, {cb.reshape(-1)[flat].item()!r} in b "
                    f"({count} of {ca.numel()} values differ)")


def _compare_selection(a: dict, b: dict, context: str = "") -> None:
    for name, pa, pb in _pairs(a, b, context):
        for part in pa:
            ia, ib, va, vb = pa[part]["index"], pb[part]["index"], pa[part]["value"], pb[part]["value"]
            if ia.shape != ib.shape:
                raise AssertionError(f"{context}{_label(name)} {part}: {tuple(ia.shape)} connections in a, "
                                     f"{tuple(ib.shape)} in b")
            for what, first in (("greedy selection", _first_difference(ia, ib)),
                                ("selected value", _first_difference(va, vb))):
                if first is not None:
                    flat, count = first
                    raise AssertionError(
                        f"{context}{_label(name)} {part}: {what} differs at connection {_where(flat, ia.shape)}: "
                        f"candidate {ia.reshape(-1)[flat].item()} (value {va.reshape(-1)[flat].item()!r}) in a, "
                        f"candidate {ib.reshape(-1)[flat].item()} (value {vb.reshape(-1)[flat].item()!r}) in b "
                        f"({count} of {ia.numel()} connections differ)")


def assert_same_candidates(a: nn.Module, b: nn.Module, *, msg: str | None = None) -> None:
    """Assert that ``a`` and ``b`` (slot layers, or modules holding the same slot layers by name)
    hold bit-identical candidates: every value of every part of every layer.

    AssertionError naming the layer, the first differing connection and candidate, and both values.
    """
    _compare_candidates(_snapshot(a, selection=False), _snapshot(b, selection=False), f"{msg}: " if msg else "")


def assert_same_selection(a: nn.Module, b: nn.Module, *, msg: str | None = None) -> None:
    """Assert that ``a`` and ``b`` select the same candidate for every connection in eval mode
    (greedy) and that the selected values are bit-identical.

    AssertionError naming the layer, the first differing connection, both indices and both values.
    """
    _compare_selection(_snapshot(a, candidates=False), _snapshot(b, candidates=False), f"{msg}: " if msg else "")


def _rebuilt(model: nn.Module, factory: Callable[[], nn.Module] | None) -> nn.Module:
    """A fresh model of ``model``'s architecture: ``factory()``, ``seedslot.models.build`` of its
    ``build_args``, or a deep copy."""
    if factory is not None:
        return factory()
    if isinstance(getattr(model, "build_args", None), dict):
        from .models import build

        return build(**model.build_args)
    return copy.deepcopy(model)


_CHILD = """
import sys, torch
from seedslot.testing import _child_snapshot
_child_snapshot(sys.argv[1], sys.argv[2])
"""


def _child_snapshot(src: str, out: str) -> None:
    """In a fresh process: the snapshot of the model saved at ``src``, written to ``out``."""
    saved = torch.load(src, map_location="cpu", weights_only=False)  # written by assert_regenerates itself
    if isinstance(saved, dict) and "build_args" in saved:
        from .models import build

        model = build(**saved["build_args"])
        model.load_state_dict(saved["state_dict"])
    else:
        model = saved
    torch.save(_snapshot(model), out)


def _in_fresh_process(model: nn.Module, tmp: str) -> dict:
    src, out = os.path.join(tmp, "model.pt"), os.path.join(tmp, "snapshot.pt")
    cpu = copy.deepcopy(model).cpu()
    if isinstance(getattr(model, "build_args", None), dict):
        torch.save({"build_args": model.build_args, "state_dict": cpu.state_dict()}, src)
    else:
        torch.save(cpu, src)  # the child imports the model's classes as the parent does
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    run = subprocess.run([sys.executable, "-c", _CHILD, src, out], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise AssertionError(f"regenerated in a fresh process: the process failed (exit {run.returncode}):\n"
                             f"{run.stderr[-2000:]}")
    return torch.load(out, weights_only=True)


def _with_threads(model: nn.Module, n: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return _snapshot(model)
    finally:
        torch.set_num_threads(before)


def assert_regenerates(model: nn.Module, *, via: Iterable[str] = VIA, factory: Callable[[], nn.Module] | None = None,
                       threads: Iterable[int] | None = None, device: str | torch.device | None = None) -> None:
    """Assert that ``model`` regenerates bit-identical candidates, greedy selections and selected
    values when rebuilt each way ``via`` names:

    - ``"state_dict"``: a fresh model (``factory()``; else ``seedslot.models.build(**model.build_args)``
      for the zoo's models; else a deep copy) loads ``model.state_dict()``;
    - ``"export"``: :func:`seedslot.export.export` then :func:`seedslot.export.load_exported`: the
      plain model's weights are the selected values, and the file's :func:`fingerprint` is the model's;
    - ``"threads"``: torch set to each thread count of ``threads`` (default 1 and one more than now);
    - ``"process"``: a fresh Python process (the zoo's models are rebuilt there from ``build_args``,
      other models are pickled: their classes must be importable);
    - ``"device"``: a copy moved to ``device`` (default: CUDA when available, else skipped).

    AssertionError naming the way, the layer, the first differing connection and both values.
    """
    via = tuple(via)
    unknown = [v for v in via if v not in VIA]
    if unknown:
        raise ValueError(f"via must name some of {', '.join(map(repr, VIA))}; got {unknown}")
    want = _snapshot(model)
    if not want:
        raise ValueError("assert_regenerates takes a model holding slot layers; it holds none")

    def check(got: dict, how: str) -> None:
        _compare_candidates(want, got, f"regenerated {how}: ")
        _compare_selection(want, got, f"regenerated {how}: ")

    for way in via:
        if way == "state_dict":
            fresh = _rebuilt(model, factory)
            fresh.load_state_dict(model.state_dict())
            check(_snapshot(fresh), "from the state_dict")
        elif way == "export":
            from .export import export

            wrapped = nn.Sequential(model) if isinstance(model, SlotLayer) else model  # export names its layers
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.slot")
                export(wrapped, path)
                got = _export_snapshot(path)
                if wrapped is not model:
                    got = {"": got["0"]}
                check(got, "from an export")
                if fingerprint(path) != fingerprint(wrapped):
                    raise AssertionError(f"regenerated from an export: fingerprint {fingerprint(path)} of the "
                                         f"file, {fingerprint(wrapped)} of the model")
        elif way == "threads":
            for n in threads or (1, torch.get_num_threads() + 1):
                check(_with_threads(model, n), f"with {n} thread{'s' if n != 1 else ''}")
        elif way == "process":
            with tempfile.TemporaryDirectory() as tmp:
                check(_in_fresh_process(model, tmp), "in a fresh process")
        elif way == "device":
            where = device if device is not None else ("cuda" if torch.cuda.is_available() else None)
            if where is not None:
                check(_snapshot(copy.deepcopy(model).to(where)), f"on {where}")


# ---------------------------------------------------------------- hypothesis strategies


def __getattr__(name: str):
    if name in _STRATEGIES:  # defined below only where hypothesis imports
        raise ImportError(f"seedslot.testing.{name} is a hypothesis strategy and hypothesis is not installed: "
                          "pip install seedslot[testing]")
    raise AttributeError(f"module 'seedslot.testing' has no attribute {name!r}")


def _choices() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The accepted sharing modes, score storages and selection rules, as SlotConfig checks them."""
    from .candidates import SHARING
    from .storages import SCORES
    from .selection import SELECTION

    return SHARING, SCORES, SELECTION


if _st is not None:
    def seeds(max_seed: int = 2**63 - 1):
        """Seeds in [0, max_seed], the edge values of :data:`EDGE_SEEDS` often."""
        edges = [s for s in EDGE_SEEDS if s <= max_seed] + [max_seed]
        return _st.one_of(_st.sampled_from(edges), _st.integers(0, max_seed))

    def slot_configs(*, k=None, storages=None, sharing=None, selection=None, max_seed: int = 2**63 - 1,
                     score_lambda: bool = True):
        """:class:`~seedslot.SlotConfig` s of every score storage (``incremental`` too), sharing
        mode and selection rule (or those given), K from ``k`` (a strategy; default 1..16, edge
        values often) and seeds up to ``max_seed`` (default 2**63 - 1, what export files hold;
        layers take any int >= 0), with the paper's or a drawn ``score_lambda``."""
        all_sharing, all_scores, all_selection = _choices()
        ks = k if k is not None else _st.one_of(_st.sampled_from([1, 2, 8, 16]), _st.integers(1, 16))

        @_st.composite
        def build(draw):
            scores = draw(_st.sampled_from(list(storages or all_scores)))
            return _config(
                k=draw(ks), seed=draw(seeds(max_seed)), scores=scores,
                sharing=draw(_st.sampled_from(list(sharing or all_sharing))),
                selection=draw(_st.sampled_from(list(selection or all_selection))),
                incremental=scores == "implicit" and draw(_st.booleans()),
                score_lambda=draw(_st.one_of(_st.none(), _st.floats(1e-3, 10.0))) if score_lambda else None)

        return build()

    def _config(**fields):
        from .config import SlotConfig

        return SlotConfig(**fields)

    def slot_layers(configs=None, *, kinds=("linear", "conv2d"), dense: bool | None = False,
                    max_connections: int = 4096):
        """Slot layers of a drawn config (``configs``, default :func:`slot_configs`): SlotLinear and
        SlotConv2d (``kinds``), or their dense references (``dense=True``, or both for None), with
        odd shapes: sizes 1 and primes, with or without bias, non-square kernels, groups, strides,
        dilations and "same" padding, at most ``max_connections`` connections."""
        from .layers import DenseSlotConv2d, DenseSlotLinear, SlotConv2d, SlotLinear

        sizes = _st.one_of(_st.sampled_from([1, 2, 3, 5, 7, 13]), _st.integers(1, 40))

        @_st.composite
        def build(draw):
            config = draw(configs if configs is not None else slot_configs())
            is_dense = draw(_st.booleans()) if dense is None else dense  # (the dense layers ignore ``scores``)
            kind = draw(_st.sampled_from(list(kinds)))
            bias = draw(_st.booleans())
            if kind == "linear":
                n_in, n_out = draw(sizes), draw(sizes)
                if n_out * (n_in + 1) > max_connections:
                    n_in, n_out = 1 + n_in % 13, 1 + n_out % 13
                return (DenseSlotLinear if is_dense else SlotLinear)(n_in, n_out, bias, config=config)
            groups = draw(_st.sampled_from([1, 1, 2, 3]))
            c_in, c_out = groups * draw(_st.integers(1, 4)), groups * draw(_st.integers(1, 4))
            kernel = (draw(_st.integers(1, 5)), draw(_st.integers(1, 5)))
            stride = draw(_st.sampled_from([1, 1, 2, (1, 2)]))
            padding = draw(_st.sampled_from([0, 1, (2, 0), "valid"] + (["same"] if stride == 1 else [])))
            dilation = draw(_st.sampled_from([1, 1, 2]))
            if c_out * (c_in // groups) * kernel[0] * kernel[1] + c_out > max_connections:
                kernel = (1, 1)
            layer_type = DenseSlotConv2d if is_dense else SlotConv2d
            return layer_type(c_in, c_out, kernel, stride, padding, dilation, groups, bias, config=config)

        return build()

    def connection_offsets(rows: int = 1):
        """First connection indices of a run of ``rows`` connections that stays within int32
        (offset + rows - 1 <= 2**31 - 1): 0, the last possible one, and values around the
        boundaries of 8, 16, 23, 24 and 31 bits often."""
        top = 2**31 - rows
        if top < 0:
            raise ValueError(f"rows must be in [1, 2**31]; got {rows}")
        near = sorted({min(top, max(0, (1 << b) + d)) for b in (8, 16, 23, 24, 31) for d in (-rows, -1, 0, 1)}
                      | {0, 1, top, max(0, top - 1)})
        return _st.one_of(_st.sampled_from(near), _st.integers(max(0, top - 1000), top), _st.integers(0, top))
