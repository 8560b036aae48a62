"""seedslot.testing, the kit users build their determinism tests on: its assertions fail with
readable messages, its fingerprint is stable where the promise says so and changes where it must,
and its strategies draw what they say. The kit's known answers: tests/test_stream_vectors.py."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import seedslot as ss
from seedslot.export import export
from seedslot.models import build
from seedslot.testing import (EDGE_SEEDS, assert_regenerates, assert_same_candidates, assert_same_selection,
                              connection_offsets, fingerprint, slot_configs, slot_layers)

FAST = settings(max_examples=25, deadline=None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def net(config: ss.SlotConfig, second_seed: int | None = None) -> nn.Module:
    second = config if second_seed is None else config.replace(seed=second_seed)
    return nn.Sequential(ss.SlotConv2d(2, 3, 3, bias=True, config=config), nn.Flatten(),
                         ss.SlotLinear(3 * 2 * 2, 5, bias=True, config=second))


def test_candidate_mismatch_names_layer_connection_and_both_values():
    a, b = net(ss.SlotConfig(seed=1)), net(ss.SlotConfig(seed=1), second_seed=2)
    assert_same_candidates(a, a)
    want_a, want_b = a[2].candidates()[0, 0, 0].item(), b[2].candidates()[0, 0, 0].item()
    with pytest.raises(AssertionError) as e:
        assert_same_candidates(a, b)
    assert str(e.value) == (f"layer '2' weight: candidates differ at connection (0, 0) candidate 0: {want_a!r} in a, "
                            f"{want_b!r} in b (480 of 480 values differ)")
    with pytest.raises(AssertionError, match="^after loading: layer '2'"):
        assert_same_candidates(a, b, msg="after loading")


def test_selection_mismatch_names_layer_connection_indices_and_values():
    a = net(ss.SlotConfig(seed=3, k=4, scores="fp32"))
    b = net(ss.SlotConfig(seed=3, k=4, scores="fp32"))
    assert_same_selection(a, b)
    with torch.no_grad():
        i = int(a[0].selected_index()[1, 0, 2, 1])
        b[0].weight_scores[1, 0, 2, 1, (i + 1) % 4] = 10.0  # connection (1, 0, 2, 1) now selects another
    j = (i + 1) % 4
    va, vb = a[0].candidates()[1, 0, 2, 1, i].item(), a[0].candidates()[1, 0, 2, 1, j].item()
    with pytest.raises(AssertionError) as e:
        assert_same_selection(a, b)
    assert str(e.value) == (f"layer '0' weight: greedy selection differs at connection (1, 0, 2, 1): candidate {i} "
                            f"(value {va!r}) in a, candidate {j} (value {vb!r}) in b (1 of 54 connections differ)")


def test_other_layers_k_or_sharing_are_named():
    with pytest.raises(AssertionError, match=r"only in a: \['2'\], only in b: \[\]"):
        assert_same_candidates(net(ss.SlotConfig()), net(ss.SlotConfig())[:2])
    with pytest.raises(AssertionError, match="layer '0': k is 8 in a, 4 in b"):
        assert_same_candidates(net(ss.SlotConfig()), net(ss.SlotConfig(k=4)))
    with pytest.raises(AssertionError, match="the layer: sharing is 'none' in a, 'layer' in b"):
        assert_same_selection(ss.SlotLinear(3, 2), ss.SlotLinear(3, 2, sharing="layer"))


def test_assert_regenerates_catches_candidates_that_do_not_follow_the_seeds():
    model = net(ss.SlotConfig(seed=4))
    assert_regenerates(model, via=("state_dict", "export", "threads"))
    with torch.no_grad():
        model[2]._cand_keys[3] ^= 1  # keys no longer those of the seed: what no file can carry
    with pytest.raises(AssertionError, match=r"^regenerated from the state_dict: layer '2' weight: candidates differ "
                                             r"at connection \(0, 0\) candidate 3: "):
        assert_regenerates(model, via=("state_dict",))
    with pytest.raises(AssertionError, match="^regenerated from an export: layer '2' weight: candidates differ"):
        assert_regenerates(model, via=("export",))
    with pytest.raises(ValueError, match="via must name some of"):
        assert_regenerates(model, via=("disk",))


def test_assert_regenerates_in_a_fresh_process_and_from_build_args():
    assert_regenerates(ss.SlotLinear(4, 3, bias=True, k=3, seed=2**100), via=("process", "state_dict", "threads"))
    lenet = build("lenet", mode="seeded", k=4, seed=9, input_size=6, scores="implicit")
    assert_regenerates(lenet, via=("process", "state_dict"))


def test_fingerprint_follows_seeds_and_selections_not_storage_or_copies(tmp_path):
    model = net(ss.SlotConfig(seed=5, k=4, scores="fp32"))
    print_ = fingerprint(model)
    assert len(print_) == 16 and int(print_, 16) >= 0
    assert fingerprint(net(ss.SlotConfig(seed=5, k=4, scores="fp32"))) == print_  # a fresh build
    assert fingerprint(net(ss.SlotConfig(seed=5, k=4, scores="implicit"))) == print_  # the same initial selections
    other = net(ss.SlotConfig(seed=6, k=4, scores="fp32"))
    assert fingerprint(other) != print_
    other.load_state_dict(model.state_dict())  # the seeds travel in the state_dict
    assert fingerprint(other) == print_
    export(model, tmp_path / "m.slot")
    assert fingerprint(tmp_path / "m.slot") == fingerprint(str(tmp_path / "m.slot")) == print_
    with torch.no_grad():
        model[2].weight_scores[4, 1] = -model[2].weight_scores[4, 1]  # one connection selects another
    assert fingerprint(model) != print_
    with pytest.raises(ValueError, match="holds none"):
        fingerprint(nn.Linear(2, 2))


class EveryKind(nn.Module):
    """One module of every kind slotify_ converts, with a shared-candidates layer among them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.conv1 = nn.Conv1d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, groups=1)
        self.attn = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("sharing", ["none", "global"])
def test_an_export_of_every_layer_kind_has_its_models_fingerprint(tmp_path, sharing):
    model = EveryKind()
    ss.slotify_(model, ss.SlotConfig(k=5, seed=3, sharing=sharing), strict=True)
    export(model, tmp_path / "m.slot")
    assert fingerprint(tmp_path / "m.slot") == fingerprint(model)
    assert_regenerates(model, via=("export",))


def test_kit_imports_without_hypothesis_or_the_application():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import seedslot, seedslot.testing as T\n"
            "from seedslot.testing import fingerprint, assert_same_candidates, assert_regenerates\n"
            "print(fingerprint(seedslot.SlotLinear(3, 2)))\n"
            "assert not any(m.startswith('seedslot.app') for m in sys.modules)\n"
            "for name in ('slot_configs', 'slot_layers', 'connection_offsets'):\n"
            "    try:\n"
            "        exec(f'from seedslot.testing import {name}')\n"
            "    except ImportError as e:\n"
            "        assert 'pip install seedslot[testing]' in str(e), e\n"
            "    else:\n"
            "        raise SystemExit(name + ' imported without hypothesis')\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == fingerprint(ss.SlotLinear(3, 2))


# ---------------------------------------------------------------- the strategies, and the kit on them


@FAST
@given(layer=slot_layers(dense=None))
def test_drawn_layers_regenerate(layer):
    assert_regenerates(layer, via=("state_dict", "export", "threads"))


@FAST
@given(config=slot_configs())
def test_drawn_configs_give_models_whose_seeds_stand_for_them(config):
    model = net(config)
    fresh = net(config.replace(seed=config.seed ^ 1))
    fresh.load_state_dict(model.state_dict())
    assert_same_candidates(model, fresh)
    assert_same_selection(model, fresh)
    assert fingerprint(fresh) == fingerprint(model)


@settings(max_examples=200, deadline=None)
@given(config=slot_configs(max_seed=2**200), layer=slot_layers(max_connections=300), offset=connection_offsets(rows=7))
def test_strategies_draw_within_their_ranges(config, layer, offset):
    assert 1 <= config.k <= 16 and 0 <= config.seed <= 2**200
    assert config.incremental <= (config.scores == "implicit")
    assert sum(layer.candidates(p).shape[:-1].numel() for p in layer.parts) <= 300
    assert 0 <= offset and offset + 6 <= 2**31 - 1


def test_edge_seeds_are_accepted_by_layers():
    for seed in EDGE_SEEDS:
        assert_same_candidates(ss.SlotLinear(2, 2, seed=seed), ss.SlotLinear(2, 2, seed=seed))


def test_readme_example_is_tests_user_example():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("## Determinism promise", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = open(os.path.join(ROOT, "tests", "test_user_example.py")).read()
    assert example.endswith(block) and block.startswith("import torch")


def test_a_layer_used_twice_counts_under_each_name(tmp_path):
    shared = ss.SlotLinear(4, 4, k=1, seed=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, ss.SlotLinear(4, 4, k=1, seed=1))
    export(model, tmp_path / "m.slot")
    assert fingerprint(tmp_path / "m.slot") == fingerprint(model)
    assert_regenerates(model, via=("export", "state_dict"))
    with pytest.raises(AssertionError, match=r"only in a: \['2'\]"):
        assert_same_candidates(model, nn.Sequential(shared, nn.ReLU(), nn.ReLU(), ss.SlotLinear(4, 4, k=1, seed=1)))
