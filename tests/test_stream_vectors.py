"""Known answers of random stream version 1 (tests/data/stream_v1.json), checked against every
implementation: eager torch, torch.compile, Triton (the interpreter without a GPU), the numba
twin and the numpy reference; and the zoo's fingerprints on the CPU, through Triton and numba,
and after state_dict and export round trips.

The file pins the stream: a change to any value a seed gives fails here. If the change is meant,
it is a new stream version (seedslot.rng.STREAM_VERSION, a new file from
tests/data/make_stream_vectors.py), never a regenerated stream_v1.json.
"""

import json
import os

import numpy as np
import pytest
import torch

import seedslot as ss
from seedslot.export import export
from seedslot.models import build
from seedslot.rng import STREAM_VERSION, derive, key32
from seedslot.testing import assert_regenerates, fingerprint

from reference import np_bits, np_noise_bits

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stream_v1.json")
with open(DATA) as _f:
    V = json.load(_f)

STREAMS = V["streams"]
SIGMA, BOUND, TAGS = V["sigma"], V["bound"], V["tags"]


def _id(e: dict) -> str:
    return f"seed{e['seed'] % 10**6}-k{e['k']}-at{e['offset']}-{e['sharing']}"


# ---------------------------------------------------------------- implementation-specific calls
#
# The one place that names seedslot's kernels and dispatch: the torch kernels of the op layer
# (seedslot.ops._torch) with .eager/.compiled/.triton, and the numba twins of seedslot.ops._numba.
# The tests below only call these helpers.

from seedslot import candidates as _C  # noqa: E402
from seedslot import ops as _ops  # noqa: E402
from seedslot import rng as _rng  # noqa: E402
from seedslot.ops import _backends  # noqa: E402
from seedslot.ops import _torch as _S  # noqa: E402
from seedslot.ops import _torch as _Sel  # noqa: E402

IMPLS = ("eager", "compiled", "triton", "numba", "numpy")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unavailable(impl: str) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        from seedslot.ops import _triton

        if DEV.type == "cpu" and not _triton.interpreted():
            return "no GPU and TRITON_INTERPRET was not set before triton was imported"
    if impl == "numba" and _backends.numba_kernels() is None:
        return "numba is not installed (or SEEDSLOT_NUMBA=0)"
    return None


def _kernel(fused, impl: str):
    """The ``impl`` path of a fused kernel, taking and returning CPU tensors (None: it has none)."""
    if impl in ("eager", "compiled"):
        return getattr(fused, impl)
    if impl == "triton":
        def run(*args):
            out = fused.triton(*(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args))
            return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
        return run
    return None


def _keys(key_a: int, keys_b: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops.i32(key_a), torch.tensor(keys_b, dtype=torch.int32)


def stream_words(impl: str, stream: str, conn: np.ndarray, key_a: int, keys_b: list[int]) -> np.ndarray | None:
    """The uint32 words of ``stream`` ("rounding": noise_bits, else bits) by the public random
    function (eager) or the numpy reference."""
    if impl == "numpy":
        return (np_noise_bits if stream == "rounding" else np_bits)(conn, key_a, np.array(keys_b))
    if impl == "eager":
        f = _rng.noise_bits if stream == "rounding" else _rng.bits
        c = torch.tensor(conn, dtype=torch.int32)
        return f(c, key_a, torch.tensor(keys_b, dtype=torch.int32)).numpy().view(np.uint32)
    return None


def candidate_values(impl: str, start: int, n: int, per_conn: int, key_a: int, keys_b: list[int]) -> np.ndarray | None:
    """(n, K) candidates (grid of SIGMA) of connections start.. by ``impl``."""
    step = _C.grid_step(SIGMA)
    if impl == "numba":  # the twin re-selects one candidate: K = 1 per key gives candidate j
        cols = [numba_greedy(start, n, per_conn, (key_a, [kb]), (0, [0]), SIGMA, BOUND)[1] for kb in keys_b]
        return np.stack(cols, -1)
    f = _kernel(_S.candidate_chunk, impl)
    return None if f is None else f(_ops.i32(start), n, per_conn, *_keys(key_a, keys_b), step).numpy()


def initial_scores(impl: str, start: int, n: int, key_a: int, keys_b: list[int]) -> np.ndarray | None:
    """(n, K) fp32 initial scores U(0, BOUND) of connections start.. (implicit scores at drift 0,
    factor 1 are exactly the initial scores)."""
    f = _kernel(_S.implicit_chunk, impl)
    if f is None:
        return None
    k = len(keys_b)
    return f(torch.zeros(n), torch.tensor(1.0), _ops.i32(start), 1, *_keys(0, [0] * k), _C.grid_step(SIGMA),
             *_keys(key_a, keys_b), torch.tensor(BOUND)).numpy()


def initial_scores_from_seed(seed: int, k: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fp32 scores, int8 levels) of the layer initialisation path (eager), from the seed."""
    fp32, _ = _C.init_scores(n, k, seed, BOUND, start, torch.float32)
    int8, _ = _C.init_scores(n, k, seed, BOUND, start, torch.int8)
    return fp32.numpy(), int8.numpy()


def numba_greedy(start, n, per_conn, cand, init, sigma, bound) -> tuple[np.ndarray, np.ndarray]:
    """The numba twin's greedy selection at drift 0 (the argmax of the initial scores) and its
    candidate: (index, value) per connection."""
    k = len(cand[1])
    sel, val = torch.zeros(n, dtype=torch.uint8 if k <= 256 else torch.int32), torch.zeros(n)
    lo, hi = torch.full((n,), np.inf), torch.full((n,), -np.inf)  # empty intervals: every row re-selected
    ca, cb = _keys(*cand)
    sa, sb = _keys(*init)
    got = _backends.numba_kernels().incremental_greedy(torch.zeros(n), torch.tensor(1.0), lo, hi, sel, val, ca, cb,
                                             _C.grid_step(sigma), sa, sb, torch.tensor(bound), start, per_conn)
    assert got == n
    return sel.numpy().astype(np.int64), val.numpy()


def rounded_levels(impl: str, q: torch.Tensor, inv: float, start: int, key_a: int, keys_b: list[int]):
    """floor(q * inv + r) clamped to int8, r the rounding uniforms of connections start..
    (the requantisation of int8 scores)."""
    f = _kernel(_S.requantize_chunk, impl)
    return None if f is None else f(q, torch.tensor(inv), _ops.i32(start), *_keys(key_a, keys_b)).numpy()


def sample_at_equal_scores(impl: str, start: int, n: int, key_a: int, keys_b: list[int]) -> np.ndarray | None:
    """The (n,) draws from softmax of equal scores: the index of the largest sampling uniform."""
    f = _kernel(_Sel.sample_chunk, impl)
    if f is None:
        return None
    return f(torch.zeros(n, len(keys_b)), torch.tensor(1.0), _ops.i32(start), *_keys(key_a, keys_b)).numpy()


def force_triton(monkeypatch) -> None:
    """Route every kernel of a model to its Triton twin (CPU tensors run in the interpreter)."""
    if DEV.type == "cpu":
        monkeypatch.setattr(_backends, "cuda_kernels_on_cpu", True)


def use_numba(monkeypatch, on: bool) -> None:
    """Whether the CPU runs the numba twins where they exist."""
    monkeypatch.setenv("SEEDSLOT_NUMBA", "1" if on else "0")


# ---------------------------------------------------------------- helpers


def _need(impl: str) -> None:
    why = _unavailable(impl)
    if why:
        pytest.skip(why)


def assert_known(got, want, what: str, e: dict) -> None:
    """``got`` equals the file's ``want`` bit for bit; else the first differing (row, candidate)."""
    got = np.asarray(got)
    want = np.asarray(want).astype(got.dtype)
    assert got.shape == want.shape, f"{what} of {_id(e)}: shape {got.shape}, the file has {want.shape}"
    if got.dtype.kind == "f":  # bit for bit
        width = {4: np.int32, 8: np.int64}[got.dtype.itemsize]
        bad = np.argwhere(got.view(width) != want.view(width))
    else:
        bad = np.argwhere(got != want)
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise AssertionError(f"{what} of {_id(e)} (stream version {V['stream_version']}) differs from the known answer "
                             f"at (row, candidate) {where}: {got[where]!r}, the file has {want[where]!r} "
                             f"({len(bad)} of {got.size} values differ)")


def _conn(e: dict) -> np.ndarray:
    return np.arange(e["rows"], dtype=np.int64) + e["offset"]


def _per_conn(e: dict) -> int:
    return 1 if e["sharing"] == "none" else 0


# ---------------------------------------------------------------- the streams


def test_file_is_this_stream_version():
    assert V["stream_version"] == STREAM_VERSION == 1


def test_derive_and_stream_keys():
    for d in V["derive"]:
        assert derive(*d["words"]) == d["value"], d
    for e in STREAMS:
        seed, k = e["seed"], e["k"]
        recipe = {"candidates": (0,), "initial_scores": (0,), "rounding": (2, e["step"]), "sampling": (2, e["draw"])}
        for stream, words in recipe.items():
            key_a, keys_b = e["keys"][stream]
            assert key32(seed, TAGS[stream], *words) == key_a, (stream, _id(e))
            assert [key32(seed, TAGS[stream], 1, j) for j in range(k)] == keys_b, (stream, _id(e))


@pytest.mark.parametrize("impl", ["eager", "numpy"])
@pytest.mark.parametrize("e", STREAMS, ids=_id)
def test_stream_words(impl, e):
    for stream, conn in (("candidates", _conn(e) * _per_conn(e)), ("initial_scores", _conn(e)),
                         ("rounding", _conn(e)), ("sampling", _conn(e))):
        words = stream_words(impl, stream, conn, *e["keys"][stream])
        key = "initial_score_words" if stream == "initial_scores" else f"{stream.removesuffix('s')}_words"
        assert_known(words.astype(np.int64), e[key], f"{stream} words by {impl}", e)


@pytest.mark.parametrize("impl", ["eager", "compiled", "triton", "numba"])
@pytest.mark.parametrize("e", STREAMS, ids=_id)
def test_candidates(impl, e):
    _need(impl)
    got = candidate_values(impl, e["offset"], e["rows"], _per_conn(e), *e["keys"]["candidates"])
    assert_known(got, e["candidates"], f"candidates by {impl}", e)


@pytest.mark.parametrize("impl", ["eager", "compiled", "triton"])
@pytest.mark.parametrize("e", STREAMS, ids=_id)
def test_initial_scores(impl, e):
    _need(impl)
    got = initial_scores(impl, e["offset"], e["rows"], *e["keys"]["initial_scores"])
    assert_known(got, e["initial_scores"], f"initial scores by {impl}", e)
    if impl == "eager":  # the layers' initialisation, from the seed
        fp32, levels = initial_scores_from_seed(e["seed"], e["k"], e["offset"], e["rows"])
        assert_known(fp32, e["initial_scores"], "initial scores (fp32 storage)", e)
        assert_known(levels.astype(np.int64), e["initial_levels"], "initial int8 levels", e)


@pytest.mark.parametrize("e", STREAMS, ids=_id)
def test_numba_initial_selection(e):
    """The numba twin (which regenerates candidates and initial scores itself) selects the argmax
    of the known initial scores, and its candidate."""
    _need("numba")
    idx, val = numba_greedy(e["offset"], e["rows"], _per_conn(e), e["keys"]["candidates"], e["keys"]["initial_scores"],
                            SIGMA, BOUND)
    want = np.asarray(e["initial_scores"], dtype=np.float32).argmax(-1)
    assert_known(idx, want, "numba's initial selection", e)
    assert_known(val, np.asarray(e["candidates"], dtype=np.float32)[np.arange(e["rows"]), want],
                 "numba's selected candidate", e)


@pytest.mark.parametrize("impl", ["eager", "compiled", "triton"])
@pytest.mark.parametrize("e", STREAMS, ids=_id)
def test_rounding_noise(impl, e):
    """Requantisation floor(q / 128 + r) consumes the known rounding uniforms r (q spread over
    int8, so the 7 top bits of every r decide a level)."""
    _need(impl)
    n, k = e["rows"], e["k"]
    q = ((torch.arange(n * k) * 37 + e["seed"] % 251) % 256 - 128).to(torch.int8).view(n, k)
    got = rounded_levels(impl, q, 2.0**-7, e["offset"], *e["keys"]["rounding"])
    r = np.asarray(e["rounding_uniforms"], dtype=np.float32)
    want = np.clip(np.floor(q.numpy().astype(np.float32) * np.float32(2.0**-7) + r), -128, 127).astype(np.int8)
    assert_known(got, want, f"rounding by {impl}", e)


@pytest.mark.parametrize("impl", ["eager", "compiled", "triton"])
@pytest.mark.parametrize("e", STREAMS, ids=_id)
def test_sampling(impl, e):
    _need(impl)
    got = sample_at_equal_scores(impl, e["offset"], e["rows"], *e["keys"]["sampling"])
    assert_known(got, e["sample_index"], f"draws by {impl}", e)
    assert_known(np.asarray(e["sampling_uniforms"], dtype=np.float32).argmax(-1), e["sample_index"], "uniforms", e)


# ---------------------------------------------------------------- layers and models (public API)


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("entry", V["layers"], ids=lambda e: e["kind"])
def test_layer_first_values(impl, entry, monkeypatch):
    _need(impl)
    if impl == "triton":
        force_triton(monkeypatch)
    for scores, key in (("fp32", "initial_scores_fp32"), ("int8", "initial_scores_int8")):
        layer = getattr(ss, entry["kind"])(*entry["args"], scores=scores, **entry["kwargs"])
        for part, want in entry["parts"].items():
            tag = {"seed": entry["kwargs"]["seed"], "k": entry["kwargs"]["k"], "offset": 0,
                   "sharing": entry["kwargs"]["sharing"]}
            first = len(want["candidates"])
            assert_known(layer.candidates(part).reshape(-1)[:first].numpy(), want["candidates"],
                         f"{entry['kind']} {part} candidates", tag)
            assert_known(layer.score_values(part).reshape(-1)[:first].numpy(), want[key],
                         f"{entry['kind']} {part} {key}", tag)


def _model_id(m: dict) -> str:
    return f"{m['name']}-{m['mode']}-{m['scores']}-k{m['k']}-{m['sharing']}"


def _settings(m: dict) -> dict:
    return {key: v for key, v in m.items() if key != "fingerprint"}


@pytest.mark.parametrize("m", [pytest.param(m, marks=pytest.mark.slow) if m["name"] == "vgg19" else m
                               for m in V["models"]], ids=_model_id)
def test_zoo_fingerprints(m):
    assert fingerprint(build(**_settings(m))) == m["fingerprint"], _model_id(m)


def test_dense_reference_has_the_seeded_fingerprint():
    """The dense reference holds the seeded layers' candidates and fp32 initial scores."""
    by = {(m["mode"], m["scores"], m["name"], m["k"], m["seed"]): m["fingerprint"] for m in V["models"]}
    assert by[("dense", "int8", "lenet", 4, 1)] == by[("seeded", "fp32", "lenet", 4, 1)]


LENETS = [m for m in V["models"] if m["name"] == "lenet"]  # the Triton interpreter is slow: the small models
ROUND_TRIPS = [m if m["name"] == "lenet" else pytest.param(m, marks=pytest.mark.slow)
               for m in V["models"] if m["name"] in ("lenet", "conv2")]


@pytest.mark.parametrize("m", LENETS, ids=_model_id)
def test_zoo_fingerprints_through_triton(m, monkeypatch):
    _need("triton")
    force_triton(monkeypatch)
    assert fingerprint(build(**_settings(m))) == m["fingerprint"], _model_id(m)


@pytest.mark.parametrize("m", [m for m in V["models"] if m["scores"] == "implicit"], ids=_model_id)
@pytest.mark.parametrize("numba", [True, False])
def test_zoo_fingerprints_incremental(m, numba, monkeypatch):
    """Incremental implicit selection, through the numba twin and through torch: the fingerprint
    of plain implicit scores."""
    if numba:
        _need("numba")
    use_numba(monkeypatch, numba)
    s = _settings(m)
    config = ss.SlotConfig(k=s.pop("k"), seed=s.pop("seed"), sharing=s.pop("sharing"), scores=s.pop("scores"),
                           incremental=True)
    assert fingerprint(build(**s, config=config)) == m["fingerprint"], _model_id(m)


@pytest.mark.parametrize("m", ROUND_TRIPS, ids=_model_id)
def test_zoo_fingerprints_survive_state_dict_and_export(m, tmp_path):
    model = build(**_settings(m))
    with torch.no_grad():  # selections other than the initial ones
        for layer in model.modules():
            if isinstance(layer, ss.SlotLinear) and getattr(layer, "scores", None) == "fp32":
                layer.weight_scores.mul_(-1.0)
    fresh = build(**{**_settings(m), "seed": m["seed"] + 1})
    fresh.load_state_dict(model.state_dict())
    assert fingerprint(fresh) == fingerprint(model)
    export(model, tmp_path / "m.slot")
    assert fingerprint(tmp_path / "m.slot") == fingerprint(model)
    assert_regenerates(model, via=("state_dict", "export", "threads"))
