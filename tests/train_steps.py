"""A converted model trained eagerly and through torch.compile side by side, for the compile tests."""

import copy

import torch

import seedslot as ss


def assert_compiled_trains_as_eager(eager, inputs: tuple, target, loss_fn, backend: str | None = None, steps: int = 3):
    """``eager`` and ``torch.compile`` of a copy of it, each trained ``steps`` SlotSGD steps on
    ``loss_fn(model(*inputs), target)``, give the same losses and state_dict, bit for bit."""
    torch._dynamo.reset()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model) if backend is None else torch.compile(model, backend=backend)
    losses = {}
    for key, m, fn in (("eager", eager, eager), ("compiled", model, compiled)):
        opt = ss.SlotSGD(m.parameters(), lr=0.5, momentum=0.9)
        losses[key] = []
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(fn(*inputs), target)
            loss.backward()
            opt.step()
            losses[key].append(loss.detach())
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(losses["eager"], losses["compiled"]))
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), model.state_dict().values()))
