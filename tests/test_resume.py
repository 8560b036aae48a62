"""A training run killed with SIGKILL (or stopped with Ctrl-C) at an arbitrary step and resumed ends
bit-identical to one that was never interrupted: real child processes, real signals."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from seedslot.checkpoints import CheckpointError, load_checkpoint
from seedslot.app.cli import main

from test_data import write_mnist

ENV = dict(os.environ, SEEDSLOT_COMPILE="0")
STEPS = 32  # per epoch: 600 examples, 15% of them validation, batches of 16
# conv2: its dropout draws from the global RNG, which a checkpoint must carry
# what a summary holds besides timings, memory peaks and where it was written
SAME = ("test_accuracy", "test_loss", "val_accuracy", "epochs", "global_steps", "interrupted", "state_bytes",
        "connections", "build_args")
TIMING = ("seconds", "peak_rss_bytes")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    write_mnist(d, n_train=600, n_test=50)
    return str(d)


def _cmd(data_dir, out, *extra):
    return [sys.executable, "-m", "seedslot", "train", "--dataset", "mnist", "--data-dir", data_dir,
            "--model", "conv2", "--epochs", "2", "--batch-size", "16", "--k", "4", "--threads", "1", "--no-progress",
            "--checkpoint-every-steps", "1", "--out", str(out), *extra]


def _step(out) -> int:
    try:
        return int(load_checkpoint(os.path.join(out, "last.ckpt"))["global_step"])
    except (FileNotFoundError, CheckpointError):
        return -1


def _interrupt_at(data_dir, out, sig, step: int) -> int:
    """Start a run, deliver ``sig`` once its checkpoint has reached ``step``; returns its exit status."""
    proc = subprocess.Popen(_cmd(data_dir, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _step(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def _resume(data_dir, out):
    r = subprocess.run(_cmd(data_dir, out, "--resume", str(out)), env=ENV, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {out}" in r.stdout


def _metrics(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_same_final_state(a, b):
    """Scores, momentum buffers, RNG, summary and metrics of two finished runs agree bit for bit."""
    pa, pb = (load_checkpoint(str(d / "last.ckpt")) for d in (a, b))
    assert pa["global_step"] == pb["global_step"] == 2 * STEPS and pa["epoch"] == pb["epoch"] == 2
    assert pa["model"].keys() == pb["model"].keys()
    tensors = {k: t for k, t in pa["model"].items() if isinstance(t, torch.Tensor)}
    assert any(t.dtype == torch.int8 for t in tensors.values())  # the int8 scores are compared
    for key, t in pa["model"].items():
        assert torch.equal(t, pb["model"][key]) if key in tensors else t == pb["model"][key], key
    sa, sb = pa["optimizer"]["state"], pb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) and sa[i]["step"] == sb[i]["step"]
    assert pa["scheduler"] == pb["scheduler"] and torch.equal(pa["rng"], pb["rng"])

    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: sa[k] for k in SAME} == {k: sb[k] for k in SAME}
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in sa["history"]] == \
           [{k: v for k, v in r.items() if k not in TIMING} for r in sb["history"]]
    assert _metrics(a) == _metrics(b)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(_cmd(data_dir, out, "--json", str(out / "s.json")), env=ENV, check=True, capture_output=True,
                   timeout=240)
    return out


def test_json_summary_and_metrics(uninterrupted):
    s = json.loads((uninterrupted / "s.json").read_text())
    assert s == json.loads((uninterrupted / "summary.json").read_text())
    assert {"test_accuracy", "val_accuracy", "epochs", "seconds", "peak_rss_bytes", "state_bytes", "config"} <= set(s)
    assert 0.0 <= s["test_accuracy"] <= 1.0 and s["epochs"] == 2 and s["global_steps"] == 2 * STEPS
    assert s["interrupted"] is False and s["seconds"] > 0 and s["peak_rss_bytes"] > 2**20
    assert s["state_bytes"] > s["connections"] * (4 + 4 + 4)  # int8 scores (K=4) + momentum + gradient
    assert s["config"]["k"] == 4 and s["config"]["mode"] == "seeded" and s["config"]["epochs"] == 2
    vals = [r["val_accuracy"] for r in s["history"]]
    assert s["val_accuracy"] == dict(best=max(vals), best_epoch=vals.index(max(vals)) + 1, last=vals[-1])
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["epoch", "epoch", "test"]
    assert records[:2] == s["history"] and [r["global_step"] for r in records[:2]] == [STEPS, 2 * STEPS]
    assert records[2]["test_accuracy"] == s["test_accuracy"]


def test_sigkill_at_an_arbitrary_step_then_resume_is_bit_identical(data_dir, uninterrupted, tmp_path):
    step = random.Random().randint(3, 2 * STEPS - 3)  # either epoch, any step
    assert _interrupt_at(data_dir, tmp_path, signal.SIGKILL, step) == -signal.SIGKILL
    assert _step(tmp_path) >= step  # the last good checkpoint is readable
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if killed between an epoch's log and its save
        f.write(json.dumps(dict(kind="epoch", epoch=99)) + "\n")
    _resume(data_dir, tmp_path)
    _assert_same_final_state(uninterrupted, tmp_path)


def test_ctrl_c_saves_exits_130_and_resumes_identically(data_dir, uninterrupted, tmp_path):
    assert _interrupt_at(data_dir, tmp_path, signal.SIGINT, STEPS - 8) == 130
    at = _step(tmp_path)
    assert STEPS - 8 <= at < 2 * STEPS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["test_accuracy"] is None and summary["global_steps"] == at
    _resume(data_dir, tmp_path)
    _assert_same_final_state(uninterrupted, tmp_path)


def test_resume_of_a_missing_or_corrupt_checkpoint_is_one_line_exit_2(data_dir, tmp_path, capsys):
    args = _cmd(data_dir, tmp_path, "--resume", str(tmp_path))[3:]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("seedslot: error: ") and err.count("\n") == 1 and "last.ckpt" in err
    (tmp_path / "last.ckpt").write_bytes(b"SEEDSLOT" + b"\0" * 40)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("seedslot: error: ") and err.count("\n") == 1 and "last.ckpt" in err


def test_sigterm_saves_like_ctrl_c_and_resumes_identically(data_dir, uninterrupted, tmp_path):
    """Issue 24, item 11: what schedulers and Kubernetes send."""
    assert _interrupt_at(data_dir, tmp_path, signal.SIGTERM, STEPS - 8) == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["global_steps"] == _step(tmp_path) >= STEPS - 8
    _resume(data_dir, tmp_path)
    _assert_same_final_state(uninterrupted, tmp_path)


def _small(data_dir, out, *extra):
    return ["train", "--dataset", "mnist", "--data-dir", data_dir, "--epochs", "1", "--batch-size", "64", "--k", "2",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


def test_out_is_locked_and_a_run_in_it_is_not_replaced_unless_told(data_dir, tmp_path, capsys):
    """Issue 24, item 9: one run per --out at a time; a new run into a run's directory needs --overwrite."""
    from seedslot.app.train import _lock_dir, _unlock_dir

    out = tmp_path / "run"
    out.mkdir()
    held = _lock_dir(str(out))  # another run holds it
    assert main(_small(data_dir, out)) == 2
    assert "is in use by another seedslot run" in capsys.readouterr().err
    _unlock_dir(str(out), held)
    assert main(_small(data_dir, out)) == 0
    first = (out / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert main(_small(data_dir, out, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and f"--resume {out}" in err
    assert (out / "last.ckpt").read_bytes() == first
    assert main(_small(data_dir, out, "--seed", "1", "--overwrite")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["epoch", "test"]  # the old run's lines are gone, not mixed in
    assert load_checkpoint(out / "last.ckpt")["config"]["seed"] == 1


def test_a_resumed_run_does_not_write_through_a_symlink_in_out(data_dir, tmp_path, capsys):
    """Issue 24, item 12: metrics appends and rewrites never follow a symlink placed in --out."""
    out = tmp_path / "run"
    assert main(_small(data_dir, out)) == 0
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.remove(out / "metrics.jsonl")
    (out / "metrics.jsonl").symlink_to(victim)
    capsys.readouterr()
    assert main(_small(data_dir, out, "--resume", str(out))) == 2
    assert "is a symlink" in capsys.readouterr().err and victim.read_text() == "precious"
