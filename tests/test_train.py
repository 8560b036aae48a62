"""Training runs end to end: real Fashion-MNIST slices, baselines, fine-tuning, resolved defaults."""

import json
import os

import pytest
import torch

from seedslot import to_dense
from seedslot.checkpoints import load_checkpoint, load_state_into
from seedslot.models import build
from seedslot.app.train import TrainConfig, resolve, run

FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
                                   reason="no Fashion-MNIST (apt-get install dataset-fashion-mnist)")

SUMMARY_KEYS = {"test_accuracy", "val_accuracy", "epochs", "seconds", "peak_rss_bytes", "state_bytes", "config"}


def test_resolve_fills_in_the_papers_defaults():
    c = resolve(TrainConfig(model="lenet"))
    assert (c.mode, c.k, c.selection, c.sharing, c.scores) == ("seeded", 8, "greedy", "none", "int8")
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (120, 128, 0.1, 0.9, 0.0)
    assert resolve(TrainConfig(k=16)).lr == 0.01
    s = resolve(TrainConfig(model="conv6", selection="sample"))
    assert (s.lr, s.epochs) == (25.0, 180)
    v = resolve(TrainConfig(model="vgg19", dataset="cifar10"))
    assert (v.weight_decay, v.lr_milestones, v.epochs) == (1e-4, [80], 120)
    learned = resolve(TrainConfig(mode="learned", model="vgg19", dataset="cifar10"))
    assert (learned.k, learned.lr) == (None, 0.1)


@pytest.mark.parametrize("config, message", [
    (dict(model="resnet"), "model must be one of 'lenet'"),
    (dict(mode="sparse"), "mode must be one of 'seeded', 'dense', 'learned'"),
    (dict(k=0), "k must be an int >= 1"),
    (dict(mode="learned", k=8), "k applies to the slot modes"),
    (dict(mode="dense", scores="int8"), "scores applies to mode 'seeded' only"),
    (dict(lr=-1.0), "lr must be a finite number"),
    (dict(momentum=1.0), "momentum must be a finite number in \\[0.0, 1.0\\)"),
    (dict(random_selection=True, epochs=3), "epochs does not apply"),
    (dict(selection="best"), "selection must be one of 'greedy', 'sample'"),
    (dict(scores="int4"), "scores must be one of 'int8', 'fp32', 'implicit'"),
    (dict(scores="implicit", random_selection=True), "random_selection needs stored scores"),
    (dict(selection="sample", weight_decay=0.02), "lr \\* weight_decay must be < 1 for mode 'seeded'"),
    (dict(lr=0.5, weight_decay=1.0, lr_milestones=[2], lr_gamma=4.0), "peak lr 2,"),
])
def test_resolve_rejects_bad_input(config, message):
    with pytest.raises(ValueError, match=message):
        resolve(TrainConfig(**config))


@needs_fashion
def test_seeded_lenet_learns_and_writes_its_summary(tmp_path):
    out = tmp_path / "run"
    s = run(TrainConfig(epochs=1, limit_train=6000, threads=1, out=str(out), json=str(tmp_path / "s.json")),
            progress=False)
    assert s["test_accuracy"] > 0.6  # chance is 0.1; one pass over 5100 examples reaches ~70%
    assert SUMMARY_KEYS <= set(s) and {"best", "last"} <= set(s["val_accuracy"])
    assert s["epochs"] == 1 and s["config"]["mode"] == "seeded" and s["config"]["scores"] == "int8"
    # int8 scores (K bytes) + fp32 momentum (4) + fp32 gradient (4) per connection, plus per-layer constants
    assert 16.0 <= s["bytes_per_connection"] < 16.01
    assert json.loads((tmp_path / "s.json").read_text())["test_accuracy"] == s["test_accuracy"]
    assert json.loads((out / "summary.json").read_text())["config"] == s["config"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["epoch", "test"]
    assert records[0]["val_accuracy"] == s["val_accuracy"]["last"]

    # the checkpoint holds the trained model: reloading it gives the same test accuracy
    payload = load_checkpoint(str(out / "last.ckpt"))
    model = build(**payload["build_args"])
    load_state_into(model, payload["model"])
    first = model.classifier[0]
    assert first.weight_scores.dtype == torch.int8 and first.weight_scores.shape == (300, 784, 8)


@needs_fashion
def test_dense_reference_and_learned_baseline_run(tmp_path):
    common = dict(epochs=1, limit_train=6000, threads=1)
    dense = run(TrainConfig(mode="dense", **common), progress=False)
    learned = run(TrainConfig(mode="learned", **common), progress=False)
    assert dense["test_accuracy"] > 0.5 and learned["test_accuracy"] > 0.6
    assert dense["bytes_per_connection"] > 8 * 16  # K fp32 candidates, scores, grads, momentum
    assert learned["config"]["k"] is None


@needs_fashion
def test_implicit_scores_train_and_resume_from_their_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = dict(epochs=1, limit_train=6000, threads=1, scores="implicit")
    s = run(TrainConfig(out=str(out), **common), progress=False)
    assert s["test_accuracy"] > 0.6 and s["config"]["scores"] == "implicit"
    assert 12.0 <= s["bytes_per_connection"] < 12.01  # drift, momentum, gradient: 4 bytes each, any K
    payload = load_checkpoint(str(out / "last.ckpt"))
    assert payload["model"]["classifier.0.weight_drift"].shape == (300, 784)
    more = run(TrainConfig(resume=str(out), epochs=2, threads=1), progress=False)
    assert more["epochs"] == 2 and more["config"]["scores"] == "implicit"
    with pytest.raises(Exception, match="does not fit the model"):  # int8 scores cannot take a drift
        load_state_into(build("lenet", mode="seeded", k=8), payload["model"])


@needs_fashion
def test_random_selection_trains_nothing_and_selects_one_candidate_per_connection(tmp_path):
    s = run(TrainConfig(random_selection=True, limit_train=6000, threads=1, json=str(tmp_path / "r.json")),
            progress=False)
    assert s["epochs"] == 0 and s["history"] == []
    assert 0.0 < s["test_accuracy"] < 0.6  # random weights: far below a trained network
    assert s["val_accuracy"]["last"] is not None


@needs_fashion
def test_finetune_starts_from_the_selected_network(tmp_path):
    out = tmp_path / "slot"
    slot = run(TrainConfig(epochs=1, limit_train=6000, threads=1, out=str(out)), progress=False)
    ckpt = str(out / "last.ckpt")
    # fine-tuning's starting point is to_dense of the trained slot machine: same test accuracy
    payload = load_checkpoint(ckpt)
    model = build(**payload["build_args"])
    load_state_into(model, payload["model"])
    dense = to_dense(model)
    x = torch.randn(16, 1, 28, 28)
    model.eval(), dense.eval()
    assert torch.equal(model(x), dense(x))

    ft = run(TrainConfig(finetune_from=ckpt, epochs=1, limit_train=6000, threads=1, lr=0.01), progress=False)
    assert ft["config"]["mode"] == "learned" and ft["build_args"]["mode"] == "learned"
    assert ft["test_accuracy"] > slot["test_accuracy"] - 0.05  # weight training from there does not lose it

    with pytest.raises(ValueError, match="holds a lenet model"):
        run(TrainConfig(model="conv2", finetune_from=ckpt, epochs=1, limit_train=6000), progress=False)


# ---------------------------------------------------------------- careless input around a run


@pytest.fixture()
def tiny(tmp_path):
    from test_data import write_mnist

    write_mnist(tmp_path / "mnist", n_train=40, n_test=10)
    return dict(dataset="mnist", data_dir=str(tmp_path / "mnist"), batch_size=16, k=4, threads=1)


def test_resumed_finished_run_reports_the_in_step_state_bytes(tiny, tmp_path):
    out = str(tmp_path / "run")
    first = run(TrainConfig(epochs=1, out=out, **tiny), progress=False)
    again = run(TrainConfig(resume=out, data_dir=tiny["data_dir"], threads=1), progress=False)
    assert again["state_bytes"] == first["state_bytes"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["state_bytes"] == first["state_bytes"]


def test_resume_removes_a_temporary_checkpoint_left_by_a_kill(tiny, tmp_path):
    out = tmp_path / "run"
    run(TrainConfig(epochs=1, out=str(out), **tiny), progress=False)
    stale = out / ".last.ckpt.abc123.tmp"
    stale.write_bytes((out / "last.ckpt").read_bytes())  # as a kill during the write leaves it
    run(TrainConfig(resume=str(out), data_dir=tiny["data_dir"], threads=1, epochs=2), progress=False)
    assert not stale.exists() and sorted(os.listdir(out)) == ["last.ckpt", "metrics.jsonl", "summary.json"]


def test_output_paths_are_checked_before_training(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"json: directory {tmp_path}/nowhere does not exist"):
        run(TrainConfig(epochs=1, out=str(out), json=str(tmp_path / "nowhere" / "s.json"), **tiny), progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="json: .* is a directory"):
        run(TrainConfig(epochs=1, json=str(tmp_path), **tiny), progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out: .*file is not a directory"):
        run(TrainConfig(epochs=1, out=str(tmp_path / "file"), **tiny), progress=False)


def test_resume_refuses_what_it_would_ignore(tiny, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="checkpoint_every_steps saves into out"):
        run(TrainConfig(epochs=1, checkpoint_every_steps=2, **tiny), progress=False)
    run(TrainConfig(epochs=2, out=out, **tiny), progress=False)
    with pytest.raises(ValueError, match="out='.*other': a resumed run continues in its own directory"):
        run(TrainConfig(resume=out, out=str(tmp_path / "other"), data_dir=tiny["data_dir"]), progress=False)
    with pytest.raises(ValueError, match="epochs must be >= the 2 epochs the checkpoint has done; got 1"):
        run(TrainConfig(resume=out, epochs=1, data_dir=tiny["data_dir"]), progress=False)
    assert not (tmp_path / "other").exists()


def test_resume_with_another_datasets_files_is_refused(tiny, tmp_path):
    """Issue 24, item 6: same format, same sizes, other examples (e.g. Fashion-MNIST's files given
    as --data-dir of an MNIST run)."""
    from test_data import write_mnist

    out = str(tmp_path / "run")
    run(TrainConfig(epochs=1, out=out, **tiny), progress=False)
    write_mnist(tmp_path / "other", n_train=40, n_test=10, seed=1)
    with pytest.raises(ValueError, match=f"data_dir: {tmp_path / 'other'} holds other mnist data"):
        run(TrainConfig(resume=out, data_dir=str(tmp_path / "other"), threads=1, epochs=2), progress=False)
    assert run(TrainConfig(resume=out, data_dir=tiny["data_dir"], threads=1, epochs=2), progress=False)["epochs"] == 2


def test_a_diverged_run_says_so_writes_json_and_keeps_the_last_finite_checkpoint(tiny, tmp_path, capsys):
    """Issue 24, item 8: exit status 1 and one line saying so, strict JSON (no bare NaN), and the
    last finite checkpoint, which the run's own --resume takes."""
    from seedslot.app.cli import main

    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--data-dir", tiny["data_dir"], "--mode", "learned", "--batch-size", "16",
            "--threads", "1", "--no-progress", "--out", str(out), "--json", str(tmp_path / "s.json"), "--epochs", "4",
            "--lr", "1e3", "--checkpoint-every-steps", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0]
    for path in (tmp_path / "s.json", out / "summary.json"):
        summary = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in {path}"))
        assert summary["diverged"] is True and summary["interrupted"] is False and summary["test_accuracy"] is None
    ckpt = load_checkpoint(out / "last.ckpt")
    assert 0 < ckpt["global_step"] < summary["global_steps"] + 1
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values() if t.is_floating_point())
    again = run(TrainConfig(resume=str(out), data_dir=tiny["data_dir"], threads=1), progress=False)
    assert again["diverged"] is True  # resumed, not refused: the same lr diverges again


def test_compile_is_checked_and_named_like_the_cli():
    from seedslot.app import cli, train

    assert cli.COMPILE is train.COMPILE and resolve(TrainConfig()).compile == "off"
    with pytest.raises(ValueError, match="compile must be one of 'off', 'default', 'reduce-overhead'"):
        resolve(TrainConfig(compile="max"))
    parser = cli._parser()
    assert parser.parse_args(["train", "--compile", "reduce-overhead"]).compile == "reduce-overhead"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_runs_the_forward_and_the_step_through_torch_compile(tiny, tmp_path, monkeypatch, mode):
    # the wiring only (inductor would take minutes here): torch.compile is recorded, not run; the
    # bits are eager's, so "off" and a compiled-as-identity run agree
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: calls.append((fn, mode)) or fn)
    off = run(TrainConfig(epochs=1, out=str(tmp_path / "off"), **tiny), progress=False)
    assert not calls
    on = run(TrainConfig(epochs=1, compile=mode, out=str(tmp_path / "on"), **tiny), progress=False)
    want = None if mode == "default" else mode
    assert [m for _, m in calls] == [want, want] and getattr(calls[1][0], "__name__", "") == "step"
    assert on["config"]["compile"] == mode and off["config"]["compile"] == "off"
    assert on["test_accuracy"] == off["test_accuracy"] and on["val_accuracy"] == off["val_accuracy"]
