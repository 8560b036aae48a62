"""Files seedslot is pointed at are untrusted (issue 24): a checkpoint, export or IDX file whose
declared sizes exceed what it holds is refused, in bounded memory and time, before anything is
built, allocated or inflated."""

import gzip
import io
import json
import struct
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import seedslot
import seedslot.models
from seedslot.checkpoints import CHECKPOINT_MAGIC, CHECKPOINT_VERSION, CheckpointError, frame, load_checkpoint, save_checkpoint
from seedslot.export import EXPORT_MAGIC, EXPORT_VERSION, export, load_exported
from seedslot.memory import track

LIMIT_BYTES, LIMIT_SECONDS = 2**30, 10.0


def _no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from sizes the file does not hold")

    monkeypatch.setattr(seedslot.models, "build", refuse)


def _learned_lenet_payload(**changes) -> dict:
    model = seedslot.models.build("lenet", mode="learned", input_size=4)
    return {"model": dict(model.state_dict()), "build_args": {**model.build_args, **changes}}


def test_a_stride_0_view_does_not_count_as_bytes_the_file_holds(tmp_path, monkeypatch):
    payload = _learned_lenet_payload(input_size=2000)  # 1.2e9 connections: 4.8 GB if built
    payload["model"]["pad"] = torch.zeros(1).expand(2**40)  # 4 bytes in the file, "4 TiB" by numel
    save_checkpoint(tmp_path / "c.ckpt", payload)
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match="the file holds"):
        seedslot.models.build_from_checkpoint(load_checkpoint(tmp_path / "c.ckpt"), "c.ckpt")


def test_implicit_scores_cannot_announce_a_k_the_file_does_not_hold(tmp_path, monkeypatch):
    model = seedslot.models.build("lenet", mode="seeded", k=2, scores="implicit", input_size=4)
    args = model.build_args
    payload = {"model": dict(model.state_dict()), "build_args": {**args, "config": {**args["config"], "k": 2**31 - 1}}}
    save_checkpoint(tmp_path / "c.ckpt", payload)
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match="build_args.config.k"):
        seedslot.models.build_from_checkpoint(load_checkpoint(tmp_path / "c.ckpt"), "c.ckpt")


def test_an_export_of_k_1_cannot_announce_a_huge_network(tmp_path, monkeypatch):
    tiny = seedslot.slotify_(nn.Sequential(nn.Linear(3, 2, bias=False)), k=1)
    args = dict(seedslot.models.build("lenet", mode="seeded", k=1).build_args, input_size=2000)
    export(tiny, tmp_path / "e.slot", build_args=args)
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match="the file holds"):
        load_exported(tmp_path / "e.slot")


# ---------------------------------------------------------------- the property over mutated files

_BIG = st.sampled_from([2**31 - 1, 2**40, 10**6, 5000, 2000, 700, 2**63 - 1])


def _zip_inflated(body: bytes, which: int, declared: int) -> bytes:
    """``body`` (a torch archive) with one record's central-directory entry claiming ``declared``
    bytes, deflated: what a zip bomb announces."""
    out = bytearray(body)
    pos, seen = 0, 0
    while True:
        pos = out.find(b"PK\x01\x02", pos)
        if pos < 0:
            return bytes(out)
        if seen == which:
            struct.pack_into("<H", out, pos + 10, 8)  # method: deflate
            struct.pack_into("<I", out, pos + 24, min(declared, 2**32 - 1))  # uncompressed size
            return bytes(out)
        seen += 1
        pos += 4


def _checkpoint_case(data) -> tuple[bytes, callable]:
    kind = data.draw(st.sampled_from(["build_args", "expand", "zip"]), label="kind")
    mode = data.draw(st.sampled_from(["learned", "seeded"]), label="mode")
    scores = data.draw(st.sampled_from(["int8", "fp32", "implicit"]), label="scores")
    model = seedslot.models.build("lenet", mode=mode, k=2, input_size=4, **({} if mode == "learned" else {"scores": scores}))
    state = dict(model.state_dict())
    args = dict(model.build_args)
    if kind in ("build_args", "expand"):
        field = data.draw(st.sampled_from(["k", "input_size", "num_classes", "in_channels"]), label="field")
        args[field] = data.draw(_BIG, label="value")
    if kind == "expand":  # every tensor a stride-0 view of a declared size the file does not hold
        n = data.draw(_BIG, label="numel")
        state = {key: (v.reshape(-1)[:1].expand(n) if isinstance(v, torch.Tensor) and v.numel() else v)
                 for key, v in state.items()}
    buf = io.BytesIO()
    torch.save({"model": state, "build_args": args}, buf)
    body = buf.getvalue()
    if kind == "zip":
        body = _zip_inflated(body, data.draw(st.integers(0, 8), label="record"), data.draw(_BIG, label="declared"))
    raw = b"".join(bytes(p) for p in frame(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, [body]))
    return raw, lambda path: seedslot.models.build_from_checkpoint(load_checkpoint(path), str(path))


def _export_case(data, tmp_path) -> tuple[bytes, callable]:
    k = data.draw(st.sampled_from([1, 2, 4]), label="k")
    model = seedslot.models.build("lenet", mode="seeded", k=k, input_size=4)
    export(model, tmp_path / "good.slot")
    good = (tmp_path / "good.slot").read_bytes()
    body = good[56:]
    n = int.from_bytes(body[:4], "little")
    header = json.loads(body[4 : 4 + n])
    where = data.draw(st.sampled_from(["build_args", "weight_shape", "section"]), label="where")
    big = data.draw(_BIG, label="value")
    if where == "build_args":
        header["build_args"][data.draw(st.sampled_from(["k", "input_size", "num_classes"]), label="field")] = big
    elif where == "weight_shape":
        header["layers"][0]["weight_shape"] = [big, header["layers"][0]["weight_shape"][1]]
    else:
        header["layers"][0]["sections"]["weight"] = [0, big]
    head = json.dumps(header).encode()
    raw = b"".join(bytes(p) for p in frame(EXPORT_MAGIC, EXPORT_VERSION, [len(head).to_bytes(4, "little") + head,
                                                                           body[4 + n :]]))
    return raw, load_exported


def _idx_case(data) -> tuple[bytes, callable]:
    from seedslot.app import data as D

    ndim = data.draw(st.integers(1, 4), label="ndim")
    shape = data.draw(st.lists(st.sampled_from([1, 3, 255, 65535, 2**31, 2**32 - 1]), min_size=ndim, max_size=ndim),
                      label="shape")
    held = data.draw(st.integers(0, 64), label="held")
    raw = b"\0\0\x08" + bytes([ndim]) + struct.pack(f">{ndim}I", *shape) + bytes(held)
    if data.draw(st.booleans(), label="gzip"):
        raw = gzip.compress(raw + bytes(data.draw(st.sampled_from([0, 2**20, 2**24]), label="zeros")))

    def load(path):
        try:
            D.read_idx(path)
        except D.DataError as e:
            raise CheckpointError(str(e)) from None  # the same one-line contract, naming the file

    return raw, load


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_declared_sizes_beyond_the_file_are_refused_in_bounded_memory_and_time(tmp_path, data):
    fmt = data.draw(st.sampled_from(["checkpoint", "export", "idx"]), label="format")
    raw, load = {"checkpoint": lambda: _checkpoint_case(data), "export": lambda: _export_case(data, tmp_path),
                 "idx": lambda: _idx_case(data)}[fmt]()
    path = tmp_path / "hostile.bin"
    path.write_bytes(raw)
    t0 = time.monotonic()
    with track() as m:
        try:
            load(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(path) in str(e)
    assert time.monotonic() - t0 < LIMIT_SECONDS
    assert m.peak_increment_bytes < LIMIT_BYTES


def test_a_zip_bomb_checkpoint_is_refused_before_anything_is_inflated(tmp_path):
    """Issue 24, item 13: a few hundred KB whose archive record inflates to 256 MiB."""
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2**26)}, "build_args": {}}, buf)
    bomb = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    path = tmp_path / "bomb.ckpt"
    path.write_bytes(b"".join(bytes(p) for p in frame(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, [bomb.getvalue()])))
    assert path.stat().st_size < 2**21
    with track() as m:
        with pytest.raises(CheckpointError, match="compressed"):
            load_checkpoint(path)
    assert m.peak_increment_bytes < 2**27


def test_a_device_is_not_read_as_a_checkpoint_or_export():
    for load in (load_checkpoint, load_exported):
        with pytest.raises(CheckpointError, match="/dev/zero is a character device"):
            load("/dev/zero")


def test_a_tampered_draw_counter_fails_at_load_naming_it():
    from seedslot.checkpoints import load_state_into

    model = seedslot.models.build("lenet", mode="seeded", k=2, selection="sample", input_size=4)
    for bad in (torch.tensor(-1), torch.tensor(2**63 - 1), torch.tensor(1.5), torch.zeros(2, dtype=torch.int64)):
        state = dict(model.state_dict())
        state["classifier.0.draws"] = bad
        with pytest.raises(CheckpointError, match="classifier.0.draws"):
            load_state_into(model, state)
    assert int(model.classifier[0].draws) == 0


def test_a_stride_0_view_in_optimizer_or_scheduler_state_is_checked_without_materialising():
    from seedslot.checkpoints import load_state_into

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    state = dict(sched.state_dict(), hostile=torch.tensor([float("nan")]).expand(2**40))
    with track() as m:
        with pytest.raises(CheckpointError, match="must be finite"):
            load_state_into(sched, state)
    assert m.peak_increment_bytes < 2**28
