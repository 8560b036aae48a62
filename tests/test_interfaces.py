"""Interfaces users expect (issue #11 item 5): plain torch optimizers refuse seeded models with one
clear error, ``seedslot --version``, license and type marker shipped, the full-schedule notice of
``seedslot train``, and ``make test`` / ``make demo`` saying what they install."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seedslot as ss
from seedslot.app.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    import tomllib  # Python >= 3.11; on 3.10 these tests skip

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


needs_tomllib = pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib needs Python 3.11")


# ---------------------------------------------------------------- plain optimizers


def _step(model, opt, x):
    opt.zero_grad()
    F.mse_loss(model(x), torch.ones(len(x), 3)).backward()
    opt.step()


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_plain_torch_optimizer_on_a_seeded_model_says_use_slotsgd(optimizer, layer):
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), ss.SlotLinear(5, 3, k=4, seed=1)), torch.randn(4, 6)
    else:
        model = nn.Sequential(ss.SlotConv2d(2, 3, 3, k=4, seed=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        x = torch.randn(4, 2, 5, 5)
    state = lambda: {k: v.detach().clone() for k, v in (*model.named_parameters(), *model.named_buffers())}
    before = state()
    opt = optimizer(model.parameters(), lr=0.1)
    with pytest.raises(TypeError) as e:
        _step(model, opt, x)
    message = str(e.value)
    assert "seedslot.SlotSGD" in message and f"{optimizer.__name__} cannot train seeded slot layers" in message
    proxy = next(i for i, p in enumerate(model.parameters()) if p.stride().count(0) == p.dim() > 0)
    assert f"parameter {proxy} of param group 0 is slot_weight of Slot" in message
    after = state()  # refused before anything changed, the ordinary Linear included
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plain_optimizer_error_names_named_parameters():
    model = nn.Sequential(ss.SlotLinear(5, 3, k=4, seed=1))
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"parameter 0 '0\.slot_weight' of param group 0 .*SlotSGD"):
        _step(model, opt, torch.randn(2, 5))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("kind", ["plain", "dense"])
def test_plain_optimizers_still_train_plain_and_dense_reference_models(optimizer, kind):
    torch.manual_seed(0)
    second = nn.Linear(5, 3) if kind == "plain" else ss.DenseSlotLinear(5, 3, k=4, seed=1, bias=True)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), second)
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizer(model.parameters(), lr=0.1)
    _step(model, opt, torch.randn(4, 6))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_slotsgd_still_trains_a_seeded_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), ss.SlotLinear(5, 3, k=4, seed=1, scores="fp32"))
    scores = model[2].weight_scores.clone()
    _step(model, ss.SlotSGD(model.parameters(), lr=0.5), torch.randn(4, 6))
    assert not torch.equal(scores, model[2].weight_scores)


# ---------------------------------------------------------------- version, license, py.typed


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"seedslot {ss.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "seedslot", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"seedslot {ss.__version__}\n"


@needs_tomllib
def test_version_has_one_value_in_pyproject_and_package():
    assert _pyproject()["project"]["version"] == ss.__version__


@needs_tomllib
def test_mit_license_and_py_typed_are_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) the seedslot authors" in text
    project = _pyproject()
    assert project["project"]["license"] == "MIT" and project["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "seedslot" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["seedslot"]


# ---------------------------------------------------------------- train's full-schedule notice


@pytest.fixture()
def fake_run(monkeypatch, capsys):
    """seedslot.app.train.run replaced: records what had been printed when training would start."""
    printed = []

    def run(config, progress=True):
        printed.append(capsys.readouterr().out)
        return {"interrupted": False}

    monkeypatch.setattr("seedslot.app.train.run", run)
    return printed


@pytest.mark.parametrize("args, epochs, what", [
    ([], 120, "lenet with greedy selection"),
    (["--selection", "sample"], 160, "lenet with sample selection"),
    (["--model", "conv4", "--dataset", "cifar10"], 140, "conv4 with greedy selection"),
    (["--model", "conv6", "--dataset", "cifar10", "--selection", "sample"], 180, "conv6 with sample selection"),
    (["--mode", "learned"], 120, "lenet"),
])
def test_train_without_epochs_says_it_runs_the_full_schedule(args, epochs, what, fake_run):
    assert main(["train", *args, "--no-progress"]) == 0
    assert fake_run == [f"seedslot train: no --epochs given: running the paper's full schedule, {epochs} epochs "
                        f"for {what}; shorten it with --epochs N\n"]


@pytest.mark.parametrize("args", [["--epochs", "3"], ["--random-selection"], ["--resume", "somewhere"]])
def test_no_schedule_notice_with_epochs_resume_or_random_selection(args, fake_run):
    assert main(["train", *args, "--no-progress"]) == 0
    assert fake_run == [""]


# ---------------------------------------------------------------- make test / make demo


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _make(tmp_path, *args, pytest_rc=0, apt_rc=100):
    """make in a copy of the Makefile, with a fake venv python (exits pytest_rc) and a fake apt-get
    (prints a Debian-style error and exits apt_rc); Fashion-MNIST is looked for in tmp_path/fm."""
    work = tmp_path / "work"
    (work / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    for name, body in (("python", f"exit {pytest_rc}"),
                       ("apt-get", f"echo 'E: Unable to locate package dataset-fashion-mnist' >&2; exit {apt_rc}")):
        (work / "bin" / name).write_text(f"#!/bin/sh\n{body}\n")
        (work / "bin" / name).chmod(0o755)
    (work / "bin" / "seedslot").symlink_to(work / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "-s", f"BIN={work / 'bin'}", f"APT_GET={work / 'bin' / 'apt-get'}",
                           f"FASHION={tmp_path / 'fm'}", *args], cwd=work, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120)


@needs_make
@pytest.mark.skipif(os.geteuid() != 0 and shutil.which("sudo") is None, reason="installs through sudo")
@pytest.mark.parametrize("pytest_rc, ok", [(0, True), (1, False), (5, True)])  # 5: no tests collected
def test_make_test_says_what_it_installs_and_why_tests_skip(tmp_path, pytest_rc, ok):
    r = _make(tmp_path, "test", pytest_rc=pytest_rc)
    assert (r.returncode == 0) == ok, r.stderr  # pytest's failure is make's (status 2)
    lines = r.stdout.splitlines()
    assert "apt-get install -y dataset-fashion-mnist (Debian package, into " in lines[0]
    assert lines[1].startswith("could not install dataset-fashion-mnist (")
    assert lines[1].endswith("): the tests that need the real Fashion-MNIST will skip")
    if os.geteuid() == 0:
        assert lines[1] == ("could not install dataset-fashion-mnist (E: Unable to locate package "
                            "dataset-fashion-mnist): the tests that need the real Fashion-MNIST will skip")


@needs_make
def test_make_test_installs_nothing_when_fashion_mnist_is_there(tmp_path):
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").touch()
    r = _make(tmp_path, "test")
    assert r.returncode == 0 and "install" not in r.stdout + r.stderr


@needs_make
def test_make_demo_stops_with_the_reason_when_the_install_fails(tmp_path):
    r = _make(tmp_path, "demo")
    assert r.returncode != 0
    assert "apt-get install -y dataset-fashion-mnist (Debian package" in r.stdout
    assert "could not install dataset-fashion-mnist (" in r.stderr and "seedslot demo --data-dir DIR" in r.stderr
