"""Compact export: exact round trips, packed size, integrity checks and the export command."""

import argparse
import copy
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import seedslot
import seedslot.models
from seedslot.candidates import SHARING
from seedslot.checkpoints import CheckpointError, save_checkpoint
from seedslot.export import (
    EXPORT_VERSION,
    _pack,
    _unpack,
    export,
    index_bits,
    load_exported,
    size_report,
)
from seedslot.app.export_cmd import run_cli
from seedslot.testing import assert_regenerates, fingerprint

from export_files import reframe

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _randomise_scores(model: nn.Module, gen: torch.Generator) -> None:
    """Scores as after training: arbitrary, so every candidate index can be selected."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, seedslot.layers.SlotLayer):
                continue
            for part in m.parts:
                if getattr(m, "scores", None) == "implicit":  # any drift: the scores move along -W
                    d = getattr(m, f"{part}_drift")
                    d.copy_(torch.randn(d.shape, generator=gen) * 1e3)
                    continue
                s = getattr(m, f"{part}_scores")
                if s.dtype == torch.int8:
                    s.copy_(torch.randint(-128, 128, s.shape, generator=gen, dtype=torch.int8))
                else:
                    s.copy_(torch.randn(s.shape, generator=gen))


def _net(conv: bool, n_in: int, n_out: int, ksize: int, stride: int, bias: bool, batchnorm: bool) -> nn.Module:
    if conv:
        layers = [nn.Conv2d(n_in, n_out, ksize, stride=stride, padding=ksize // 2, bias=bias)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(n_out))
        layers += [nn.ReLU(), nn.Flatten(), nn.LazyLinear(3, bias=bias)]
        net = nn.Sequential(*layers)
        net(torch.zeros(1, n_in, 5, 5))  # materialise the lazy layer before slotify_
        return net
    layers = [nn.Linear(n_in, n_out, bias=bias)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_out, affine=False))
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(n_out, 3, bias=bias))


@FAST
@given(
    conv=st.booleans(),
    n_in=st.integers(1, 5),
    n_out=st.integers(1, 6),
    ksize=st.integers(1, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    batchnorm=st.booleans(),
    k=st.sampled_from([1, 2, 3, 5, 8, 13, 16, 64]),
    sharing=st.sampled_from(SHARING),
    kind=st.sampled_from(["int8", "fp32", "implicit", "dense"]),
    seed=st.integers(0, 2**40),
)
def test_round_trip_is_exact(tmp_path, conv, n_in, n_out, ksize, stride, bias, batchnorm, k, sharing, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    arch = _net(conv, n_in, n_out, ksize, stride, bias, batchnorm)
    model = seedslot.slotify_(copy.deepcopy(arch), k=k, seed=seed, sharing=sharing,
                              dense=kind == "dense", scores="int8" if kind == "dense" else kind)
    _randomise_scores(model, gen)
    shape = (4, n_in, 5, 5) if conv else (4, n_in)
    model.train()
    for _ in range(2):  # moves the batch-norm running statistics away from their initial values
        model(torch.randn(shape, generator=gen))
    model.eval()
    path = tmp_path / "m.slot"
    export(model, path)
    loaded = load_exported(path, model=arch)
    assert not any(isinstance(m, seedslot.layers.SlotLayer) for m in loaded.modules())
    assert not loaded.training
    expected = seedslot.to_dense(model).state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    x = torch.randn(shape, generator=gen)
    assert torch.equal(loaded(x), model(x))
    assert fingerprint(path) == fingerprint(model)  # the file's seeds and selections are the model's
    assert_regenerates(model, via=("export", "state_dict"))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_packing_round_trip_and_size(n, k, seed):
    idx = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    bits = index_bits(k)
    assert bits == (math.ceil(math.log2(k)) if k > 1 else 0)
    buf = _pack(idx, bits)
    assert len(buf) == (n * bits + 7) // 8
    assert torch.equal(_unpack(buf, n, bits), idx)


def test_packing_crosses_chunks(monkeypatch):
    monkeypatch.setattr(seedslot.export, "_PACK_CHUNK", 16)
    idx = torch.randint(0, 5, (101,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_unpack(_pack(idx, 3), 101, 3), idx)


def _lenet(k: int) -> nn.Module:
    """Lenet-300-100 as in the paper: no biases."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300, bias=False), nn.ReLU(),
                        nn.Linear(300, 100, bias=False), nn.ReLU(), nn.Linear(100, 10, bias=False))
    return seedslot.slotify_(net, k=k, seed=1)


def test_lenet_k8_export_is_at_most_3_32_of_fp32_plus_4kib(tmp_path):
    model = _lenet(8)
    report = size_report(model)
    dense_bytes = sum(t.numel() * 4 for t in seedslot.to_dense(model).state_dict().values())
    assert report["fp32_bytes"] == dense_bytes == 266_200 * 4
    written = export(model, tmp_path / "lenet.slot")
    assert written == report["export_bytes"] == (tmp_path / "lenet.slot").stat().st_size
    assert written <= 3 / 32 * dense_bytes + 4096
    assert written >= 266_200 * 3 / 8  # the indices really are in there


def test_size_grows_with_index_bits():
    sizes = {k: size_report(_lenet(k))["export_bytes"] for k in (1, 2, 8, 64)}
    overhead = sizes[1]  # K = 1 stores no index at all: header only
    assert overhead < 1024
    for k in (2, 8, 64):
        # the JSON header grows by a few digits (section offsets, K) along with the indices
        assert abs(sizes[k] - overhead - 266_200 * index_bits(k) // 8) <= 64


def _small_export(tmp_path) -> tuple[nn.Module, nn.Module, bytes]:
    arch = nn.Sequential(nn.Linear(6, 5, bias=True), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model = seedslot.slotify_(copy.deepcopy(arch), k=5, seed=7).eval()
    path = tmp_path / "m.slot"
    export(model, path)
    return arch, model, path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_flip_or_truncation_is_detected(tmp_path, data):
    arch, _, good = _small_export(tmp_path)
    if data.draw(st.booleans(), label="truncate"):
        bad = good[: data.draw(st.integers(0, len(good) - 1), label="length")]
    else:
        pos = data.draw(st.integers(0, len(good) - 1), label="position")
        bad = bytearray(good)
        bad[pos] ^= data.draw(st.integers(1, 255), label="mask")
        bad = bytes(bad)
    path = tmp_path / "bad.slot"
    path.write_bytes(bad)
    with pytest.raises(CheckpointError):
        load_exported(path, model=arch)


def test_error_messages_say_which_case(tmp_path):
    arch, model, good = _small_export(tmp_path)
    path = tmp_path / "x.slot"
    cases = {
        "truncated": good[:-3],
        "corrupted": good[:-1] + bytes([good[-1] ^ 0x10]),
        "newer format version": good[:8] + (EXPORT_VERSION + 1).to_bytes(4, "little") + good[12:],
        "not a seedslot export": b"PK\x03\x04" + good[4:],
    }
    for words, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=words):
            load_exported(path, model=arch)
    save_checkpoint(path, {"model": model.state_dict()})
    with pytest.raises(CheckpointError, match="not a seedslot export: it is a training checkpoint"):
        load_exported(path, model=arch)

    def out_of_range(h):
        h["layers"][0]["sections"]["weight"][0] = 10**9
        return h

    for edit in (lambda h: b"{not json", out_of_range, lambda h: {"layers": []}):
        path.write_bytes(reframe(good, edit))
        with pytest.raises(CheckpointError, match="tampered"):
            load_exported(path, model=arch)


def test_wrong_architecture_does_not_fit(tmp_path):
    _, _, good = _small_export(tmp_path)
    path = tmp_path / "m.slot"
    path.write_bytes(good)
    wrong = [
        nn.Sequential(nn.Linear(6, 4, bias=True), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)),
        nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(6, 5, bias=True), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(6, 5, bias=True)),
    ]
    for arch in wrong:
        with pytest.raises(CheckpointError, match="does not fit the model"):
            load_exported(path, model=arch)
    conv = seedslot.slotify_(nn.Sequential(nn.Conv2d(2, 3, 3, stride=1)), k=2)
    export(conv, path)
    with pytest.raises(CheckpointError, match="does not fit the model.*stride"):
        load_exported(path, model=nn.Sequential(nn.Conv2d(2, 3, 3, stride=2)))


def test_without_build_args_the_architecture_is_required(tmp_path):
    _, _, good = _small_export(tmp_path)
    path = tmp_path / "m.slot"
    path.write_bytes(good)
    with pytest.raises(ValueError, match="pass model="):
        load_exported(path)
    with pytest.raises(ValueError, match="model must be"):
        load_exported(path, model="lenet")
    with pytest.raises(ValueError, match="build_args must be JSON"):
        export(seedslot.slotify_(nn.Sequential(nn.Linear(2, 2)), k=2), path, build_args={"x": object()})


def test_cli_turns_a_bad_checkpoint_into_one_line_and_status_2(tmp_path, capsys):
    ckpt = tmp_path / "c.ckpt"
    save_checkpoint(ckpt, {"epoch": 1})
    ckpt.write_bytes(ckpt.read_bytes()[:-1])
    status = run_cli(argparse.Namespace(checkpoint=str(ckpt), out=str(tmp_path / "m.slot")))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "truncated" in err
    save_checkpoint(ckpt, {"epoch": 1})
    assert run_cli(argparse.Namespace(checkpoint=str(ckpt), out=str(tmp_path / "m.slot"))) == 2
    assert "not a training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.slot").exists()


def test_shared_layer_round_trip(tmp_path):
    lin = nn.Linear(6, 6)
    arch = nn.Sequential(lin, nn.ReLU(), lin)
    model = seedslot.slotify_(copy.deepcopy(arch), k=4, seed=3).eval()
    assert model[2] is model[0]
    size = export(model, tmp_path / "m.slot")
    loaded = load_exported(tmp_path / "m.slot", model=arch)
    x = torch.randn(2, 6)
    assert torch.equal(loaded(x), model(x))
    assert size < 1000


def _lenet_export(tmp_path) -> bytes:
    model = seedslot.models.build("lenet", mode="seeded", k=4, input_size=6)
    export(model, tmp_path / "l.slot")
    return (tmp_path / "l.slot").read_bytes()


def _set(header, path, value):
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return header


EXPORT_FIELDS = [("build_args", key) for key in ("k", "input_size", "in_channels", "num_classes", "name", "mode",
                                                  "sharing", "seed", "score_lambda")] + [
    ("build_args",), ("layers", 0, "k"), ("layers", 0, "bits"), ("layers", 0, "sigma"), ("layers", 0, "sharing"),
    ("layers", 0, "seed"), ("layers", 0, "candidate_seed"), ("layers", 0, "weight_shape"), ("layers", 0, "kind"),
    ("layers", 0, "bias"), ("layers", 0, "name"), ("layers", 0, "sections"), ("layers", 0), ("layers",),
    ("tensors",),
]
JSON_HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.sampled_from([0, -1, 100000, 10**9, 2**31, 2**62, 1e30, "bogus", [3, 0], [10**6, 10**6]]),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4), st.just([]), st.just({}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(EXPORT_FIELDS), value=JSON_HOSTILE)
def test_fuzzed_fields_with_a_recomputed_hash_load_or_raise_checkpoint_error(tmp_path, field, value):
    good = _lenet_export(tmp_path)
    path = tmp_path / "x.slot"
    path.write_bytes(reframe(good, lambda h: _set(h, field, value)))
    t0 = time.monotonic()
    try:
        load_exported(path)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    except ValueError as e:  # an export without build_args is valid: it needs model=
        assert field == ("build_args",) and value is None and "pass model=" in str(e)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("field, value, words", [
    (("layers", 0, "sigma"), 1e30, "sigma must be the Glorot bound"),
    (("layers", 0, "sharing"), "bogus", "sharing must be one of"),
    (("build_args", "k"), 10**9, "build_args"),
    (("build_args", "input_size"), 100000, "build_args.input_size"),
    (("layers", 0, "k"), 2**60, "bits must be"),
])
def test_tampered_export_fields_are_named(tmp_path, field, value, words):
    path = tmp_path / "x.slot"
    path.write_bytes(reframe(_lenet_export(tmp_path), lambda h: _set(h, field, value)))
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=words):
        load_exported(path)
    assert time.monotonic() - t0 < 10


def test_cli_export_of_a_tampered_checkpoint_is_one_line(tmp_path, capsys):
    model = seedslot.models.build("lenet", mode="seeded", k=2, input_size=6)
    ckpt = tmp_path / "c.ckpt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "build_args": {**model.build_args, "k": 10**9}})
    assert run_cli(argparse.Namespace(checkpoint=str(ckpt), out=str(tmp_path / "m.slot"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "build_args" in err and not (tmp_path / "m.slot").exists()


def test_a_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    """Issue 24, item 14: not a RecursionError."""
    good = _lenet_export(tmp_path)
    path = tmp_path / "deep.slot"
    path.write_bytes(reframe(good, lambda h: b"[" * 100000 + b"]" * 100000))
    with pytest.raises(CheckpointError, match="malformed export header"):
        load_exported(path)


def test_export_onto_its_own_checkpoint_keeps_the_training_state(tmp_path, capsys):
    """Issue 24, item 12: under its own name, another name (a hard link) or onto another checkpoint."""
    from seedslot.app.cli import main

    model = seedslot.models.build("lenet", mode="seeded", k=2, input_size=4)
    ckpt = tmp_path / "last.ckpt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "build_args": model.build_args})
    os.link(ckpt, tmp_path / "alias.slot")
    save_checkpoint(tmp_path / "other.ckpt", {"model": model.state_dict(), "build_args": model.build_args})
    before = ckpt.read_bytes()
    for out in ("last.ckpt", "alias.slot", "other.ckpt"):
        assert main(["export", str(ckpt), "--out", str(tmp_path / out)]) == 2
        assert "checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.slot")]) == 0
