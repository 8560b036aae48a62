"""A proxy Parameter knows its layer through a weak tag on itself, not a module-global registry."""

import copy
import gc
import io
import pickle
import weakref

import torch

import seedslot as ss
from seedslot import storages
from seedslot.proxies import slot_owner


def test_each_copy_of_a_layer_owns_its_own_proxies():
    m = torch.nn.Sequential(ss.SlotLinear(4, 3, k=4, bias=True, scores="implicit"))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False)):
        for part in ("weight", "bias"):
            assert slot_owner(getattr(other[0], f"slot_{part}")) == (other[0], part)
            assert slot_owner(getattr(m[0], f"slot_{part}")) == (m[0], part)


def test_a_bare_copy_of_a_proxy_belongs_to_no_layer_and_a_proxy_keeps_no_layer_alive():
    layer = ss.SlotLinear(4, 3, k=4)
    assert slot_owner(copy.deepcopy(layer.slot_weight)) is None
    assert slot_owner(pickle.loads(pickle.dumps(layer.slot_weight))) is None
    assert slot_owner(torch.zeros(3)) is None
    proxy, ref = layer.slot_weight, weakref.ref(layer)
    del layer
    gc.collect()
    assert ref() is None and slot_owner(proxy) is None


def test_no_global_registry_and_state_names_stay():
    assert not any(isinstance(v, dict) or type(v).__name__.startswith("Weak") for k, v in vars(storages).items()
                   if k.startswith("_OWNER"))
    layer = ss.SlotLinear(4, 3, bias=True, config=ss.SlotConfig(k=4, scores="implicit", incremental=True))
    assert list(layer.state_dict()) == ["draws", "weight_drift", "weight_scale", "bias_drift", "bias_scale",
                                        "_extra_state"]
    t = layer.storage.tensors(layer, "bias")
    assert t.drift is layer.bias_drift and t.val is layer.bias_val
