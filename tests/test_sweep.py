"""seedslot.app.sweep on a tiny fake MNIST: every experiment runs and reports, a second sweep trains
nothing, torn and missing state is redone, bad input is a ValueError."""

import dataclasses
import json
import os

import pytest
import torch

from seedslot.app import sweep as S
from seedslot.app.cli import main
from test_data import write_mnist


@pytest.fixture
def tiny(tmp_path_factory, monkeypatch):
    """An 8x8 fake MNIST and small grids, so that a whole sweep takes seconds."""
    data = tmp_path_factory.mktemp("data")
    write_mnist(data, n_train=40, n_test=10, size=8)
    monkeypatch.setattr(S, "GRIDS", {"headline": [2], "k": [1, 2], "scores": [2], "selection": [2], "sharing": [2]})
    monkeypatch.setattr(S, "PRESETS", {"lenet": S.Preset(1, None, 2), "conv2": S.Preset(1, None, 2)})
    calls = []
    real_run = S.run
    monkeypatch.setattr(S, "run", lambda cfg, **kw: calls.append(cfg) or real_run(cfg, **kw))
    threads = torch.get_num_threads()
    yield dict(dataset="mnist", data_dir=str(data), threads=1, log=lambda s: None), calls
    torch.set_num_threads(threads)  # run() sets it process-wide


def test_every_experiment_reports_and_resume_trains_nothing(tiny, tmp_path):
    kw, calls = tiny
    out = str(tmp_path / "sweep")
    for name in S.EXPERIMENTS:
        S.sweep(name, out, write_report=False, **kw)
        assert {S.run_id(s) for s in S.plan(name, dataset="mnist")} <= set(S.load_records(out))
    lines = open(os.path.join(out, "runs.jsonl")).read().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)) == len(calls)  # shared runs trained once
    assert set(ids) == {S.run_id(s) for s in S.plan("all", dataset="mnist")}

    calls.clear()
    assert S.sweep("all", out, write_report=False, **kw) == 0 and calls == []
    S.report("all", out)
    for name in S.EXPERIMENTS:
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 0
        table = open(os.path.join(out, f"{name}.md")).read()
        assert "Lenet-300-100" in table and "CONV-2" in table and "—" not in table  # every point finished
    assert open(os.path.join(out, "results.md")).read().count("### ") == len(S.EXPERIMENTS)
    # the finetune runs really started from their selection checkpoints
    assert any("finetune_after" in json.loads(line)["spec"] for line in lines)


def test_torn_line_and_missing_checkpoint_are_redone(tiny, tmp_path):
    kw, calls = tiny
    out = str(tmp_path / "sweep")
    S.sweep("finetune", out, seeds=(0,), models=("lenet",), write_report=False, **kw)
    path = os.path.join(out, "runs.jsonl")
    lines = open(path).read().splitlines()
    finetune = [line for line in lines if "finetune_after" in line]
    assert len(finetune) == 1
    # a writer killed mid-line: the finetune run is torn, everything before it is kept
    kept = [line for line in lines if line not in finetune]
    with open(path, "w") as f:
        f.write("\n".join(kept) + "\n" + finetune[0][: len(finetune[0]) // 2])
    calls.clear()
    assert S.sweep("finetune", out, seeds=(0,), models=("lenet",), write_report=False, **kw) == 1
    assert [c.resume is not None for c in calls] == [True]  # continued from its own last checkpoint
    records = S.load_records(out)
    assert len(records) == len(lines)
    after = open(path).read().splitlines()
    assert after[:-1] == kept + [finetune[0][: len(finetune[0]) // 2]]
    assert json.loads(after[-1])["id"] == json.loads(finetune[0])["id"]  # on a line of its own

    # the finetune run is redone without its selection checkpoint: the selection run is redone first
    with open(path, "w") as f:
        f.write("\n".join(kept) + "\n")
    for root, _, files in os.walk(os.path.join(out, "checkpoints")):
        for name in files:
            os.remove(os.path.join(root, name))
    calls.clear()
    assert S.sweep("finetune", out, seeds=(0,), models=("lenet",), write_report=False, **kw) == 2
    assert [c.finetune_from is not None for c in calls] == [False, True]
    assert len(S.load_records(out)) == len(lines)


def test_plan_ids_are_stable_and_unique():
    specs = S.plan("all")
    ids = [S.run_id(s) for s in specs]
    assert len(ids) == len(set(ids))
    assert ids == [S.run_id(s) for s in S.plan("all")]
    assert {s["seed"] for s in specs} == {0, 1}  # every point has two seeds by default
    ks = {s["k"] for s in S.plan("k") if s["mode"] == "seeded" and not s.get("random_selection")}
    assert ks == {1, 2, 4, 8, 16, 32, 64}
    # every finetune run comes after the selection run whose checkpoint it reads
    for i, s in enumerate(specs):
        if "finetune_after" in s:
            assert s["finetune_after"] in ids[:i]


@pytest.mark.parametrize("call, match", [
    (lambda: S.plan("widths"), "experiment must be one of 'headline', 'k', 'scores'.*'all'"),
    (lambda: S.plan("k", models=("vgg19",)), "model must be one of 'lenet', 'conv2'"),
    (lambda: S.plan("k", seeds=()), "seeds"),
    (lambda: S.sweep("k", "unused", dataset="imagenet"), "dataset must be one of"),
    (lambda: S.presets_for(epochs=0), "epochs must be an int >= 1"),
    (lambda: S.sweep("sharing", "unused", ks=(3,)), r"ks must be values of sharing's K grid \(2, 8, 64\); got \[3\]"),
])
def test_bad_input_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli(tiny, tmp_path, capsys):
    kw, _ = tiny
    out = str(tmp_path / "sweep")
    assert main(["sweep", "nope", "--out", out]) == 2
    assert "seedslot: error: experiment must be one of" in capsys.readouterr().err
    assert main(["sweep", "k", "--models", "lenet", "--seeds", "0", "--dataset", "mnist",
                 "--data-dir", kw["data_dir"], "--epochs", "1", "--threads", "1", "--out", out]) == 0
    assert main(["sweep", "k", "--models", "lenet", "--seeds", "0", "--report-only", "--epochs", "1",
                 "--out", out]) == 0
    assert "wrote" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "k.png"))


def test_ks_trains_only_those_runs_and_the_report_marks_the_rest(tiny, tmp_path):
    kw, calls = tiny
    out = str(tmp_path / "sweep")
    assert S.sweep("k", out, models=("lenet",), seeds=(0,), ks=(2,), **kw) == 2  # seeded and random at K = 2
    assert sorted(c.k for c in calls) == [2, 2]
    table = open(os.path.join(out, "k.md")).read()
    assert "not finished: seeded int8, greedy, K 1, seed 0: not started" in table


def test_interrupted_run_continues_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    kw, calls = tiny
    out = str(tmp_path / "sweep")
    monkeypatch.setattr(S, "PRESETS", S.presets_for(epochs=2))
    spec = S.plan("k", models=("lenet",), seeds=(0,), dataset="mnist")[0]
    real_run = S.run

    def stop_after_one_epoch(cfg, **kw2):  # the first run dies after its first epoch's checkpoint
        calls.append(cfg)
        real_run(dataclasses.replace(cfg, epochs=1), **kw2)
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "run", stop_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        S.sweep("k", out, models=("lenet",), seeds=(0,), write_report=False, **kw)
    assert os.listdir(os.path.join(out, "claims")) == []  # the claim is released
    monkeypatch.setattr(S, "run", lambda cfg, **kw2: calls.append(cfg) or real_run(cfg, **kw2))
    calls.clear()
    S.sweep("k", out, models=("lenet",), seeds=(0,), write_report=False, **kw)
    assert calls[0].resume is not None  # the first run continued, did not start again
    record = S.load_records(out)[S.run_id(spec)]
    assert [h["epoch"] for h in record["history"]] == [1, 2]


def test_a_live_claim_is_skipped_a_dead_one_taken_over(tiny, tmp_path):
    kw, calls = tiny
    out = str(tmp_path / "sweep")
    rid = S.run_id(S.plan("headline", models=("lenet",), seeds=(0,), dataset="mnist")[0])
    os.makedirs(os.path.join(out, "claims"))
    with open(os.path.join(out, "claims", S._digest(rid)), "w") as f:
        f.write(str(os.getppid()))  # alive: another sweep trains it
    S.sweep("headline", out, models=("lenet",), seeds=(0,), write_report=False, **kw)
    assert rid not in S.load_records(out) and len(calls) == len(S.plan("headline", models=("lenet",), seeds=(0,))) - 1
    with open(os.path.join(out, "claims", S._digest(rid)), "w") as f:
        f.write("999999999")  # no such process: taken over
    S.sweep("headline", out, models=("lenet",), seeds=(0,), write_report=False, **kw)
    assert rid in S.load_records(out)


def test_a_claim_nobody_holds_is_provably_stale(tmp_path):
    """Issue 24, item 10: a sweep killed as PID 1 (a container's entrypoint) left a claim naming the
    pid its restarted self has again; claims are flocks the kernel drops, so it is taken over."""
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "claims"))
    path = os.path.join(out, "claims", S._digest("r"))
    with open(path, "w") as f:
        f.write(str(os.getpid()))  # "our own pid", written by our previous incarnation
    claim = S._claim(out, "r")
    assert claim is not None
    assert S._claim(out, "r") is None  # held: the lock lives as long as this process holds it
    claim.release()
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write(f"{os.getppid()} {S._start_time(os.getppid())}")  # a live process's claim, but not locked
    claim = S._claim(out, "r")
    assert claim is not None
    claim.release()


def test_run_ids_name_the_dataset_and_old_ids_stay(tiny, tmp_path):
    """Issue 24, item 6: a Fashion-MNIST request is never answered with MNIST runs. Fashion-MNIST
    (the default) ids are what they were; another dataset is part of the id and of the table."""
    kw, calls = tiny
    spec = S.plan("headline", models=("lenet",), seeds=(0,))[0]
    assert S.run_id(spec) == "epochs=1,k=2,mode=seeded,model=lenet,scores=int8,seed=0,selection=greedy,sharing=none"
    mnist = S.plan("finetune", models=("lenet",), seeds=(0,), dataset="mnist")
    assert all(S.run_id(s).startswith("dataset=mnist,") for s in mnist)
    assert all(s["finetune_after"] in {S.run_id(t) for t in mnist} for s in mnist if "finetune_after" in s)
    out = str(tmp_path / "sweep")
    S.sweep("headline", out, models=("lenet",), seeds=(0,), write_report=False, **kw)
    S.report("headline", out, models=("lenet",), seeds=(0,))
    assert "(mnist)" in open(os.path.join(out, "headline.md")).read().splitlines()[0]
    # an older seedslot recorded MNIST runs under the plain ids: they are not Fashion-MNIST results
    with open(os.path.join(out, "runs.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "runs.jsonl"), "a") as f:
        for r in records:
            f.write(json.dumps(dict(r, id=r["id"].replace("dataset=mnist,", ""))) + "\n")
    assert set(S.load_records(out)) == {r["id"] for r in records}


def test_sweep_checks_matplotlib_before_training(tiny, tmp_path, monkeypatch):
    """Issue 24, item 16: not a traceback after everything was trained."""
    import sys

    kw, calls = tiny
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match="matplotlib"):
        S.sweep("headline", str(tmp_path / "s"), models=("lenet",), seeds=(0,), **kw)
    assert calls == []


def test_runs_jsonl_appends_never_follow_a_symlink(tmp_path):
    """Issue 24, item 12."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "runs.jsonl").symlink_to(victim)
    with pytest.raises(ValueError, match="is a symlink"):
        S._append(str(tmp_path), {"id": "x"})
    assert victim.read_text() == "precious"
