"""A training step without the host (issue 26): SlotSGD.step traces to one graph with no host read.

``torch._dynamo.explain`` counts the graph breaks of ``opt.step`` on a small seeded MLP; a break is
a point where the host must read a device value (``.tolist()``, ``bool()``, ``.item()``) or leave
the graph. Deferred checks (the default) decide on the device, so SlotSGD's own code adds none.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seedslot as ss


def _mlp(scores, wd=0.01):
    torch.manual_seed(0)
    model = nn.Sequential(ss.SlotLinear(6, 5, k=4, seed=1, scores=scores, bias=True), nn.ReLU(), nn.Linear(5, 3))
    opt = ss.SlotSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd)
    return model, opt


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    F.cross_entropy(model(torch.randn(4, 6, generator=g)), torch.randint(0, 3, (4,), generator=g)).backward()


def _explain_step(scores):
    model, opt = _mlp(scores)
    for s in range(2):  # steady state: momentum buffers exist
        opt.zero_grad()
        _backward(model, s)
        opt.step()
    opt.check()
    opt.zero_grad()
    _backward(model, 2)
    torch._dynamo.reset()
    return torch._dynamo.explain(opt.step)()


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_slotsgd_step_is_one_graph(scores):
    explained = _explain_step(scores)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_forward_stays_one_graph(scores):
    model, _ = _mlp(scores)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(4, 6))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("scores", ["int8", "fp32", "implicit"])
def test_fullgraph_compiled_step_gives_eager_bits(scores):
    # dynamo's graph run by the eager backend: the same ops, so the same bits as the eager step
    eager, opt_e = _mlp(scores)
    compiled, opt_c = _mlp(scores)
    torch._dynamo.reset()
    step = torch.compile(opt_c.step, backend="eager", fullgraph=True)
    for s in range(3):
        for model, run in ((eager, opt_e.step), (compiled, step)):
            model.zero_grad()
            _backward(model, s)
            run()
    opt_e.check()
    opt_c.check()
    a, b = eager.state_dict(), compiled.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert str(opt_e.state_dict()) == str(opt_c.state_dict())


def test_fullgraph_compiled_step_still_refuses_a_bad_step():
    model, opt = _mlp("implicit")
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="eager", fullgraph=True)
    model.zero_grad()
    _backward(model, 0)
    step()
    before = copy.deepcopy(model.state_dict())
    model.zero_grad()
    _backward(model, 1)
    model[0].slot_weight.grad.view(-1)[0] = float("nan")
    step()
    with pytest.raises(FloatingPointError, match="non-finite gradient in parameter 0 of param group 0"):
        opt.check()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
