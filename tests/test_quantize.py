import pytest
import torch
from torch import nn

from dfq.fp32.models import build_model
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import (
    NothingQuantizedError,
    QuantSpec,
    act_quantizers,
    calibrate,
    load_calibrated,
    prepare,
    summary,
)


class MethodRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        x = self.conv(x).relu()
        return torch.relu(self.conv2(x))


def test_finds_module_and_functional_relus(tiny_bn):
    gm = prepare(tiny_bn, 8, 8, MinMaxObserver)
    assert summary(gm) == {"weight_layers": 3, "act_quantizers": 2, "weight_bits": [8], "act_bits": [8]}


def test_finds_method_and_torch_relu():
    assert summary(prepare(MethodRelu(), 8, 8, MinMaxObserver))["act_quantizers"] == 2


def test_fmnist_resnet_all_relus_found():
    gm = prepare(build_model("fmnist_resnet"), 4, 4, MinMaxObserver)
    # stem ReLU + two F.relu per block x 3 blocks; 7 convs + 2 shortcut convs + fc
    assert summary(gm) == {"weight_layers": 10, "act_quantizers": 7, "weight_bits": [4], "act_bits": [4]}


def test_nothing_to_quantize_fails_loudly():
    with pytest.raises(NothingQuantizedError, match="1 Conv2d/Linear layers and no activations"):
        prepare(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sigmoid()), 8, 8, MinMaxObserver)


def test_uncalibrated_quantizer_fails_loudly(tiny_bn):
    gm = prepare(tiny_bn, 8, 8, MinMaxObserver)
    with pytest.raises(RuntimeError, match="saw no data"):
        act_quantizers(gm)[0].freeze()


def test_w8a8_close_to_fp32_and_w2a2_not(tiny_bn):
    torch.manual_seed(3)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = tiny_bn(x)
    errs = {}
    for wbits, abits in ((8, 8), (8, 2), (2, 8), (2, 2)):
        gm = prepare(tiny_bn, wbits, abits, MinMaxObserver)
        calibrate(gm, [x[:8], x[8:]])
        with torch.no_grad():
            errs[wbits, abits] = ((gm(x) - ref).norm() / ref.norm()).item()
    # Thresholds sit between the right and the wrong behaviour, measured on this model and input
    # (relative output error; seeds 0-5 of x give W8A8 0.0012-0.0013, W8A2 0.026-0.042, W2A8 0.107-0.127):
    # W8A8 0.0013; a 5-bit grid labelled 8-bit gives 0.0042 (activations only) or 0.0175 (weights).
    assert errs[8, 8] < 0.0025, errs
    # 2-bit activations alone: 0.041; a no-op activation quantizer at 2 bits leaves W8A8's 0.0013.
    assert errs[8, 2] > 0.008, errs
    # 2-bit weights alone: 0.109 (W2A2 0.102); a no-op weight quantizer at 2 bits leaves 0.0013.
    assert errs[2, 8] > 0.05 and errs[2, 2] > 0.05, errs


def test_checkpoint_round_trip(tiny_bn):
    x = torch.randn(8, 1, 8, 8)
    gm = prepare(tiny_bn, 4, 4, MinMaxObserver)
    calibrate(gm, [x])
    again = load_calibrated(prepare(tiny_bn, 4, 4, MinMaxObserver), gm.state_dict())
    assert torch.equal(again(x), gm(x))
    with pytest.raises(ValueError, match="uncalibrated"):
        load_calibrated(prepare(tiny_bn, 4, 4, MinMaxObserver), prepare(tiny_bn, 4, 4, MinMaxObserver).state_dict())


def _randomize_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "arch,shape",
    [
        ("fmnist_resnet", (4, 1, 28, 28)),
        ("cifar_resnet20", (4, 3, 32, 32)),
        ("resnet18", (2, 3, 64, 64)),
        ("mobilenet_v2", (2, 3, 64, 64)),
    ],
)
def test_brecq_protocol_bn_folding_keeps_fp32_outputs(arch, shape):
    from dfq.quant.prepare import set_quant_state

    model = _randomize_bn(build_model(arch, 10))
    gm = prepare(model, 4, 4, MinMaxObserver, QuantSpec(protocol="brecq"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules()), "every BN follows a conv: all folded"
    set_quant_state(gm, weights=False, acts=False)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_brecq_protocol_first_and_last_layer_at_8_bits():
    from dfq.quant.prepare import weight_quantized_layers

    gm = prepare(build_model("cifar_resnet20", 10), 4, 4, MinMaxObserver, QuantSpec(protocol="brecq"))
    assert gm.conv1.weight_bits == 8 and gm.linear.weight_bits == 8
    assert sorted(m.weight_bits for m in weight_quantized_layers(gm)).count(8) == 2
    # the quantizer of the image (first conv's input) and of the last layer's input are 8-bit, the rest 4
    code = gm.code
    first = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("act_fq"))
    assert gm.get_submodule(first.target).bits == 8 and first.args[0].op == "placeholder"
    last = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "linear").args[0]
    assert gm.get_submodule(last.target).bits == 8, code
    assert sorted(fq.bits for fq in act_quantizers(gm)).count(8) == 2
    # every conv/linear input is quantized: 19 convs in 9 blocks + stem, 1 linear, shortcuts are parameter-free
    assert len(act_quantizers(gm)) == 20


def test_zeroq_protocol_keeps_every_layer_at_target_bits():
    gm = prepare(build_model("cifar_resnet20", 10), 4, 4, MinMaxObserver)
    assert summary(gm)["weight_bits"] == [4] and summary(gm)["act_bits"] == [4]


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_load_quantized_round_trip(protocol):
    from dfq.quant.prepare import load_quantized

    model = _randomize_bn(build_model("fmnist_resnet", 10))
    x = torch.randn(8, 1, 28, 28)
    gm = prepare(model, 4, 4, MinMaxObserver, QuantSpec(protocol=protocol, weight_scheme="symmetric"))
    calibrate(gm, [x])
    ckpt = {"bits": "w4a4", "protocol": protocol, "weight_scheme": "symmetric", "state_dict": gm.state_dict()}
    with torch.no_grad():
        assert torch.equal(load_quantized(model, ckpt)(x), gm(x))


# brecq protocol: what each conv, linear and residual add reads. A tensor counts as quantized when it
# comes from an activation quantizer through ops that keep values on its grid (slicing, zero padding,
# max pooling, ReLU, reshapes); README "Quantization" lists the only FP32 inputs: conv/linear outputs
# (BN folded, an integer engine's accumulators) summed by a residual add.
GRID_KEEPING_FUNCTIONS = {"getitem", "pad", "relu", "flatten", "max_pool2d"}
GRID_KEEPING_METHODS = {"view", "reshape", "flatten", "contiguous", "relu"}


def _origin(node, modules):
    """('fq', quantizer) | ('acc', None) for a conv/linear output | ('other', node), walking back through
    grid-keeping ops."""
    from dfq.quant.fake_quant import ActFakeQuantize
    from dfq.quant.prepare import QUANT_TYPES

    while True:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, ActFakeQuantize):
            return "fq", mod
        if isinstance(mod, QUANT_TYPES):
            return "acc", None
        keeps = (
            isinstance(mod, (nn.MaxPool2d, nn.Identity, nn.ReLU, nn.ReLU6, nn.Flatten))
            or (node.op == "call_function" and getattr(node.target, "__name__", "") in GRID_KEEPING_FUNCTIONS)
            or (node.op == "call_method" and node.target in GRID_KEEPING_METHODS)
        )
        if not keeps:
            return "other", node
        node = node.args[0]


def _on_act_grid(t: torch.Tensor, fq) -> bool:
    q = t / fq.scale + fq.zero_point.float()
    return bool((q - q.round()).abs().max() < 1e-3 and q.min() > -1e-3 and q.max() < 2**fq.bits - 1 + 1e-3)


@pytest.mark.parametrize(
    "arch,shape",
    [
        ("fmnist_resnet", (4, 1, 28, 28)),
        ("cifar_resnet20", (4, 3, 32, 32)),
        ("resnet18", (2, 3, 64, 64)),
        ("mobilenet_v2", (2, 3, 64, 64)),
    ],
)
def test_brecq_protocol_every_conv_linear_and_add_reads_quantized_tensors(arch, shape):
    """Hooks the inputs of every conv, linear and add of a prepared, calibrated brecq-protocol model:
    each lies on the grid of the quantizer it comes from; the only FP32 inputs are conv/linear outputs
    entering a residual add (a block's output, and so its shortcut, is quantized once)."""
    import operator

    from torch import fx

    from dfq.quant.prepare import QUANT_TYPES

    torch.manual_seed(0)
    gm = prepare(_randomize_bn(build_model(arch, 10)), 4, 4, MinMaxObserver, QuantSpec(protocol="brecq"))
    x = torch.randn(*shape)
    calibrate(gm, [x])
    checks, hooks = [], []  # (kind, name, origin per input, input tensors)
    for g in [m for m in gm.modules() if isinstance(m, fx.GraphModule)]:
        modules = dict(g.named_modules())
        for node in list(g.graph.nodes):
            if node.op == "call_module" and isinstance(modules[node.target], QUANT_TYPES):
                origin = [_origin(node.args[0], modules)]
                hooks.append(
                    modules[node.target].register_forward_pre_hook(
                        lambda m, a, o=origin, n=node.name: checks.append(("layer", n, o, [a[0]]))
                    )
                )
            elif node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
                origin = [_origin(a, modules) for a in node.args[:2]]

                def add(a, b, o=origin, n=node.name):
                    checks.append(("add", n, o, [a, b]))
                    return a + b

                node.target = add
        g.recompile()
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    assert len([c for c in checks if c[0] == "layer"]) == len([m for m in gm.modules() if isinstance(m, QUANT_TYPES)])
    quantized_shortcuts = 0
    for kind, name, origins, tensors in checks:
        for (what, fq), t in zip(origins, tensors):
            if what == "acc":
                assert kind == "add", f"{name} reads an unquantized conv/linear output"
                continue
            assert what == "fq", f"{kind} {name} reads {fq} ({fq.op} {fq.target}), not a quantized tensor"
            assert _on_act_grid(t, fq), f"{kind} {name}: input off its quantizer's grid"
            quantized_shortcuts += kind == "add"
    # residual adds whose shortcut is the block input (identity or option-A padding), checked above;
    # the other blocks project the shortcut with a 1x1 conv (fmnist_resnet: 2 of 3, resnet18: 3 of 8)
    assert quantized_shortcuts == {"fmnist_resnet": 1, "cifar_resnet20": 9, "resnet18": 5, "mobilenet_v2": 10}[arch]


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_mse_weight_range_in_prepare_and_checkpoint(protocol):
    """prepare searches every layer's per-channel range (a different grid from min-max), and the
    checkpoint's weight_range rebuilds the same model."""
    from dfq.quant.fake_quant import weight_qparams
    from dfq.quant.prepare import load_quantized, weight_quantized_layers

    model = _randomize_bn(build_model("fmnist_resnet", 10))
    x = torch.randn(8, 1, 28, 28)
    gm = prepare(model, 3, 4, MinMaxObserver, QuantSpec(protocol=protocol, weight_range="mse"))
    plain = prepare(model, 3, 4, MinMaxObserver, QuantSpec(protocol=protocol))
    layers = weight_quantized_layers(gm)
    assert all(m.weight_range == "mse" for m in layers)
    for m in layers:
        assert torch.equal(m.weight_scale, weight_qparams(m.weight, m.weight_bits, "asymmetric", "mse")[0])
    assert any(not torch.equal(a.weight_scale, b.weight_scale) for a, b in zip(layers, weight_quantized_layers(plain)))
    calibrate(gm, [x])
    ckpt = {"bits": "w3a4", "protocol": protocol, "weight_range": "mse", "state_dict": gm.state_dict()}
    again = load_quantized(model, ckpt)
    assert all(m.weight_range == "mse" for m in weight_quantized_layers(again))
    with torch.no_grad():
        assert torch.equal(again(x), gm(x))


def test_old_checkpoints_load_with_the_defaults_of_their_time(tiny_bn, tmp_path):
    """A checkpoint older than the protocol / weight_scheme / weight_range / bias fields (plain tensors and dicts)
    loads as zeroq, asymmetric, minmax, float biases: the values of that time, written here by hand."""
    from dfq.io import load_torch, save_torch
    from dfq.quant.prepare import load_quantized, weight_quantized_layers

    assert QuantSpec.of_checkpoint({}) == QuantSpec("zeroq", "asymmetric", "minmax", "float")
    assert QuantSpec.of_checkpoint({"protocol": "brecq", "bias": "int32"}) == QuantSpec("brecq", bias="int32")
    gm = prepare(tiny_bn, 4, 4, MinMaxObserver)  # today's defaults are those of old checkpoints too
    calibrate(gm, [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))])
    old = {"source": "zeroq-s0", "bits": "w4a4", "state_dict": gm.state_dict()}  # no quantizer fields at all
    save_torch(old, tmp_path / "old.pt")
    loaded = load_quantized(tiny_bn, load_torch(tmp_path / "old.pt"))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert all(m.weight_scheme == "asymmetric" and m.weight_range == "minmax" for m in weight_quantized_layers(loaded))
    assert torch.equal(loaded(x), gm.eval()(x))
