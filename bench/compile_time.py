"""First-call time of torch.compile(model) forward+backward: a plain small CNN against its slotified twin."""
import sys, time, torch, seedslot
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

def first_call(model):
    torch._dynamo.reset()
    f = torch.compile(model)
    x = torch.randn(4, 3, 16, 16)
    t = time.perf_counter()
    f(x).sum().backward()
    return time.perf_counter() - t

kind = sys.argv[1]
m = net()
if kind != "plain":
    seedslot.slotify_(m, k=8, scores=kind)
print(kind, f"{first_call(m):.1f} s")
