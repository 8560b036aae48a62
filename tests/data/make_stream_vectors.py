"""Write tests/data/stream_v1.json: known-answer vectors of random stream version 1.

The first values of the four streams a seed gives (candidates, initial scores, rounding noise,
sampling) for a table of seeds, K, connection offsets and sharing modes, computed with the numpy
uint32 reference (tests/reference.py) from keys :func:`seedslot.rng.key32` derives; a few
layers' first candidates and initial scores through the public layer API; and the
:func:`seedslot.testing.fingerprint` of the zoo's models. tests/test_stream_vectors.py checks
every implementation against the file: it pins the stream, so it is written once per stream
version, never regenerated to make a test pass. Refuses to overwrite the file without --force.

    PYTHONPATH=. python tests/data/make_stream_vectors.py [--force] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for reference.py
os.environ.setdefault("SEEDSLOT_COMPILE", "0")

from reference import np_bits, np_noise_bits  # noqa: E402

# Stream tags: every random number of a layer comes from derive(seed, tag, ...) (seedslot.candidates).
TAGS = {"candidates": 1, "initial_scores": 2, "sampling": 3, "rounding": 4}
ROWS = 3
SIGMA = 0.3125  # candidates U[-sigma, sigma) on a grid of sigma / 2**23
BOUND = 0.03125  # initial scores U[0, bound)

# (seed, K, first connection, sharing): seeds at integer-width edges and beyond 64 bits, K from 1,
# offsets at 0, bit boundaries and the last connections int32 holds (2**31 - 1).
TABLE = [
    (0, 8, 0, "none"),
    (0, 8, 0, "layer"),
    (1, 1, 5, "none"),
    (2**31 - 1, 3, 2**31 - ROWS, "none"),
    (2**63 - 1, 8, 2**31 - ROWS, "layer"),
    (2**64, 16, 2**24 - 1, "none"),
    (2**100 + 7, 8, 1000, "none"),
    (123456789, 3, 2**16 - 2, "layer"),
]

# The zoo's models at fixed settings: build(name, mode=..., input_size=..., k=..., seed=..., ...).
MODELS = [
    dict(name="lenet", mode="seeded", input_size=8, k=8, seed=0, scores="int8", sharing="none"),
    dict(name="lenet", mode="seeded", input_size=8, k=4, seed=1, scores="fp32", sharing="none"),
    dict(name="lenet", mode="dense", input_size=8, k=4, seed=1, scores="int8", sharing="none"),
    dict(name="conv2", mode="seeded", input_size=8, k=4, seed=2**63 - 1, scores="implicit", sharing="layer"),
    dict(name="conv4", mode="seeded", input_size=16, k=16, seed=5, scores="fp32", sharing="global"),
    dict(name="conv6", mode="seeded", input_size=24, k=2, seed=12345, scores="implicit", sharing="none"),
    dict(name="vgg19", mode="seeded", input_size=32, k=2, seed=7, scores="int8", sharing="none"),
]

# Layers through the public API: (kind, args, keywords).
LAYERS = [
    ("SlotLinear", [7, 5], dict(bias=True, k=4, seed=3, sharing="none")),
    ("SlotConv2d", [2, 3, 3], dict(bias=True, k=3, seed=2**64 + 1, sharing="layer")),
]
FIRST = 8  # values recorded per part


def f32(x) -> np.float32:
    return np.float32(x)


def stream_entry(seed: int, k: int, offset: int, sharing: str, number: int) -> dict:
    from seedslot.rng import key32

    def keys(tag: int, key_a_words: tuple) -> tuple[int, list[int]]:
        return key32(seed, tag, *key_a_words), [key32(seed, tag, 1, j) for j in range(k)]

    step, draw = number, number  # the rounding noise of update `step`, the sampling noise of draw `draw`
    cand_a, cand_b = keys(TAGS["candidates"], (0,))
    init_a, init_b = keys(TAGS["initial_scores"], (0,))
    round_a, round_b = keys(TAGS["rounding"], (2, step))
    sample_a, sample_b = keys(TAGS["sampling"], (2, draw))
    conn = np.arange(ROWS, dtype=np.int64) + offset
    per_conn = 1 if sharing == "none" else 0
    cand = np_bits(conn * per_conn, cand_a, np.array(cand_b))
    init = np_bits(conn, init_a, np.array(init_b))
    rnd = np_noise_bits(conn, round_a, np.array(round_b))
    smp = np_bits(conn, sample_a, np.array(sample_b))
    grid = f32(SIGMA) * f32(2.0**-23)
    top24 = lambda b: (b >> np.uint32(8)).astype(np.int64)  # noqa: E731
    unit = lambda b: top24(b).astype(np.float32) * f32(2.0**-24)  # noqa: E731
    sample_u = (top24(smp).astype(np.float32) + f32(0.5)) * f32(2.0**-24)
    return dict(
        seed=seed, k=k, offset=offset, sharing=sharing, rows=ROWS, step=step, draw=draw,
        keys=dict(candidates=[cand_a, cand_b], initial_scores=[init_a, init_b], rounding=[round_a, round_b],
                  sampling=[sample_a, sample_b]),
        candidate_words=cand.tolist(),
        candidates=((top24(cand) - (1 << 23)).astype(np.float32) * grid).tolist(),
        initial_score_words=init.tolist(),
        initial_scores=(unit(init) * f32(BOUND)).tolist(),
        initial_levels=((init >> np.uint32(25)) & np.uint32(0x7F)).astype(np.int64).tolist(),
        rounding_words=rnd.tolist(),
        rounding_uniforms=unit(rnd).tolist(),
        sampling_words=smp.tolist(),
        sampling_uniforms=sample_u.tolist(),
        sample_index=sample_u.argmax(-1).tolist(),  # a draw at equal scores: the largest uniform
    )


def layer_entry(kind: str, args: list, kw: dict) -> dict:
    import seedslot as ss

    out = dict(kind=kind, args=args, kwargs=kw, parts={})
    layers = {scores: getattr(ss, kind)(*args, scores=scores, **kw) for scores in ("fp32", "int8")}
    for part in layers["fp32"].parts:
        out["parts"][part] = dict(
            candidates=layers["fp32"].candidates(part).reshape(-1)[:FIRST].tolist(),
            initial_scores_fp32=layers["fp32"].score_values(part).reshape(-1)[:FIRST].tolist(),
            initial_scores_int8=layers["int8"].score_values(part).reshape(-1)[:FIRST].tolist())
    return out


def model_entry(settings: dict) -> dict:
    from seedslot.models import build
    from seedslot.testing import fingerprint

    return dict(settings, fingerprint=fingerprint(build(**settings)))


def vectors() -> dict:
    from seedslot.rng import STREAM_VERSION, derive

    assert STREAM_VERSION == 1, "this script writes the vectors of stream version 1"
    words = [[0], [1], [2**31 - 1], [2**63 - 1], [2**64], [2**100 + 7], [5, 1, 0], [5, 1, 1, 7], [2**64 + 1, 4, 2, 9]]
    return dict(
        stream_version=STREAM_VERSION,
        about=("Known answers of seedslot's random stream version 1 (written by tests/data/make_stream_vectors.py, "
               "checked by tests/test_stream_vectors.py). Stream s of a seed has key_a = key32(seed, tag_s, 0) "
               "(rounding: key32(seed, 4, 2, step); sampling: key32(seed, 3, 2, draw)) and keys_b[j] = "
               "key32(seed, tag_s, 1, j); its words are bits(conn, key_a, keys_b) (rounding: noise_bits) with "
               "conn = offset + row, times 0 for the candidates of shared sharing modes. Words are uint32."),
        tags=TAGS, sigma=SIGMA, bound=BOUND,
        derive=[dict(words=w, value=derive(*w)) for w in words],
        streams=[stream_entry(*row, number=i) for i, row in enumerate(TABLE)],
        layers=[layer_entry(*row) for row in LAYERS],
        models=[model_entry(m) for m in MODELS],
    )


def to_json(data: dict) -> str:
    """``data`` as JSON with one line per table entry (readable diffs, a small file)."""
    items = []
    for key, value in data.items():
        if isinstance(value, list):
            text = "[\n  " + ",\n  ".join(json.dumps(e, separators=(", ", ": ")) for e in value) + "\n ]"
        else:
            text = json.dumps(value)
        items.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "stream_v1.json"))
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        print(f"{args.out} exists: it pins the stream; pass --force to overwrite it", file=sys.stderr)
        return 2
    text = to_json(vectors())
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
