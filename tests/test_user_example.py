"""The README's "Determinism promise" example, verbatim: a user's own tests written only against
seedslot.testing (keep the two in step)."""

import torch
from hypothesis import given, settings

import seedslot as ss
from seedslot.testing import assert_regenerates, assert_same_candidates, fingerprint, slot_configs


def my_net(config):
    return torch.nn.Sequential(ss.SlotConv2d(3, 4, 3, config=config), torch.nn.Flatten(),
                               ss.SlotLinear(4 * 6 * 6, 10, bias=True, config=config))


@settings(max_examples=20, deadline=None)
@given(config=slot_configs())
def test_my_net_regenerates_from_its_seeds(config):
    model = my_net(config)
    other = my_net(config.replace(seed=config.seed ^ 1))  # other seeds, other candidates...
    other.load_state_dict(model.state_dict())  # ...until the state_dict brings the seeds back
    assert_same_candidates(model, other)
    assert_regenerates(model, via=("export", "threads"))


def test_my_net_still_selects_what_it_selected():  # golden: fails if the stream ever changes
    assert fingerprint(my_net(ss.SlotConfig(k=8, seed=2024))) == "569c8005ecd58358"
