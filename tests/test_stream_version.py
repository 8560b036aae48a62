"""The random stream version: exports and training checkpoints record it, a file of another
version is refused with a one-line CheckpointError naming the file and both versions (its seeds
would regenerate other weights), and files from before the field are version 1."""

import json
import os

import pytest
import torch

import seedslot as ss
from seedslot.checkpoints import CheckpointError, frame, load_checkpoint, save_checkpoint
from seedslot.export import EXPORT_MAGIC, EXPORT_VERSION, export, load_exported
from seedslot.models import build, build_from_checkpoint
from seedslot.rng import STREAM_VERSION
from seedslot.testing import fingerprint

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[56:60], "little")
    return json.loads(data[60:60 + n]), data[60 + n:]


def _with_header(data: bytes, header: dict) -> bytes:
    head = json.dumps(header).encode()
    return b"".join(frame(EXPORT_MAGIC, EXPORT_VERSION, [len(head).to_bytes(4, "little") + head, _header(data)[1]]))


def _small():
    return build("lenet", mode="seeded", k=4, seed=3, input_size=6)


def test_exports_record_the_stream_version_and_refuse_another(tmp_path):
    model = _small()
    good = good_bytes(model, tmp_path)
    header, _ = _header(good)
    assert header["stream_version"] == STREAM_VERSION == 1
    path = tmp_path / "m.slot"
    for other in (2, 0, "1", None, True, 1.0):
        path.write_bytes(_with_header(good, {**header, "stream_version": other}))
        message = (f"{path}: written for random stream version {other!r}; this seedslot generates stream version 1, "
                   f"so its seeds would give other weights")
        with pytest.raises(CheckpointError) as e:
            load_exported(path)
        assert str(e.value) == message
        with pytest.raises(CheckpointError, match="random stream version"):
            fingerprint(path)


def good_bytes(model, tmp_path) -> bytes:
    p = tmp_path / "good.slot"
    if not p.exists():
        export(model, p)
    return p.read_bytes()


def test_exports_without_the_field_are_version_1(tmp_path):
    model = _small()
    data = good_bytes(model, tmp_path)
    header, _ = _header(data)
    del header["stream_version"]
    path = tmp_path / "old.slot"
    path.write_bytes(_with_header(data, header))
    plain = load_exported(path)
    assert torch.equal(plain.classifier[0].weight, model.classifier[0].selected_weight())
    assert fingerprint(path) == fingerprint(model)
    old = open(os.path.join(DATA, "compat_v0.slot"), "rb").read()
    assert "stream_version" not in _header(old)[0]  # written before the field (tests/test_compat.py loads it)


def test_training_checkpoints_record_it_and_resume_refuses_another(tmp_path):
    from seedslot.app.train import TrainConfig, _State

    model = _small()
    opt = ss.SlotSGD(model.parameters(), lr=0.1)
    state = _State(TrainConfig(), model, opt, torch.optim.lr_scheduler.MultiStepLR(opt, [1]), torch.device("cpu"))
    payload = state.payload()
    assert payload["stream_version"] == STREAM_VERSION
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, payload)
    rebuilt = build_from_checkpoint(load_checkpoint(path), str(path))
    rebuilt.load_state_dict(payload["model"])
    assert fingerprint(rebuilt) == fingerprint(model)
    del payload["stream_version"]  # checkpoints from before the field
    assert fingerprint(build_from_checkpoint(payload, str(path))) == fingerprint(_small())
    payload["stream_version"] = 2
    with pytest.raises(CheckpointError, match=rf"^{path}: written for random stream version 2; this seedslot "
                                              r"generates stream version 1"):
        build_from_checkpoint(payload, str(path))
