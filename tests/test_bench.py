"""seedslot.app.benchmarks on a tiny model and one step, so that every bench keeps working."""

import argparse
import json

import pytest
import torch

from seedslot.app import benchmarks as B

TINY = ["--model", "lenet", "--k", "2", "--batch-size", "2"]


def test_memory_bench_cli_writes_rows(tmp_path, capsys):
    path = tmp_path / "memory.json"
    assert B.main(["memory", *TINY, "--steps", "1", "--device", "cpu", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    rows = {r["mode"]: r for r in out["rows"]}
    assert list(rows) == ["learned", "dense", "int8", "implicit"]
    for r in rows.values():
        for key in ("mode", "k", "state_bytes", "peak_rss_bytes", "peak_increment_bytes", "step_seconds"):
            assert key in r
        assert r["peak_rss_bytes"] > r["peak_increment_bytes"] > 0 and r["step_seconds"] > 0
        assert r["connections"] == 784 * 300 + 300 * 100 + 100 * 10
        assert sum(r["state_by_category"].values()) == r["state_bytes"]
    # bytes per connection: weight+grad+momentum (12); 16 K for the dense reference; K + 8 seeded;
    # drift+grad+momentum (12) implicit
    assert rows["learned"]["bytes_per_connection"] == pytest.approx(12, rel=0.01)
    assert rows["dense"]["bytes_per_connection"] == pytest.approx(16 * 2, rel=0.01)
    assert rows["int8"]["bytes_per_connection"] == pytest.approx(2 + 8, rel=0.01)
    assert rows["implicit"]["bytes_per_connection"] == pytest.approx(12, rel=0.01)
    assert out["ratios"]["state_implicit_over_dense"] == rows["implicit"]["state_bytes"] / rows["dense"]["state_bytes"]
    assert out["ratios"]["state_int8_over_dense"] == rows["int8"]["state_bytes"] / rows["dense"]["state_bytes"]
    table = capsys.readouterr().out
    assert "int8" in table and "+peak MiB" in table


def test_budget_bench_search_and_stop(tmp_path):
    path = tmp_path / "budget.json"
    B.main(["budget", "--model", "lenet", "--batch-size", "2", "--ks", "1,2", "--budget", "64GiB",
            "--device", "cpu", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["dense_max_k"] == out["int8_max_k"] == out["implicit_max_k"] == 2
    assert [(t["mode"], t["k"], t["fits"]) for t in out["trials"]] == [
        (m, k, True) for m in ("dense", "int8", "implicit") for k in (1, 2)]
    # a budget below the bare interpreter: the first K fails, the watchdog kills it, the search stops
    out = B.budget_bench("lenet", budget_bytes="1MiB", batch_size=2, ks=(1, 2), modes=("int8",), device="cpu")
    assert out["int8_max_k"] is None
    assert [(t["k"], t["fits"], t["killed"]) for t in out["trials"]] == [(1, False, True)]


def test_speed_bench_ratios(tmp_path, capsys):
    out = B.speed_bench("lenet", k=2, batch_size=2, repeats=2, min_seconds=0.0, warmup=1, device="cpu")
    med = {r["mode"]: r["step_seconds"] for r in out["rows"]}
    assert out["ratios"]["int8_over_dense"] == med["int8"] / med["dense"]
    assert out["ratios"]["int8_over_learned"] == med["int8"] / med["learned"]
    assert out["ratios"]["implicit_over_dense"] == med["implicit"] / med["dense"]
    assert all(len(r["step_seconds_all"]) == 2 for r in out["rows"])
    assert all(r["first_step_seconds"] > 0 for r in out["rows"])  # the compiling step, apart
    # the int8 floor: learned + 1.2 x regenerating every candidate once, both terms reported
    assert out["regen_seconds"] > 0
    assert out["int8_floor_seconds"] == med["learned"] + 1.2 * out["regen_seconds"]
    path = tmp_path / "speed.json"
    B.main(["speed", *TINY, "--repeats", "1", "--min-seconds", "0", "--modes", "seeded,dense", "--json", str(path)])
    assert set(json.loads(path.read_text())["ratios"]) == {"int8_over_dense"}
    printed = capsys.readouterr().out
    assert "time ratios" in printed and "regenerating the K candidates" in printed


def test_speed_bench_profile(tmp_path, capsys):
    path = tmp_path / "speed.json"
    B.main(["speed", *TINY, "--repeats", "2", "--min-seconds", "0", "--modes", "learned,incremental", "--profile",
            "--device", "cpu", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "where a step goes" in printed and "torch.profiler per step" in printed
    out = json.loads(path.read_text())
    assert list(out["profile"]) == ["learned", "incremental"]
    for p in out["profile"].values():
        assert list(p["segments"]) == list(B.SEGMENTS) and all(v > 0 for v in p["segments"].values())
        assert 0 < p["event_self_seconds"] and p["top_ops"]
        assert any("mm" in o["name"] for o in p["top_ops"])  # the three linear layers' matmuls
    # the optimizer's own region is where SlotSGD's and SGD's Python shows
    assert any(o["name"].startswith("Optimizer.step#SlotSGD") for o in out["profile"]["incremental"]["top_ops"])


def test_speed_bench_profile_counts_host_syncs_and_graph_breaks(tmp_path, capsys):
    # issue 26: a steady-state step of int8 or implicit scores reads nothing back to the host, its
    # optimizer step is one graph, and a whole step breaks only where weight training's does (at backward)
    path = tmp_path / "speed.json"
    B.main(["speed", *TINY, "--repeats", "1", "--min-seconds", "0", "--modes", "learned,int8,implicit", "--profile",
            "--device", "cpu", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "what keeps the host in a step" in printed and "host syncs" in printed and "graph breaks" in printed
    prof = json.loads(path.read_text())["profile"]
    learned = prof["learned"]
    for slot in (prof["int8"], prof["implicit"]):
        assert learned["host_syncs_per_step"] == slot["host_syncs_per_step"] == 0
        assert learned["optimizer_graph_breaks"] == slot["optimizer_graph_breaks"] == 0
        assert slot["graph_breaks_per_step"] == learned["graph_breaks_per_step"] == 1
        assert 0 < learned["dispatched_ops_per_step"] < slot["dispatched_ops_per_step"]
        assert "item" in slot["host_syncs_counted"]


def test_host_counts_see_a_host_read():
    # the counter can fail: a step that reads a value back is counted once per read
    t = B.Trainer("lenet", "implicit", 2, 2, "cpu")
    step = t.step
    t.step = lambda: (step(), float(t.model.classifier[0].weight_drift.sum()))[0]
    assert B._host_counts(t, "cpu")["host_syncs_per_step"] == 1


def test_rounds_rotate_the_modes():
    order = []
    got = B._rounds({"a": "A", "b": "B", "c": "C"}, 3, {"a": 1, "b": 2, "c": 3},
                    lambda t, n: order.append(t) or n)
    assert order == list("ABCBCACAB") and got == {"a": [1] * 3, "b": [2] * 3, "c": [3] * 3}


def test_step_segments_is_a_training_step():
    """The profiled step trains exactly as the timed one does (same bits after three steps)."""
    import torch

    a, b = (B.Trainer("lenet", "incremental", 2, 2, "cpu") for _ in range(2))
    for _ in range(3):
        a.step()
        assert len(b.step_segments()) == len(B.SEGMENTS)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
    assert not torch.equal(sa["classifier.0.weight_drift"], B.Trainer("lenet", "incremental", 2, 2, "cpu")
                           .model.state_dict()["classifier.0.weight_drift"])  # it did train


@pytest.mark.parametrize("text,value", [("2GiB", 2 * 2**30), ("1500MB", 1500 * 10**6), ("0.5KiB", 512),
                                        ("123", 123), (" 3 mib ", 3 * 2**20)])
def test_parse_bytes(text, value):
    assert B.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "2 GiBs", "-1GB", "0", "GiB", "1e3"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="budget"):
        B.parse_bytes(text)


@pytest.mark.parametrize("call", [
    lambda: B.memory_bench("lenet", modes=("learned", "bogus")),
    lambda: B.memory_bench("lenet", k=0),
    lambda: B.memory_bench("lenet", device="tpu"),
    lambda: B.budget_bench("lenet", ks=(2, 1)),
    lambda: B.budget_bench("lenet", ks=()),
    lambda: B.speed_bench("lenet", min_seconds=-1),
    lambda: B.budget_bench("vgg19-imagenet-x"),
    lambda: B.budget_bench("vgg19-imagenet", input_size=0),
    lambda: B.memory_bench("conv4", width=2.0),
])
def test_bad_arguments_raise_before_any_work(call):
    with pytest.raises(ValueError):
        call()


def test_ddp_bench_is_dispatched(monkeypatch):
    calls = []
    monkeypatch.setattr(B.bench_ddp, "add_arguments", lambda p: p.add_argument("--world-size", type=int, default=2))
    monkeypatch.setattr(B.bench_ddp, "run_cli", lambda args: calls.append(args.world_size) or 7)
    assert B.main(["ddp", "--world-size", "3"]) == 7 and calls == [3]


def test_cli_parser_shape():
    parser = argparse.ArgumentParser()
    B.add_arguments(parser)
    args = parser.parse_args(["budget"])
    assert (args.model, args.budget, args.batch_size, args.ks) == ("vgg19", 2 * 2**30, 32, B.BUDGET_KS)
    with pytest.raises(SystemExit):
        parser.parse_args(["speed"])  # --model is required


def test_step_breakdown_script_runs_and_restores_what_it_ablates(capsys):
    import importlib.util
    import pathlib

    from seedslot import optim, storages

    before = storages.IncrementalImplicitScores.greedy, optim.SlotSGD._check_updates
    path = pathlib.Path(__file__).parent.parent / "bench" / "step_breakdown.py"
    spec = importlib.util.spec_from_file_location("step_breakdown", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--k", "2", "--batch-size", "2", "--repeats", "1", "--steps", "1"])
    printed = capsys.readouterr().out
    for name in ("learned", "incremental", "no selection", "no selection, no check"):
        assert f"{name}  " in printed
    assert (storages.IncrementalImplicitScores.greedy, optim.SlotSGD._check_updates) == before


def test_budget_and_memory_benches_take_the_imagenet_vgg19(tmp_path, capsys):
    # The ImageNet layout (torchvision's vgg19_bn) at a width and image size that take seconds here.
    path = tmp_path / "budget.json"
    B.main(["budget", "--model", "vgg19_bn-imagenet", "--width", "0.0625", "--input-size", "32", "--batch-size", "1",
            "--ks", "1,2", "--modes", "dense,seeded", "--budget", "64GiB", "--device", "cpu", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["dense_max_k"] == out["int8_max_k"] == 2 and out["input_size"] == 32 and out["width"] == 0.0625
    assert "largest K ratios: int8/dense 1" in capsys.readouterr().out
    out = B.memory_bench("vgg19-imagenet", k=2, batch_size=1, steps=1, modes=("int8",), device="cpu",
                         input_size=32, width=0.0625)
    assert out["rows"][0]["connections"] == 78_300 + 344 + 470_026  # conv weights, conv biases, classifier


def test_speed_bench_compiles_every_mode_when_asked(tmp_path, monkeypatch):
    # issue 26: both sides at their best: weight training's step goes through torch.compile too
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: calls.append(mode) or fn)
    path = tmp_path / "speed.json"
    B.main(["speed", *TINY, "--repeats", "1", "--min-seconds", "0", "--modes", "learned,int8", "--device", "cpu",
            "--compile", "reduce-overhead", "--json", str(path)])
    assert calls == ["reduce-overhead"] * 4  # forward and optimizer step of each mode
    assert json.loads(path.read_text())["compile"] == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be one of 'off', 'default', 'reduce-overhead'; got 'max'"):
        B.speed_bench("lenet", modes=["learned"], compile="max")
