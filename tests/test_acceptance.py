"""``seedslot bench gpu``: its identities run on any pair of devices (here CPU and CPU), its table
merges partial runs, and without a GPU it is one line and exit 2."""

import json

import pytest
import torch

from seedslot.app import acceptance as A
from seedslot.app.cli import main


def test_identities_hold_between_two_builds():
    rows = A.identities("cpu", "lenet", sharings=("none", "global"), storages=("int8", "implicit"))
    assert len(rows) == 2 * 2 * 3 and all(r["equal"] for r in rows)
    updates = A.update_identities("cpu", "lenet")
    assert [r["scores"] for r in updates] == ["int8", "implicit"] and all(r["equal"] for r in updates)


def test_a_different_candidate_is_caught(monkeypatch):
    real = A._build_on

    def build_on(device, *args, **kwargs):
        if device != "cpu-tampered":
            return real(device, *args, **kwargs)
        net = real("cpu", *args, **kwargs)
        first = next(m for m in net.modules() if hasattr(m, "_cand_step"))
        first._cand_step.mul_(1.0 + 2**-20)  # every candidate of the first layer moves a little
        return net

    monkeypatch.setattr(A, "_build_on", build_on)
    rows = A.identities("cpu-tampered", "lenet", sharings=("none",), storages=("int8",))
    assert {r["check"]: r["equal"] for r in rows} == {"candidates": False, "initial scores": True,
                                                      "greedy selection": True}


def test_partial_runs_merge_into_one_table(tmp_path, capsys):
    base = dict(bench="gpu", device="cuda:0", device_name="Some GPU", torch=torch.__version__)
    a = dict(base, ok=True, identities=[dict(check="candidates", sharing="none", scores="int8", equal=True)])
    b = dict(base, ok=False, budget=dict(budget_bytes=2**31, model="vgg19", batch_size=32, ks=[2, 4],
                                         dense_max_k=2, seeded_max_k=4, implicit_max_k=4))
    paths = []
    for i, r in enumerate((a, b)):
        paths.append(str(tmp_path / f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    assert main(["bench", "gpu", "--report", *paths]) == 1  # b failed an identity
    cells = dict(tuple(c.strip() for c in line.strip("|").split("|")) for line in capsys.readouterr().out.splitlines())
    assert cells["CUDA == CPU: candidates, sharing none, int8"] == "equal"
    assert cells["largest K under 2 GiB (vgg19, batch 32): int8"] == "4 (tried 2, 4)"
    assert cells["every identity holds"] == "NO"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_one_line_and_exit_2(capsys):
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is available" in err[0]
