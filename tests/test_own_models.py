"""Models users bring, written here in the styles of published code (a CIFAR ResNet, a MobileNet,
a transformer encoder, a GPT with tied embeddings, a Conv1d net, a DCGAN-style decoder of transposed
convolutions, an nn.MultiheadAttention model): slotify_ converts what it can and says so, strict
refuses, the converted models train, compile, export and reload, and ties hold."""

import collections
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seedslot as ss
from seedslot.checkpoints import CheckpointError
from seedslot.layers import SlotLayer
from train_steps import assert_compiled_trains_as_eager


# ---------------------------------------------------------------- the models


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, width=4, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class MobileNet(nn.Module):
    """Depthwise-separable blocks (groups = channels), ReLU6, a reflect-padded stem."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.blocks = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, groups=16, bias=False), nn.BatchNorm2d(16),
            nn.ReLU6(),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


class Encoder(nn.Module):
    """Token embedding, learned positions, nn.TransformerEncoder, a classification head."""

    def __init__(self, vocab=13, d=16, num_classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 6, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, num_classes)

    def forward(self, idx):
        return self.head(self.encoder(self.embed(idx) + self.pos[:, : idx.shape[1]]).mean(1))


class GPT(nn.Module):
    """nanoGPT's layout: wte tied to lm_head, pre-norm blocks of Linear layers."""

    def __init__(self, vocab=13, d=16, tie=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(8, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), proj=nn.Linear(4 * d, d))) for _ in range(2)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = x + b["proj"](F.gelu(b["fc"](b["ln"](x))))
        return self.lm_head(self.ln_f(x))


class Conv1dNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2, padding_mode="circular"), nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding="same", dilation=2, groups=2, padding_mode="replicate"), nn.ReLU(),
            nn.Conv1d(8, 8, 3, stride=2), nn.ReLU(),
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.net(x).amax(-1))


class Decoder(nn.Module):
    """DCGAN's generator layout: a Linear to a small map, then transposed convolutions (stride 2
    with output_padding, grouped, dilated, one sized by output_size) with batch norm."""

    def __init__(self, z=6):
        super().__init__()
        self.fc = nn.Linear(z, 8 * 2 * 2)
        self.up1 = nn.ConvTranspose2d(8, 8, 4, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.out = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=2, dilation=2)

    def forward(self, z):
        x = F.relu(self.bn1(self.up1(self.fc(z).view(-1, 8, 2, 2))))
        x = F.relu(self.bn2(self.up2(x)))
        return torch.tanh(self.out(x, output_size=[16, 16]))


class Attention(nn.Module):
    """nn.MultiheadAttention used directly: a self-attention with add_bias_kv and add_zero_attn
    (sequence first), a cross-attention without biases (batch first), and one to keys and values
    of other widths (kdim, vdim: separate q/k/v projection weights; sequence first)."""

    def __init__(self, vocab=13, d=16, num_classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.self_attn = nn.MultiheadAttention(d, 4, add_bias_kv=True, add_zero_attn=True)
        self.cross = nn.MultiheadAttention(d, 2, bias=False, batch_first=True)
        self.query = nn.Embedding(1, d)
        self.keys, self.values = nn.Embedding(vocab, 6), nn.Embedding(vocab, 5)
        self.memory = nn.MultiheadAttention(d, 2, kdim=6, vdim=5)
        self.head = nn.Linear(d, num_classes)

    def forward(self, idx):
        x = self.embed(idx)
        h = self.self_attn(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0]
        q = self.query(torch.zeros(idx.shape[0], 1, dtype=torch.long))
        c = self.cross(q, h.transpose(0, 1), x)[0].transpose(0, 1)  # (1, N, d)
        return self.head((c + self.memory(c, self.keys(idx.t()), self.values(idx.t()))[0])[0])


def inputs(name, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name in ("resnet", "mobilenet"):
        return torch.randn(n, 3, 8, 8, generator=g)
    if name in ("encoder", "gpt", "attention"):
        return torch.randint(0, 13, (n, 6), generator=g)
    if name == "decoder":
        return torch.randn(n, 6, generator=g)
    return torch.randn(n, 2, 16, generator=g)


MODELS = {"resnet": ResNet, "mobilenet": MobileNet, "encoder": Encoder, "gpt": GPT, "conv1d": Conv1dNet,
          "decoder": Decoder, "attention": Attention}
# The modules with weights that slotify_ converts (the others: vectors only, or raw Parameters).
CONVERTIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.MultiheadAttention)


def make(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]()


def loss_of(name, model, x):
    out = model(x)
    if name == "gpt":  # next-token prediction
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))
    if name == "decoder":  # fit fixed images
        return F.mse_loss(out, torch.linspace(-0.8, 0.8, out.numel()).view(out.shape))
    return F.cross_entropy(out, torch.arange(x.shape[0]) % 3)


# ---------------------------------------------------------------- conversion and its report


@pytest.mark.parametrize("name", list(MODELS))
def test_report_lists_every_module_with_weights(name):
    model = make(name)
    expected = {}  # parameter name -> module type, every name a parameter has (ties: each name)
    for fqn, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                expected[f"{fqn}.{pname}" if fqn else pname] = type(m).__name__
    convertible = {fqn for fqn, m in model.named_modules() if isinstance(m, CONVERTIBLE)}
    of_convertible = {f"{fqn}.{pname}" for fqn in convertible for pname in model.get_submodule(fqn)._parameters}
    report = ss.slotify_(model, k=4, seed=1, report=True)
    assert isinstance(report, ss.ConversionReport)
    listed = {w.name for w in report.learned}
    replaced = collections.defaultdict(set)  # module -> the names of its parameters that slot layers replaced
    connections = collections.Counter()  # module -> the connections of those slot layers
    for c in report.converted:
        assert c.replaces and set(c.replaces) <= set(expected) and listed.isdisjoint(c.replaces)
        (owner,) = {r.rpartition(".")[0] for r in c.replaces}
        # Only the three separate q/k/v projections of an attention share a parameter: its in_proj_bias.
        assert replaced[owner].isdisjoint(c.replaces) or replaced[owner] & set(c.replaces) == {
            f"{owner}.in_proj_bias"}
        replaced[owner] |= set(c.replaces)
        connections[owner] += c.connections
        assert isinstance(model.get_submodule(c.name), SlotLayer)
        layer = model.get_submodule(c.name)
        assert c.connections == sum(t.numel() for t in (layer.selected_weight(), layer.selected_bias()) if t is not None)
        assert 0 < c.bytes == sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    for owner, names in replaced.items():
        assert connections[owner] == sum(make(name).get_parameter(r).numel() for r in names)
        listed |= names
    assert listed == set(expected)
    assert len(report.learned) == len({w.name for w in report.learned})  # no name twice
    assert not [w.name for w in report.learned if w.reason == "unsupported" and w.name in of_convertible]
    unconverted = convertible - {r.rpartition(".")[0] for c in report.converted for r in c.replaces}
    assert all(any(w.name.startswith(f"{u}.") and w.reason == "tied" for w in report.learned) for u in unconverted)
    total = sum(p.numel() for p in make(name).parameters())
    assert report.seeded + report.learned_numel == total
    assert 0 < report.seeded_share == report.seeded / total
    assert "seeded" in str(report) and str(report).count("\n") == len(report.converted) + len(report.learned)


def test_report_reasons_and_verbose(capsys):
    model = Encoder()
    ss.slotify_(model, k=4, verbose=True, filter_fn=lambda m, fqn: fqn != "head")
    text = capsys.readouterr().out
    assert "encoder.layers.0.self_attn.out_proj: NonDynamicallyQuantizableLinear -> SlotLinear" in text
    assert "encoder.layers.0.self_attn.in_proj: MultiheadAttention -> SlotLinear, 816 connections" in text
    assert "pos: Encoder, 96 weights, 384 bytes: unsupported (no slot layer for Encoder)" in text
    assert "head.weight: Linear" in text and "filtered" in text
    assert "embed: Embedding -> SlotEmbedding" in text and "pos: Encoder" in text
    assert "norm1.weight: LayerNorm, 16 weights, 64 bytes: vector" in text
    assert isinstance(ss.slotify_(ResNet(), k=2), ResNet)  # without report=True: the model, as before


@pytest.mark.parametrize("name, culprit", [("encoder", "pos (Encoder)"), ("gpt", "wte.weight (Embedding)")])
def test_strict_raises_one_line_and_leaves_the_model_untouched(name, culprit):
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        ss.slotify_(model, k=4, strict=True)
    assert "\n" not in str(e.value) and culprit in str(e.value) and "strict" in str(e.value)
    assert not any(isinstance(m, SlotLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_strict_accepts_a_model_whose_learned_weights_are_vectors_or_filtered():
    report = ss.slotify_(ResNet(), k=4, strict=True, report=True)
    assert {w.reason for w in report.learned} == {"vector"}  # batch-norm scales and shifts
    ss.slotify_(Conv1dNet(), k=4, strict=True, filter_fn=lambda m, fqn: fqn != "fc")


def test_linear_subclass_that_overrides_forward_is_left_and_reported():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 2))
    report = ss.slotify_(model, k=4, report=True)
    assert type(model[0]) is Scaled and isinstance(model[1], ss.SlotLinear)
    assert report.learned[0].reason == "unsupported" and "overrides" in report.learned[0].detail
    with pytest.raises(ValueError, match=r"0\.weight \(Scaled\)"):
        ss.slotify_(nn.Sequential(Scaled(4, 4)), strict=True)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_every_padding_mode_and_dimension_computes_as_torch(mode, dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    model = nn.Sequential(conv(4, 6, 3, stride=1, padding=2, dilation=2, groups=2, bias=True, padding_mode=mode),
                          conv(6, 6, 2, padding="same", padding_mode=mode))
    ss.slotify_(model, k=4, seed=dims).eval()
    assert all(m.padding_mode == mode for m in model)
    assert (f"padding_mode={mode!r}" in repr(model[0])) == (mode != "zeros")
    x = torch.randn(2, 4, *([7] * dims))
    plain = ss.to_dense(model)  # nn.ConvNd with the selected weights and this padding_mode
    assert type(plain[0]) is conv and plain[0].padding_mode == mode
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


# ---------------------------------------------------------------- weight and bias properties


def test_weight_and_bias_properties_are_the_selection_read_only():
    layer = ss.slotify_(nn.Sequential(nn.Linear(5, 3)), k=4)[0]
    assert torch.equal(layer.weight.detach(), layer.selected_weight()) and layer.weight.shape == (3, 5)
    assert torch.equal(layer.bias.detach(), layer.selected_bias())
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(3, 5)
    assert ss.slotify_(nn.Sequential(nn.Conv2d(2, 2, 1, bias=False)), k=2)[0].bias is None
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    dense = ss.slotify_(nn.Sequential(nn.Linear(5, 3)), k=4, dense=True)[0]
    assert torch.equal(dense.weight.detach(), dense.selected_weight())
    # Outside code that computes with layer.weight trains the scores (nn.MultiheadAttention's out_proj).
    F.linear(torch.randn(2, 5), layer.weight.float(), layer.bias.float()).sum().backward()
    assert layer.slot_weight.grad is not None and layer.slot_bias.grad is not None


def test_transformer_encoder_fast_path_runs_in_eval(monkeypatch):
    model = Encoder()
    ss.slotify_(model, k=4)
    assert isinstance(model.encoder.layers[0].self_attn, ss.SlotMultiheadAttention)
    model.eval()
    x = inputs("encoder")
    calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(a) or fused(*a))
    with torch.no_grad():  # eval + no_grad: nn.TransformerEncoderLayer's fast path reads the weights
        fast = model(x)
    assert len(calls) == 2  # both layers, with the selected input projections
    assert torch.equal(calls[0][3], model.encoder.layers[0].self_attn.in_proj.selected_weight())
    with torch.enable_grad():  # the ordinary path: same outputs up to the fused kernel's rounding
        slow = model(x)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_models_train(name):
    model = make(name)
    ss.slotify_(model, k=8, seed=2)
    slot, ordinary = ss.slot_parameters(model), ss.ordinary_parameters(model)
    assert slot and {id(p) for p in slot}.isdisjoint(id(p) for p in ordinary)
    assert len(slot) + len(ordinary) == len(list(model.parameters()))
    lr = 0.01 if name in ("encoder", "gpt") else 0.1
    opts = [ss.SlotSGD(slot, lr=lr, momentum=0.9)]
    if ordinary:
        opts.append(torch.optim.Adam(ordinary, lr=1e-2))
    x = inputs(name, n=8)
    model.train()
    losses = []
    for _ in range(12):
        for o in opts:
            o.zero_grad()
        loss = loss_of(name, model, x)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < losses[0] - 0.05, losses


def test_ties_stay_tied_through_training_state_dict_and_copies():
    model = GPT()
    report = ss.slotify_(model, k=4, report=True)
    tied = {w.name for w in report.learned if w.reason == "tied"}
    assert tied == {"wte.weight", "lm_head.weight"} and type(model.lm_head) is nn.Linear
    assert type(model.wte) is nn.Embedding and isinstance(model.wpe, ss.SlotEmbedding)
    assert model.wte.weight is model.lm_head.weight
    opts = [ss.SlotSGD(ss.slot_parameters(model), lr=0.01), torch.optim.SGD(ss.ordinary_parameters(model), lr=0.1)]
    loss_of("gpt", model, inputs("gpt")).backward()
    for o in opts:
        o.step()
    assert model.wte.weight is model.lm_head.weight
    again = GPT()
    ss.slotify_(again, k=4)
    again.load_state_dict(model.state_dict())
    assert again.wte.weight is again.lm_head.weight and torch.equal(again.wte.weight, model.wte.weight)
    copied = copy.deepcopy(model)
    assert copied.wte.weight is copied.lm_head.weight


# ---------------------------------------------------------------- state, compile, export


@pytest.mark.parametrize("name", ["resnet", "encoder", "decoder", "attention"])
def test_state_dict_holds_tensors_only_and_reloads(name, tmp_path):
    model = make(name)
    ss.slotify_(model, k=4, seed=3, scores="implicit")
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.endswith("._extra_state") for k in state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = make(name, seed=9)
    ss.slotify_(other, k=4, seed=4, scores="implicit")  # other seeds: the state brings the model's
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = inputs(name)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), model.eval()(x))


def test_compiled_converted_model_trains_as_eager():
    class Tiny(nn.Module):  # a Linear subclass, and a layer read through .weight / .bias
        def __init__(self):
            super().__init__()
            self.a = nn.modules.linear.NonDynamicallyQuantizableLinear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return F.linear(torch.relu(self.a(x)), self.b.weight, self.b.bias)

    torch.manual_seed(0)
    eager = Tiny()
    ss.slotify_(eager, k=4, seed=5)
    assert_compiled_trains_as_eager(eager, (torch.randn(4, 6),), torch.tensor([0, 1, 2, 0]), F.cross_entropy)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_and_reload_give_the_eval_outputs_exactly(name, tmp_path):
    model = make(name)
    ss.slotify_(model, k=8, seed=6)
    model.eval()
    path = os.path.join(tmp_path, f"{name}.slot")
    size = ss.export(model, path)
    assert size == os.path.getsize(path)
    plain = ss.load_exported(path, model=make(name, seed=7))
    assert not any(isinstance(m, SlotLayer) for m in plain.modules())
    x = inputs(name)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    also = ss.load_exported(path, model=model)  # a slotified skeleton works too
    with torch.no_grad():
        assert torch.equal(also(x), model(x))


@pytest.mark.parametrize("name, at_most", [("resnet", 0.2), ("encoder", 0.3)])
def test_export_is_compact_for_own_models(name, at_most):
    """ceil(log2 K) = 3 bits per seeded connection, the learned tensors as they are, and a header of
    a few hundred bytes per layer; the encoder keeps its positions and norms learned (its attention's
    input projections, two thirds of its attention weights, are seeded: learned, they would take 0.6)."""
    model = ResNet(width=16) if name == "resnet" else Encoder(d=32)
    report = ss.slotify_(model, k=8, report=True)
    sizes = ss.export.size_report(model)
    slot_names = {c.name for c in report.converted}
    learned = sum(t.numel() * t.element_size() for key, t in model.state_dict().items()
                  if key.rpartition(".")[0] not in slot_names)
    ideal = learned + sum((3 * c.connections + 7) // 8 for c in report.converted)
    assert ideal < sizes["export_bytes"] < ideal + 400 * len(report.converted) + 2000, (ideal, sizes)
    assert sizes["export_bytes"] < at_most * sizes["fp32_bytes"], sizes


def test_load_exported_refuses_a_skeleton_that_does_not_match(tmp_path):
    path = os.path.join(tmp_path, "gpt.slot")
    untied = GPT(tie=False)
    ss.slotify_(untied, k=4)
    ss.export(untied, path)
    with pytest.raises(CheckpointError) as e:
        ss.load_exported(path, model=GPT(tie=True))  # tied: one of the two weights would be lost
    assert "\n" not in str(e.value) and "tied" in str(e.value) and "lm_head.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        ss.load_exported(path, model=GPT(d=8, tie=False))
    ss.slotify_(mob := MobileNet(), k=4)
    ss.export(mob, path)
    zero_padded = MobileNet()
    zero_padded.stem.padding_mode = "zeros"
    with pytest.raises(CheckpointError, match="padding_mode"):  # the exported stem pads by reflection
        ss.load_exported(path, model=zero_padded)


def test_tied_tensors_are_stored_once(tmp_path):
    a, b = GPT(tie=True), GPT(tie=False)
    ss.slotify_(a, k=4)
    ss.slotify_(b, k=4, filter_fn=lambda m, fqn: fqn not in ("wte", "lm_head"))  # the same layers seeded, untied
    sa, sb = ss.export(a, os.path.join(tmp_path, "a")), ss.export(b, os.path.join(tmp_path, "b"))
    assert sb - sa >= 13 * 16 * 4 - 16  # b stores the 13x16 fp32 lm_head weight apart from wte's
    plain = ss.load_exported(os.path.join(tmp_path, "a"), model=GPT())
    assert plain.wte.weight is plain.lm_head.weight and torch.equal(plain.wte.weight, a.wte.weight)


# ---------------------------------------------------------------- the example of docs/OWN-MODELS.md


def test_own_model_example_runs_on_tiny_shapes(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "own_model.py")
    spec = importlib.util.spec_from_file_location("own_model_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--width", "2", "--k", "4", "--steps", "8", "--n", "8", "--batch-size", "8",
                        "--image-size", "8", "--out", str(tmp_path)])
    assert out["same_checkpoint"] and out["same_export"]
    assert out["export_bytes"] < os.path.getsize(out["checkpoint"]) / 4
    assert min(out["losses"][-2:]) < out["losses"][0]  # one fixed batch of 8: the loss falls
    assert {w.reason for w in out["report"].learned} == {"vector"} and len(out["report"].converted) == 21
    assert "seeded" in capsys.readouterr().out


def test_embeddings_convert_unless_they_pad_or_renormalise(tmp_path):
    model = nn.Sequential(nn.Embedding(11, 6, scale_grad_by_freq=True), nn.Linear(6, 2))
    ss.slotify_(model, k=4, seed=2)
    emb = model[0]
    assert isinstance(emb, ss.SlotEmbedding) and emb.scale_grad_by_freq and emb.weight.shape == (11, 6)
    idx = torch.tensor([[1, 2, 2], [10, 0, 1]])
    assert torch.equal(emb(idx), F.embedding(idx, emb.selected_weight()))
    model(idx).sum().backward()
    assert emb.slot_weight.grad is not None  # trains like any slot layer
    path = os.path.join(tmp_path, "e.slot")
    ss.export(model.eval(), path)
    plain = ss.load_exported(path, model=nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 2)))
    assert type(plain[0]) is nn.Embedding and torch.equal(plain(idx), model(idx))
    dense = ss.slotify_(nn.Sequential(nn.Embedding(5, 3)), k=4, dense=True)[0]
    assert isinstance(dense, ss.DenseSlotEmbedding) and torch.equal(ss.to_dense(nn.Sequential(dense))[0].weight,
                                                                      dense.selected_weight())
    padded = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Embedding(5, 3, max_norm=1.0))
    report = ss.slotify_(padded, k=4, report=True)
    assert not report.converted and {w.reason for w in report.learned} == {"unsupported"}
    assert "padding_idx" in report.learned[0].detail
