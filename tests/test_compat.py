"""State written by older seedslot versions still loads, and training continues bit for bit.

tests/data/compat_v0.ckpt and compat_v0.slot were written by tests/data/make_compat.py at commit
4579fed, before score storages became classes: a checkpoint of one layer of every kind and score
storage (int8, fp32, implicit, dense), with the eval outputs, selections and scores it had then and
after two more SlotSGD steps.
"""

import importlib.util
import os

import torch

import seedslot as ss
from seedslot.checkpoints import load_checkpoint, load_state_into
from seedslot.layers import decode_slot_state

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_spec = importlib.util.spec_from_file_location("make_compat", os.path.join(DATA, "make_compat.py"))
make_compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_compat)

# The state_dict keys as the old code wrote them, in its order.
OLD_KEYS = [
    "0.draws", "0.weight_scores", "0.weight_scale", "0.bias_scores", "0.bias_scale", "0._extra_state",
    "3.draws", "3.weight_scores", "3.weight_scale", "3.bias_scores", "3.bias_scale", "3._extra_state",
    "5.draws", "5.weight_drift", "5.weight_scale", "5.bias_drift", "5.bias_scale", "5._extra_state",
    "6.weight_scores", "6.bias_scores", "6.draws", "6.weight_candidates", "6.bias_candidates", "6._extra_state",
]


def _assert_same(got: dict, want: dict) -> None:
    """Integer state (int8 scores, selections, counters, keys) bit for bit. Float state to fp32
    rounding: the files were written on another CPU, and torch's own float sums (a conv's output,
    hence the gradients that move fp32 scores, implicit drifts and dense scores) differ there in
    the last bits (seen: 2.4e-7 in an output on this project's AMD EPYC machine); on the machine
    that wrote them they are equal bit for bit."""
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, dict) and isinstance(got[key], torch.Tensor):  # slot state: a dict then, a tensor now
            got = {**got, key: decode_slot_state(got[key])}
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype, key
            if value.dtype.is_floating_point:
                torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
            else:
                assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_old_checkpoint_loads_and_training_continues_bit_for_bit():
    payload = load_checkpoint(os.path.join(DATA, "compat_v0.ckpt"))
    assert list(payload["model"]) == OLD_KEYS
    model = make_compat.compat_model()
    assert list(model.state_dict()) == OLD_KEYS  # today's layers write the same keys
    load_state_into(model, payload["model"])
    opt = ss.SlotSGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    load_state_into(opt, payload["optimizer"])
    x, y = payload["x"], payload["y"]
    _assert_same(make_compat.expected(model, x), payload["before"])
    make_compat.steps(model, opt, x, y, [0.5, 0.5])  # sampled draws, int8 rounding, implicit drift
    _assert_same(make_compat.expected(model, x), payload["after"])
    _assert_same(model.state_dict(), payload["after_model"])


def test_old_export_loads_with_the_same_outputs():
    payload = load_checkpoint(os.path.join(DATA, "compat_v0.ckpt"))
    plain = ss.load_exported(os.path.join(DATA, "compat_v0.slot"), model=make_compat.compat_model())
    torch.testing.assert_close(plain(payload["x"]), payload["after"]["eval_output"], rtol=1e-5, atol=1e-6)
