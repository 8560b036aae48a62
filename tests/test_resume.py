"""A training run killed with SIGKILL (or stopped with Ctrl-C) at an arbitrary step and resumed ends
bit-identical to one that was never interrupted: real child processes, real signals."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from seedslot.checkpoints import CheckpointError, load_checkpoint

from test_data import write_mnist

ENV = dict(os.environ, SEEDSLOT_COMPILE="0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    write_mnist(d, n_train=1200, n_test=50)
    return str(d)


def _cmd(data_dir, out, *extra):
    return [sys.executable, "-m", "seedslot", "train", "--dataset", "mnist", "--data-dir", data_dir,
            "--epochs", "2", "--batch-size", "16", "--k", "4", "--threads", "1", "--no-progress",
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
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def _assert_same_final_state(a, b):
    pa, pb = (load_checkpoint(os.path.join(d, "last.ckpt")) for d in (a, b))
    assert pa["global_step"] == pb["global_step"] and pa["epoch"] == pb["epoch"] == 2
    assert pa["model"].keys() == pb["model"].keys()
    for key, t in pa["model"].items():
        assert torch.equal(t, pb["model"][key]) if isinstance(t, torch.Tensor) else t == pb["model"][key], key
    sa, sb = pa["optimizer"]["state"], pb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) and sa[i]["step"] == sb[i]["step"]
    assert torch.equal(pa["rng"], pb["rng"])


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(_cmd(data_dir, out), env=ENV, check=True, capture_output=True, timeout=240)
    return out


def test_sigkill_at_an_arbitrary_step_then_resume_is_bit_identical(data_dir, uninterrupted, tmp_path):
    step = random.Random().randint(5, 110)  # 63 steps an epoch: either epoch, any step
    assert _interrupt_at(data_dir, tmp_path, signal.SIGKILL, step) == -signal.SIGKILL
    killed_at = _step(tmp_path)
    assert killed_at >= step  # the last good checkpoint is readable
    r = subprocess.run(_cmd(data_dir, tmp_path, "--resume", str(tmp_path)), env=ENV, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {tmp_path}" in r.stdout
    _assert_same_final_state(uninterrupted, tmp_path)


def test_ctrl_c_saves_exits_130_and_resumes_identically(data_dir, uninterrupted, tmp_path):
    assert _interrupt_at(data_dir, tmp_path, signal.SIGINT, 20) == 130
    assert 20 <= _step(tmp_path) < 126
    r = subprocess.run(_cmd(data_dir, tmp_path, "--resume", str(tmp_path)), env=ENV, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_final_state(uninterrupted, tmp_path)


def test_resume_of_a_missing_or_corrupt_checkpoint_is_one_line_exit_2(data_dir, tmp_path):
    r = subprocess.run(_cmd(data_dir, tmp_path, "--resume", str(tmp_path)), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "last.ckpt" in r.stderr
    (tmp_path / "last.ckpt").write_bytes(b"SEEDSLOT" + b"\0" * 40)
    r = subprocess.run(_cmd(data_dir, tmp_path, "--resume", str(tmp_path)), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
