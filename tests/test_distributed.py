"""Two gloo processes on loopback: identical int8 scores on every rank, equal to one process that
averages the two half-batch gradients, K times less traffic than the dense reference; a missing or
dying rank is one line on the survivors, never a hang."""

import json
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from seedslot import SlotSGD
from seedslot.app import distributed
from seedslot.checkpoints import load_checkpoint
from seedslot.app.cli import main
from seedslot.models import build

from test_data import write_mnist

STEPS, BATCH, K = 4, 32, 4
ENV = dict(SEEDSLOT_COMPILE="0", OMP_NUM_THREADS="1", SEEDSLOT_DIST_TIMEOUT="60")  # slack for a busy machine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    """STEPS global batches, the last one odd-sized (an epoch's last batch): shards of 16 and 15."""
    g = torch.Generator().manual_seed(0)
    sizes = [BATCH] * (STEPS - 1) + [BATCH - 1]
    return [(torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return SlotSGD(params, lr=0.5, momentum=0.9)


def _state(model):
    """Every rank's copy of what training changes: seeded int8 scores, dense fp32 scores."""
    return [t.detach().clone() for n, t in model.state_dict().items() if n.endswith("_scores")]


def _train_ddp(model, ddp, rank, world):
    opt = _optimizer(model)
    for x, y in _data():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(distributed.shard(x, rank, world)), distributed.shard(y, rank, world))
        (loss * distributed.loss_weight(len(y), rank, world)).backward()
        opt.step()
    return _state(model)


def _train_one_process(model, halves):
    """The same global batches in one process: as DDP does, each half's mean gradient divided by
    the number of halves, then summed (``halves`` = 1: the plain global-batch gradient)."""
    opt = _optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in _data():
        total = None
        for r in range(halves):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(distributed.shard(x, r, halves)), distributed.shard(y, r, halves))
            (loss * distributed.loss_weight(len(y), r, halves)).backward()
            g = [p.grad / halves for p in params]
            total = g if total is None else [a + b for a, b in zip(total, g)]
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
    return _state(model)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), **ENV)
    torch.set_num_threads(1)
    distributed.init_from_env()
    result = {}
    for mode in ("seeded", "dense"):
        model = build("lenet", mode=mode, k=K, input_size=12)
        ddp = distributed.wrap(model)
        counter = distributed.ByteCounter()
        ddp.register_comm_hook(counter, distributed.ByteCounter.hook)
        scores = _train_ddp(model, ddp, rank, world)
        distributed.check_in_sync(model)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, scores)
        result[mode] = dict(scores=gathered, bytes=counter.bytes)
    # The agreement check: per-rank batch-norm statistics are fine, any other difference is not.
    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    torch.nn.init.zeros_(net[0].weight)
    net[1].running_mean.fill_(rank)
    distributed.check_in_sync(net)
    net[0].weight.data[0, 0] = rank
    try:
        distributed.check_in_sync(net)
    except distributed.DistributedError as e:
        result["apart"] = str(e)
    if rank == 0:
        torch.save(result, out)
    del ddp
    distributed.shutdown()


def test_two_ranks_hold_identical_scores_equal_to_one_process(tmp_path):
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_worker, args=(2, _port(), out), nprocs=2, join=True)
    result = torch.load(out)
    connections = sum(p.numel() for p in build("lenet", mode="seeded", k=K, input_size=12).parameters())
    for mode in ("seeded", "dense"):
        rank0, rank1 = result[mode]["scores"]
        assert all(torch.equal(a, b) for a, b in zip(rank0, rank1)), mode  # bit-identical, never broadcast
    assert result["seeded"]["bytes"] == STEPS * 4 * connections  # one fp32 gradient value per connection
    assert result["dense"]["bytes"] == K * result["seeded"]["bytes"]  # the reference sends K
    assert result["apart"].startswith("ranks [1] hold different scores or weights from rank 0")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' matmul blocking
    try:
        rank0 = result["seeded"]["scores"][0]
        # One process that averages the two half-batch gradients as DDP does: bit-identical.
        halves = _train_one_process(build("lenet", mode="seeded", k=K, input_size=12), halves=2)
        assert all(torch.equal(a, b) for a, b in zip(halves, rank0))
        # One process on the whole batch: the fp32 mean of 32 instead of the mean of two means of 16
        # rounds differently, which stochastic rounding can turn into a one-level difference (in a
        # few steps; over many, a flipped selection changes every later gradient and runs drift).
        whole = _train_one_process(build("lenet", mode="seeded", k=K, input_size=12), halves=1)
        levels = torch.cat([(a.int() - b.int()).abs().flatten() for a, b in zip(whole, rank0)])
        assert levels.max() <= 1 and levels.float().mean() < 1e-3
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(0, 40))
def test_shards_cover_the_batch_and_weights_make_the_global_mean(world, extra):
    n = world + extra
    batch = torch.arange(n, dtype=torch.float64)
    shards = [distributed.shard(batch, r, world) for r in range(world)]
    assert torch.equal(torch.cat(shards), batch) and max(map(len, shards)) - min(map(len, shards)) <= 1
    ddp_mean = sum(distributed.loss_weight(n, r, world) * s.mean() for r, s in enumerate(shards)) / world
    assert ddp_mean.item() == pytest.approx(batch.mean().item(), rel=1e-12)
    assert all(distributed.loss_weight(n, r, world) == 1.0 for r in range(world)) == (n % world == 0)


def test_a_world_of_one_leaves_the_loop_as_it_is():
    one, x, y = distributed.Ranks(), torch.arange(6.0).reshape(3, 2), torch.arange(3)
    sx, sy, weight = one.shard(x, y)
    assert sx is x and sy is y and weight == 1.0 and type(weight) is float
    batches = list(torch.arange(5).split(2))
    assert one.whole_batches(batches) is batches and one.sum([1.5, 2, 3, True]) == [1.5, 2, 3, True]
    model = torch.nn.Linear(2, 1)
    assert one.main and one.wrap(model, torch.device("cpu")) is model
    one.check_batch_size(7), one.check_in_sync(model), one.close()  # no process group needed
    second = distributed.Ranks(rank=1, world=2)  # shards and weights need no process group either
    sx, sy, weight = second.shard(torch.arange(5.0), torch.arange(5))
    assert sy.tolist() == [3, 4] and weight == distributed.loss_weight(5, 1, 2) and not second.main
    assert second.whole_batches(batches) == batches[:2]  # the last batch (1 example) cannot give each rank one


@pytest.mark.parametrize("scores", ["int8", "implicit"])
@pytest.mark.parametrize("other", [dict(seed=1), dict(k=16), dict(score_lambda=1.0), dict(sharing="layer")])
def test_the_model_fingerprint_tells_any_slot_setting_apart(scores, other):
    # Implicit scores start at zero drift whatever the seed or K: only the extra state differs.
    base = dict(mode="seeded", k=8, seed=0, scores=scores)
    assert distributed._fingerprint(build("lenet", **base)) == distributed._fingerprint(build("lenet", **base))
    assert distributed._fingerprint(build("lenet", **base)) != distributed._fingerprint(build("lenet", **{**base, **other}))


def test_world_size_must_divide_the_batch_size(tmp_path, capsys):
    with pytest.raises(ValueError, match="cannot give each of 3 ranks one"):
        distributed.shard(torch.zeros(2), 0, 3)
    distributed.check_batch_size(16, 2)
    with pytest.raises(ValueError, match="the world size 2 does not divide batch_size 15"):
        distributed.check_batch_size(15, 2)
    # Refused before any process starts.
    assert main(["train", "--data-dir", str(tmp_path), "--batch-size", "15", "--nproc", "2"]) == 2
    assert "the world size 2 does not divide batch_size 15" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tmp_path), "--nproc", "3"]) == 2  # the default 128
    assert "the world size 3 does not divide batch_size 128" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tmp_path), "--lr", "-1", "--nproc", "2"]) == 2
    assert capsys.readouterr().err.startswith("seedslot: error: lr ")


def test_missing_rank_is_an_error_within_the_timeout(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path, n_train=32, n_test=8)
    monkeypatch.setenv("SEEDSLOT_DIST_TIMEOUT", "1")
    for k, v in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port())).items():
        monkeypatch.setenv(k, v)
    t = time.monotonic()
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert time.monotonic() - t < 30  # bounded by the timeout, not a hang
    err = capsys.readouterr().err
    assert err.startswith("seedslot: error: rank 0 of 2: the ranks did not all meet") and err.count("\n") == 1

    monkeypatch.delenv("MASTER_PORT")
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    assert "MASTER_PORT is not set" in capsys.readouterr().err


_DIES_AT_STEP_3 = """
import os, sys
import torch.nn.functional as F
if os.environ["RANK"] == "1":
    real, calls = F.cross_entropy, []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os._exit(1)
        return real(*a, **k)
    F.cross_entropy = dying
from seedslot.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dying_rank_is_one_line_on_the_survivor_and_the_checkpoint_stays_whole(tmp_path):
    write_mnist(tmp_path / "d", n_train=128, n_test=8)
    env = dict(os.environ, **ENV, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    cmd = [sys.executable, "-c", _DIES_AT_STEP_3, "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "d"),
           "--batch-size", "16", "--k", "2", "--no-progress", "--checkpoint-every-steps", "1"]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"o{r}")], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 2, err[-2000:]
    assert err.startswith("seedslot: error: rank 0 of 2: lost contact with another rank") and err.count("\n") == 1
    assert os.listdir(tmp_path / "o0") == ["last.ckpt"]  # no temporary file left behind
    assert load_checkpoint(str(tmp_path / "o0" / "last.ckpt"))["global_step"] == 2
    assert not (tmp_path / "o1").exists()  # only rank 0 writes


def test_nproc_trains_through_torchrun_and_ctrl_c_stops_every_rank_at_one_step(tmp_path):
    write_mnist(tmp_path / "d", n_train=128, n_test=20)  # 109 to train: the last batch splits 7 + 6
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "seedslot", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "d"),
           "--epochs", "1000", "--batch-size", "16", "--k", "2", "--no-progress", "--out", str(out),
           "--json", str(tmp_path / "s.json"), "--nproc", "2"]
    # A session of its own, like a terminal's: Ctrl-C goes to the launcher and torchrun.
    p = subprocess.Popen(cmd, env=dict(os.environ, **ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # until an epoch (and its check that the ranks agree) is done
        os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, stderr[-2000:]
    assert stdout.count("epoch 1/1000") == 1 and "interrupted at epoch" in stdout, stderr[-3000:]  # rank 0 prints
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["world_size"] == 2 and s["interrupted"] and s["history"][0]["train_accuracy"] is not None
    ckpt = load_checkpoint(str(out / "last.ckpt"))
    assert ckpt["global_step"] >= 7  # at least one whole epoch
    assert ckpt["tally"]["seen"] == min(16 * ckpt["step_in_epoch"], 109)  # both ranks' shares counted


def test_bench_ddp_reports_bytes_per_step(tmp_path, capsys):
    from seedslot.app.benchmarks import main as bench

    out = tmp_path / "ddp.json"
    assert bench(["ddp", "--model", "lenet", "--k", "4", "--nproc", "2", "--batch-size", "8", "--steps", "1",
                  "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    connections = 784 * 300 + 300 * 100 + 100 * 10
    assert r["bytes_per_step"] == dict(dense=4 * 4 * connections, seeded=4 * connections)
    assert set(r["step_seconds"]) == set(r["allreduce_seconds"]) == {"dense", "seeded"}
    assert "seeded/dense bytes: 0.2500 (1/K = 0.2500)" in capsys.readouterr().out


def test_nproc_with_a_rank_side_error_is_one_line_and_exit_2(tmp_path):
    """Issue 24, item 16: not the error once per rank and then torchrun's traceback with exit 1."""
    write_mnist(tmp_path / "d", n_train=64, n_test=10)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "last.ckpt").write_bytes(b"not a checkpoint")  # every rank refuses to resume it
    cmd = [sys.executable, "-m", "seedslot", "train", "--data-dir", str(tmp_path / "d"), "--no-progress",
           "--resume", str(tmp_path / "o"), "--nproc", "2"]
    r = subprocess.run(cmd, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=240)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "last.ckpt" in lines[0] and ": error: " in lines[0], r.stderr[-3000:]


def test_nproc_into_an_out_another_run_holds_is_one_line_and_exit_2(tmp_path):
    # rank 0 finds out locked: every rank stops with its line (none waits for it or reports it lost)
    write_mnist(tmp_path / "d", n_train=64, n_test=10)
    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run
        cmd = [sys.executable, "-m", "seedslot", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "d"),
               "--no-progress", "--epochs", "1", "--out", str(out), "--nproc", "2"]
        r = subprocess.run(cmd, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=240)
    finally:
        os.close(fd)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "is in use by another seedslot run" in lines[0], r.stderr[-3000:]
