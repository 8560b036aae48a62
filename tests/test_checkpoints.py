"""Training checkpoints: exact round trip, safe loading, integrity checks, atomic writes."""

import functools
import json
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import seedslot
from seedslot.checkpoints import (
    CHECKPOINT_MAGIC,
    CHECKPOINT_VERSION,
    CheckpointError,
    frame,
    load_checkpoint,
    load_state_into,
    save_checkpoint,
)


def _model(k: int = 4, scores: str = "int8") -> nn.Module:
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    return seedslot.slotify_(net, k=k, seed=3, scores=scores)


def _trained():
    torch.manual_seed(0)
    model = _model()
    opt = seedslot.SlotSGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(8, 5)).logsumexp(1).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _payload(model, opt, sched) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "generator": torch.Generator().manual_seed(5).get_state()},
        "epoch": 2,
        "step": 17,
        "config": {"lr": 0.1, "k": 4, "name": "tiny", "nesterov": False, "limit": None, "sizes": [1, (2, 3)]},
        "build_args": {"name": "tiny", "k": 4},
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_round_trip_restores_training_exactly(tmp_path):
    model, opt, sched = _trained()
    payload = _payload(model, opt, sched)
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    assert _same(payload, loaded)

    # A fresh model/optimizer/scheduler restored from the file continues exactly like the original.
    model2 = _model()
    opt2 = seedslot.SlotSGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    load_state_into(model2, loaded["model"])
    load_state_into(opt2, loaded["optimizer"])
    load_state_into(sched2, loaded["scheduler"])
    x = torch.randn(8, 5)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        m(x).logsumexp(1).sum().backward()
        o.step()
        s.step()
    assert _same(model.state_dict(), model2.state_dict())
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_payload_with_arbitrary_objects_is_refused_before_writing(tmp_path):
    path = tmp_path / "c.ckpt"
    for bad, where in (({"model": nn.Linear(2, 2)}, "['model']"), ({"x": [1, {"f": print}]}, "['x'][1]['f']")):
        with pytest.raises(ValueError, match=r"payload\[.*: must hold only tensors") as info:
            save_checkpoint(path, bad)
        assert where in str(info.value)
    with pytest.raises(ValueError, match="payload must be a dict"):
        save_checkpoint(path, [1, 2])
    assert not os.listdir(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.mkdir, (os.environ["SEEDSLOT_TEST_EVIL_DIR"],))


def test_loading_never_unpickles_objects(tmp_path, monkeypatch):
    """A file with a valid hash whose pickle would run code is refused, and the code never runs."""
    evil_dir = tmp_path / "pwned"
    monkeypatch.setenv("SEEDSLOT_TEST_EVIL_DIR", str(evil_dir))
    buf = io.BytesIO()
    torch.save({"model": _Evil()}, buf)
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"".join(frame(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, [buf.getvalue()])))
    with pytest.raises(CheckpointError, match="tampered or unsafe"):
        load_checkpoint(path)
    assert not evil_dir.exists()


def test_error_messages_say_which_case(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"w": torch.arange(100), "epoch": 1})
    good = path.read_bytes()
    cases = {
        "truncated": [b"", good[:5], good[:40], good[:-1]],
        "corrupted or tampered": [good[:-2] + bytes([good[-2] ^ 4]) + good[-1:], good[:30] + bytes([good[30] ^ 1]) + good[31:]],
        "corrupted: 1 unexpected bytes": [good + b"\0"],
        "newer format version 2": [good[:8] + (2).to_bytes(4, "little") + good[12:]],
        "not a seedslot checkpoint": [b"PK\x03\x04" + good[4:], b"hello"],
    }
    for words, variants in cases.items():
        for data in variants:
            path.write_bytes(data)
            with pytest.raises(CheckpointError, match=words):
                load_checkpoint(path)


@functools.cache
def _good_bytes(tmp_dir) -> bytes:
    path = tmp_dir / "good.ckpt"
    model, opt, _ = _trained()
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3})
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_flip_or_truncation_is_detected(tmp_path, data):
    path = tmp_path / "c.ckpt"
    good = _good_bytes(tmp_path)
    if data.draw(st.booleans(), label="truncate"):
        bad = good[: data.draw(st.integers(0, len(good) - 1), label="length")]
    else:
        pos = data.draw(st.integers(0, len(good) - 1), label="position")
        bad = bytearray(good)
        bad[pos] ^= data.draw(st.integers(1, 255), label="mask")
    path.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_state_that_does_not_fit_the_model(tmp_path):
    model, opt, _ = _trained()
    sd = model.state_dict()
    cases = [
        (_model(k=5), sd),  # other K: other score shapes
        (_model(scores="fp32"), sd),  # int8 scores into fp32 buffers: load_state_dict would cast
        (_model(), {k: v for k, v in sd.items() if "running_mean" not in k}),
        (_model(), {**sd, "extra.weight": torch.zeros(1)}),
        (nn.Linear(5, 4), sd),
    ]
    for target, state in cases:
        with pytest.raises(CheckpointError, match="does not fit the model"):
            load_state_into(target, state)
    other = seedslot.SlotSGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_state_into(other, opt.state_dict())
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_state_into(_model(), [1, 2])


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(10)})

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash in {failing}")

    if failing == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                boom()

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(10)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from seedslot.checkpoints import save_checkpoint
    path, size = sys.argv[1], int(sys.argv[2])
    step = 0
    while True:
        step += 1
        save_checkpoint(path, {"step": step, "w": torch.full((size,), float(step))})
        if step == 1:
            print("ready", flush=True)
    """
)


def test_sigkill_while_writing_leaves_a_readable_checkpoint(tmp_path):
    """A real child process rewriting a 16 MB checkpoint in a loop is killed at an arbitrary moment."""
    path = tmp_path / "last.ckpt"
    size = 4 << 20
    env = {**os.environ, "SEEDSLOT_COMPILE": "0"}
    rng = torch.Generator().manual_seed(int(time.time()))
    for delay in torch.rand(2, generator=rng).tolist():
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(size)],
                                 stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline().strip() == b"ready"
            time.sleep(0.4 * delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        payload = load_checkpoint(path)
        assert payload["step"] >= 1 and torch.equal(payload["w"], torch.full((size,), float(payload["step"])))
        # A leftover of the interrupted write is a hidden temporary file, never the checkpoint's name,
        # and it is rejected by the loader unless it happens to be complete.
        for name in os.listdir(tmp_path):
            if name == "last.ckpt":
                continue
            assert name.startswith(".last.ckpt.") and name.endswith(".tmp"), name
            try:
                load_checkpoint(tmp_path / name)
            except CheckpointError as e:
                assert "truncated" in str(e)
            os.unlink(tmp_path / name)


# ---------------------------------------------------------------- hostile fields behind a valid hash


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from test_data import write_mnist

    d = tmp_path_factory.mktemp("run")
    write_mnist(d / "mnist", n_train=40, n_test=10)
    from seedslot.app.train import TrainConfig, run

    run(TrainConfig(dataset="mnist", data_dir=str(d / "mnist"), epochs=1, batch_size=16, k=2, threads=1,
                    out=str(d / "out")), progress=False)
    return str(d / "mnist"), load_checkpoint(d / "out" / "last.ckpt")


def _tampered(ckpt, path, value, tmp) -> str:
    """A copy of the run's checkpoint in a fresh folder with the field at ``path`` set to ``value``
    (save_checkpoint recomputes the hash)."""
    import copy

    payload = copy.deepcopy(ckpt)
    node = payload
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    out = os.path.join(tmp, "run")
    os.makedirs(out)
    save_checkpoint(os.path.join(out, "last.ckpt"), payload)
    return out


def _resume(data_dir, out):
    from seedslot.app.train import TrainConfig, run

    return run(TrainConfig(resume=out, data_dir=data_dir, threads=1), progress=False)


FIELDS = [
    ("build_args", "k"), ("build_args", "input_size"), ("build_args", "in_channels"), ("build_args", "num_classes"),
    ("build_args", "name"), ("build_args", "mode"), ("build_args", "scores"), ("build_args", "sharing"),
    ("build_args", "seed"), ("build_args", "score_lambda"), ("build_args",), ("build_args", "config"),
    ("build_args", "config", "k"), ("build_args", "config", "seed"), ("build_args", "config", "incremental"),
    ("optimizer", "param_groups", 0, "lr"), ("optimizer", "param_groups", 0, "momentum"),
    ("optimizer", "param_groups", 0, "weight_decay"), ("optimizer", "state", 0, "momentum_buffer"),
    ("optimizer", "state", 0, "step"), ("optimizer", "state", 0), ("optimizer", "param_groups"),
    ("model", "classifier.0._extra_state"), ("model", "classifier.0.weight_scale"),
    ("model", "classifier.0.weight_scores"), ("model", "classifier.2.draws"), ("model",),
    ("scheduler", "gamma"), ("scheduler", "base_lrs"), ("epoch",), ("step_in_epoch",), ("global_step",),
    ("tally", "loss_sum"), ("tally", "history"), ("tally",), ("rng",),
]
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2, 100000, 10**9, 2**31]),
    st.floats(), st.text(max_size=4), st.just([]), st.just({}), st.just([1.0, float("nan")]),
    st.sampled_from([torch.zeros(3), torch.tensor(float("nan")), torch.tensor(-1.0), torch.zeros(2, 2, dtype=torch.int8),
                     torch.zeros(7, 1, dtype=torch.uint8)]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=HOSTILE)
def test_fuzzed_fields_with_a_recomputed_hash_resume_or_raise_checkpoint_error(finished_run, field, value):
    import tempfile

    data_dir, ckpt = finished_run
    with tempfile.TemporaryDirectory() as tmp:
        out = _tampered(ckpt, field, value, tmp)
        t0 = time.monotonic()
        try:
            _resume(data_dir, out)
        except CheckpointError as e:
            assert "\n" not in str(e) and "last.ckpt" in str(e)
        assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("field, value, words", [
    (("optimizer", "state", 0, "momentum_buffer"), torch.zeros(3), "momentum_buffer"),
    (("model", "classifier.0._extra_state"), "seed", "_extra_state"),
    (("optimizer", "param_groups", 0, "lr"), float("nan"), "lr"),
    (("build_args", "input_size"), 100000, "input_size"),
    (("build_args", "config", "k"), 10**9, "k=1000000000"),
    (("build_args", "config", "sharing"), "bogus", "build_args.config: sharing"),
    (("model", "classifier.0.weight_scale"), torch.tensor(-1.0), "weight_scale"),
    (("epoch",), 5, "epoch must be"),
])
def test_tampered_fields_are_named(finished_run, tmp_path, field, value, words):
    data_dir, ckpt = finished_run
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=words):
        _resume(data_dir, _tampered(ckpt, field, value, str(tmp_path)))
    assert time.monotonic() - t0 < 20


def test_a_resumed_run_never_writes_where_the_checkpoint_says(finished_run, tmp_path, monkeypatch):
    """Issue 24, item 3: the checkpoint's stored json path (absolute or relative to the new working
    directory) is not honoured; a resumed run writes inside its --out and to its own --json only."""
    data_dir, ckpt = finished_run
    victims = [tmp_path / "victim.txt", tmp_path / "cwd" / "relative.txt"]
    (tmp_path / "cwd").mkdir()
    for v in victims:
        v.write_text("precious")
    monkeypatch.chdir(tmp_path / "cwd")
    for n, target in enumerate([str(victims[0]), "relative.txt"]):
        out = _tampered(ckpt, ("config", "json"), target, str(tmp_path / f"t{n}"))
        _resume(data_dir, out)
        assert os.path.exists(os.path.join(out, "summary.json"))
    assert all(v.read_text() == "precious" for v in victims)
    from seedslot.app.train import TrainConfig, run

    mine = tmp_path / "mine.json"
    run(TrainConfig(resume=out, data_dir=data_dir, threads=1, json=str(mine)), progress=False)
    assert json.loads(mine.read_text())["epochs"] == 1


@pytest.mark.parametrize("history", [[{"val_accuracy": "x"}], [], [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 2.0,
                                     "val_loss": None, "val_accuracy": None, "seconds": 1.0}], [[]] * 1])
def test_a_tampered_tally_history_fails_at_resume_naming_it(finished_run, tmp_path, history):
    """Issue 24, item 14: not later, in the summary or the metrics rewrite, with a traceback."""
    data_dir, ckpt = finished_run
    with pytest.raises(CheckpointError, match=r"tally\['history'\]"):
        _resume(data_dir, _tampered(ckpt, ("tally", "history"), history, str(tmp_path)))
