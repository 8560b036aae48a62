"""The op layer: every hot operation is one ``seedslot::`` custom op whose fake (meta) kernel
returns what its CPU kernel returns (shapes, dtypes, devices), and nothing outside the op layer
looks at devices, compilation, numba or Triton."""

import ast
import pathlib
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import seedslot
from seedslot import candidates as C
from seedslot.ops import _torch as T

i32 = C.i32
K, N = 8, 37


def _cases():
    g = torch.Generator().manual_seed(0)
    kb, rb, step = C.stream_keys(1, C.Stream.CANDIDATES, K)[1], C.stream_keys(1, C.Stream.ROUND, K)[1], C.grid_step(0.1)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    d = torch.randn(N, generator=g)
    implicit = (d, torch.tensor(0.9), i32(5), 1, i32(3), kb, step, i32(4), rb, torch.tensor(0.03))
    return {
        "candidates": (i32(5), N, 1, i32(3), kb, step),
        "selected": (torch.randint(0, K, (N,), generator=g), i32(5), 1, i32(3), kb, step),
        "greedy": (q,),
        "packed_greedy": (q.view(torch.int64), i32(5), 1, i32(3), kb, step),
        "sample": (q, torch.tensor(0.02), i32(5), i32(3), kb),
        "int8_update": (q, d, torch.tensor(-50.0), i32(5), 1, i32(3), kb, step, i32(4), rb),
        "fp32_update": (q.float(), d, torch.tensor(-0.1), i32(5), 0, i32(3), kb, step),
        "requantize": (q, torch.tensor(0.5), i32(5), i32(4), rb),
        "implicit_scores": implicit,
        "implicit_greedy": implicit,
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_fake_kernel_returns_what_the_cpu_kernel_returns(name):
    args = _cases()[name]
    op = getattr(torch.ops.seedslot, name)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    if real is None:  # an in-place op (requantize): nothing returned on either side
        assert fake is None
        return
    real, fake = ((real,), (fake,)) if isinstance(real, torch.Tensor) else (real, fake)
    assert [(t.shape, t.dtype, t.device) for t in fake] == [(t.shape, t.dtype, t.device) for t in real]


def test_the_ops_equal_their_torch_kernels():
    cases = _cases()
    assert torch.equal(torch.ops.seedslot.candidates(*cases["candidates"]), T.candidate_chunk.eager(*cases["candidates"]))
    assert torch.equal(torch.ops.seedslot.int8_update(*cases["int8_update"]), T.int8_update_rows.eager(*cases["int8_update"]))
    q, *rest = cases["requantize"]
    for inv in (rest[0], torch.tensor(1.0)):  # in place, and nothing at factor 1
        got = q.clone()
        torch.ops.seedslot.requantize(got, inv, *rest[1:])
        assert torch.equal(got, T.requantize_chunk.eager(q, inv, *rest[1:]))
        assert torch.equal(got, q) == (float(inv) == 1.0)
    idx, value = torch.ops.seedslot.implicit_greedy(*cases["implicit_greedy"])
    assert torch.equal(idx, T.implicit_chunk.eager(*cases["implicit_scores"]).argmax(-1))


def test_a_users_compiled_graph_holds_the_ops_whole():
    """Inside torch.compile the ops are single nodes (their fakes give the shapes), not traced bodies."""
    args = _cases()["candidates"]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    got = torch.compile(lambda *a: torch.ops.seedslot.candidates(*a) * 2, backend=backend, fullgraph=True)(*args)
    assert torch.equal(got, T.candidate_chunk.eager(*args) * 2)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.seedslot.candidates in targets or torch.ops.seedslot.candidates.default in targets


ROOT = pathlib.Path(seedslot.__file__).parent
# what chooses a kernel: only the op layer (seedslot/ops) may name these
DISPATCH = {"use_triton", "compile_enabled", "triton_enabled", "numba_enabled", "triton_on", "runs_triton",
            "cpu_twins", "numba_kernels", "is_cuda", "_backends", "_numba", "_triton", "_torch"}


def test_no_device_or_compile_check_outside_the_op_layer():
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "ops":
            continue
        names = {n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name) else None
                 for n in ast.walk(ast.parse(path.read_text()))}
        names |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                  for a in n.names}
        names |= {n.module.rpartition(".")[2] for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.ImportFrom) and n.module}
        if names & DISPATCH:
            found[str(rel)] = sorted(names & DISPATCH)
        if re.search(r"(environ|getenv)[^\n]*SEEDSLOT_(COMPILE|TRITON|NUMBA)", path.read_text()):
            found.setdefault(str(rel), []).append("reads SEEDSLOT_*")
    assert found == {}


def test_the_random_function_module_holds_only_the_random_function():
    from seedslot import rng

    public = {n for n in vars(rng) if not n.startswith("_") and callable(getattr(rng, n))
              and getattr(getattr(rng, n), "__module__", None) == rng.__name__}
    assert public == {"derive", "torch_seed", "key32", "keys32", "key32_at", "key_prefix", "key32_fold", "mix32", "bits",
                      "noise_bits", "noise_round", "signed24", "unit24"}
