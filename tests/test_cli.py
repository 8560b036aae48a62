"""The ``seedslot`` command: a happy path on tiny IDX files, and bad input as one line with exit 2."""

import json
import os
import stat
import subprocess
import sys

import pytest

from seedslot.app.cli import main

from test_data import write_mnist


@pytest.fixture()
def mnist_dir(tmp_path):
    write_mnist(tmp_path / "mnist", n_train=60, n_test=20)
    return str(tmp_path / "mnist")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("seedslot") and ": error: " in err[0]  # "seedslot export: error: ..." too
    return err[0]


def test_demo_prints_int8_implicit_and_dense_side_by_side(mnist_dir, capsys):
    assert main(["demo", "--data-dir", mnist_dir, "--k", "2", "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out.split("Lenet-300-100 on Fashion-MNIST, K=2")[1].splitlines()
    per_conn = {line.split()[0]: float(line.split()[-1]) for line in out[2:5]}
    assert out[5].startswith("Expect a spread across seeds")
    assert per_conn["int8"] == pytest.approx(2 + 8, abs=0.01) and per_conn["implicit"] == pytest.approx(12, abs=0.01)
    assert per_conn["dense"] >= 16 * 2


def test_train_on_tiny_idx_files(mnist_dir, tmp_path, capsys):
    summary = tmp_path / "s.json"
    argv = ["train", "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "2", "--batch-size", "16",
            "--k", "4", "--json", str(summary), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "config: " in out and "epoch 2/2" in out and "normalize=unit" in out  # the paper's MNIST choice
    s = json.loads(summary.read_text())
    assert s["epochs"] == 2 and s["config"]["k"] == 4 and s["config"]["data_dir"] == mnist_dir


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["train", "--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
    (["train", "--mode", "sparse"], "argument --mode: invalid choice: 'sparse'"),
    (["train", "--k", "eight"], "argument --k: invalid int value"),
    (["train", "--k", "0", "--data-dir", "{data}"], "k must be an int >= 1; got 0"),
    (["train", "--mode", "learned", "--k", "8", "--data-dir", "{data}"], "k applies to the slot modes"),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/nowhere"], "data directory {tmp}/nowhere does not exist"),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}"], "mnist: missing {tmp}/train-images-idx3-ubyte[.gz]"),
    (["train", "--dataset", "cifar10"], "cifar10: no default data directory"),
    (["train", "--dataset", "mnist", "--data-dir", "{data}", "--finetune-from", "{tmp}/none.ckpt"], "none.ckpt"),
    (["train", "--dataset", "mnist", "--data-dir", "{data}", "--finetune-from", "{tmp}/junk.ckpt"], "junk.ckpt"),
    (["train", "--dataset", "mnist", "--data-dir", "{data}", "--resume", "{tmp}"], "last.ckpt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["export", "{tmp}/junk.ckpt", "--out", "{tmp}/m.slot"], "junk.ckpt"),
    (["bench", "nonsense"], "invalid choice: 'nonsense'"),
    (["train", "--selection", "sample", "--weight-decay", "0.02", "--data-dir", "{data}"],
     "lr * weight_decay must be < 1"),
    (["train", "--dataset", "mnist", "--data-dir", "{data}", "--checkpoint-every-steps", "1"],
     "checkpoint_every_steps saves into out"),
    (["train", "--dataset", "mnist", "--data-dir", "{data}", "--json", "{tmp}/nowhere/s.json", "--out", "{tmp}/o"],
     "json: directory {tmp}/nowhere does not exist"),
    (["train", "--dataset", "mnist", "--data-dir", "{data}/train-images-idx3-ubyte.gz"], "is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, mnist_dir, tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    fill = dict(data=mnist_dir, tmp=str(tmp_path))
    assert main([a.format(**fill) for a in argv]) == 2
    assert message.format(**fill) in _error_line(capsys)
    assert not (tmp_path / "m.slot").exists()


def test_no_traceback_from_the_real_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "seedslot", "train", "--dataset", "mnist", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "train-images-idx3-ubyte" in r.stderr


def test_help_exits_0():
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0


def test_outputs_are_regular_files_only_one_line_exit_2(mnist_dir, tmp_path, capsys):
    """Issue 24, items 1 and 16: --json at a FIFO, a symlink or "" and ``export --out /`` are refused
    before anything is written, naming the path the user gave; nothing replaces what was there."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "victim").write_text("precious")
    (tmp_path / "link.json").symlink_to(tmp_path / "victim")
    base = ["train", "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "1", "--k", "2", "--no-progress"]
    for target, words in ((tmp_path / "fifo", "is a FIFO"), (tmp_path / "link.json", "is a symlink"),
                          ("", "not a file path")):
        assert main([*base, "--json", str(target)]) == 2
        line = _error_line(capsys)
        assert words in line and line.count("json") >= 1
    assert main([*base, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    before = set(os.listdir("/"))
    assert main(["export", str(tmp_path / "run" / "last.ckpt"), "--out", "/"]) == 2
    assert "'/'" in _error_line(capsys) and set(os.listdir("/")) == before
    assert (tmp_path / "victim").read_text() == "precious" and os.path.islink(tmp_path / "link.json")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)


def test_odd_input_is_one_line_and_exit_2(mnist_dir, tmp_path, capsys, monkeypatch):
    """Issue 24, item 16: --threads without bound, WORLD_SIZE that is not a number."""
    base = ["train", "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "1", "--k", "2", "--no-progress"]
    for n in ("100000", "20000"):
        assert main([*base, "--threads", n]) == 2
        assert "threads must be an int in [1, " in _error_line(capsys)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert main(base) == 2
    assert "environment variable WORLD_SIZE must be an int >= 0; got 'abc'" in _error_line(capsys)


def test_progress_bar_only_on_a_terminal(mnist_dir, capsys):
    """Issue 24, item 16: a batch job's log gets a line per epoch, not every bar refresh."""
    argv = ["train", "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "2", "--batch-size", "8", "--k", "2",
            "--threads", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "batch/s" not in err and "\r" not in err and "epoch 1/2" in out and "epoch 2/2" in out
