"""Your own model as a slot machine: a ResNet-18-style CIFAR network written here, converted with
``seedslot.slotify_``, trained by a plain PyTorch loop, checkpointed with ``torch.save`` and
exported compactly. See docs/OWN-MODELS.md.

    python examples/own_model.py                       # ResNet-18 (width 64) on random CIFAR-shaped data
    python examples/own_model.py --width 8 --steps 20  # a small one, in seconds

The data are random 3x32x32 images whose label is a fixed random linear function of the pixels (a
learnable task with no download); put your DataLoader in ``data()``'s place.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import seedslot


class BasicBlock(nn.Module):
    """The CIFAR ResNet block: two 3x3 convolutions with batch norm, and a 1x1 shortcut on a change of shape."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (a 3x3 stem, no max pool), ``width`` channels in the first stage."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def data(n: int, size: int, batch_size: int, seed: int = 0) -> DataLoader:
    """Random images labelled by a fixed random linear map: learnable, no download."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    w = torch.randn(3 * size * size, 10, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (ResNet-18: 64)")
    p.add_argument("--k", type=int, default=8, help="candidates per connection")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n", type=int, default=2048, help="training images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="folder for the checkpoint and the export (default: a temporary one)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = ResNet18(args.width)
    # 1. Convert: every Conv2d and Linear becomes a slot layer; batch norm stays learned. The
    #    report lists both, with the share of the weights now seeded.
    report = seedslot.slotify_(model, k=args.k, seed=0, report=True)
    print(report)

    # 2. Two optimizers: SlotSGD for the slot layers' parameters, any torch optimizer for the rest
    #    (a torch optimizer refuses slot parameters at its first step). lr 0.1 is the paper's for
    #    CNNs; transformers want about 0.01 (0.1 collapses them to a constant output).
    slot_opt = seedslot.SlotSGD(seedslot.slot_parameters(model), lr=0.1, momentum=0.9)
    other_opt = torch.optim.AdamW(seedslot.ordinary_parameters(model), lr=1e-3)

    loader = data(args.n, args.image_size, args.batch_size)
    model.train()
    step, losses = 0, []
    while step < args.steps:
        for x, y in loader:
            slot_opt.zero_grad()
            other_opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            slot_opt.step()
            other_opt.step()
            losses.append(loss.item())
            step += 1
            if step % max(1, args.steps // 10) == 0:
                print(f"step {step}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
            if step == args.steps:
                break

    out = args.out or tempfile.mkdtemp(prefix="seedslot-own-")
    os.makedirs(out, exist_ok=True)
    # 3. Checkpoint: a state_dict of tensors only (scores, seeds), as for any model.
    ckpt = os.path.join(out, "resnet18.pt")
    torch.save({"model": model.state_dict(), "slot_opt": slot_opt.state_dict(), "other_opt": other_opt.state_dict()},
               ckpt)
    restored = ResNet18(args.width)
    seedslot.slotify_(restored, k=args.k)  # the same architecture; the state brings the seeds
    restored.load_state_dict(torch.load(ckpt, weights_only=True)["model"])

    # 4. Export: seeds plus ceil(log2 K) bits per connection; the loader needs the architecture.
    path = os.path.join(out, "resnet18.slot")
    size = seedslot.export(model, path)
    plain = seedslot.load_exported(path, model=ResNet18(args.width))  # an ordinary nn.Module
    x = next(iter(loader))[0]
    model.eval()
    restored.eval()
    with torch.no_grad():
        same_ckpt = torch.equal(restored(x), model(x))
        same_export = torch.equal(plain(x), model(x))
    print(f"checkpoint {os.path.getsize(ckpt)} bytes, export {size} bytes; reloaded outputs equal: "
          f"checkpoint {same_ckpt}, export {same_export}")
    return dict(losses=losses, report=report, checkpoint=ckpt, export=path, export_bytes=size,
                same_checkpoint=same_ckpt, same_export=same_export)


if __name__ == "__main__":
    main(sys.argv[1:])
