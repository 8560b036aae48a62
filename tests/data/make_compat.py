"""Writes compat_v0.ckpt and compat_v0.slot: state written by seedslot before score storages
became classes (commit 4579fed), which tests/test_compat.py loads with today's code.

Run once from the repository root: ``python tests/data/make_compat.py``. Do not regenerate these
files with newer code: their point is that they were written by the old one.
"""

import copy
import os

import torch
from torch import nn

import seedslot as ss
from seedslot.checkpoints import save_checkpoint
from seedslot.export import export

HERE = os.path.dirname(os.path.abspath(__file__))


def compat_model() -> nn.Sequential:
    """One layer of every kind and score storage, each with a bias (also in tests/test_compat.py)."""
    return nn.Sequential(
        ss.SlotConv2d(2, 3, 3, bias=True, k=5, seed=1, scores="int8"),
        nn.ReLU(),
        nn.Flatten(),
        ss.SlotLinear(48, 6, bias=True, k=8, seed=2, scores="fp32"),
        nn.ReLU(),
        ss.SlotLinear(6, 5, bias=True, k=4, seed=3, scores="implicit", selection="sample"),
        ss.DenseSlotLinear(5, 4, bias=True, k=3, seed=4, selection="sample"),
    )


def steps(model, opt, x, y, lrs):
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def expected(model, x) -> dict:
    out = {}
    model.eval()
    out["eval_output"] = model(x).detach()
    for name, m in model.named_modules():
        if hasattr(m, "parts"):
            for part in m.parts:
                out[f"{name}.{part}.index"] = m.selected_index(part)
                if hasattr(m, "score_values"):
                    out[f"{name}.{part}.scores"] = m.score_values(part)
    model.train()
    return out


def main() -> None:
    torch.manual_seed(0)
    model = compat_model()
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 4, (16,))
    opt = ss.SlotSGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    steps(model, opt, x, y, [0.5, 3.0, 0.5])  # the lr of 3.0 coarsens the int8 grid
    payload = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()), "x": x, "y": y,
               "before": expected(model, x)}
    steps(model, opt, x, y, [0.5, 0.5])  # two more steps from the saved state
    payload["after"] = expected(model, x)
    payload["after_model"] = model.state_dict()
    save_checkpoint(os.path.join(HERE, "compat_v0.ckpt"), payload)
    export(model, os.path.join(HERE, "compat_v0.slot"))


if __name__ == "__main__":
    main()
