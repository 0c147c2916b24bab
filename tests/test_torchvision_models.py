"""Every registered torchvision arch, with random weights at small input sizes: built as torchvision's
pretrained builder builds it, preprocessed as its DEFAULT weights expect, BN statistics only of layers
that run, one generation step; inception_v3 also prepared, calibrated and run quantized."""

import math

import pytest
import torch
import torchvision
from torch import nn

from dfq.fp32.datasets import InputSpec, folder_transform
from dfq.fp32.models import TORCHVISION_ARCHS, build_model, count_bn, input_spec, load_torchvision_weights
from dfq.generation.bn_stats import BNInputStats
from dfq.tracing import bn_layers

SIZE = {"inception_v3": 80}  # the smallest input Inception3's stem and pooling accept is 75 px; others 64


def _input(arch: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    s = SIZE.get(arch, 64)
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_build_matches_torchvisions_pretrained_builder(arch, monkeypatch):
    """Same (random) weights through torchvision's own weights=DEFAULT builder and through ours: equal
    outputs. A constructor flag the builder sets for its weights (inception_v3's transform_input) and
    ours missed would change the output."""
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(0)
    state = build_model(arch, 1000).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: state)  # no download
    theirs = torchvision.models.get_model(arch, weights="DEFAULT").eval()
    ours = load_torchvision_weights(build_model(arch, 1000), arch).eval()
    if arch == "inception_v3":
        assert ours.transform_input is True and theirs.transform_input is True
    x = _input(arch)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_input_spec_is_the_default_weights_preprocessing(arch):
    t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    spec = input_spec(arch)
    assert spec["shape"] == [3, t.crop_size[0], t.crop_size[0]] and spec["resize"] == t.resize_size[0]
    assert spec["mean"] == list(t.mean) and spec["std"] == list(t.std)
    expected = {"resnet50": 232, "mobilenet_v2": 232, "inception_v3": 342}.get(arch, 256)  # V2 recipes: 232
    resize = folder_transform(InputSpec.from_dict(spec)).transforms[0]
    assert isinstance(resize, torchvision.transforms.Resize) and resize.size == expected
    assert InputSpec.from_dict(spec).to_dict() == spec  # travels through meta.json / the checkpoint


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_bn_layers_are_exactly_those_an_eval_forward_runs(arch):
    model = build_model(arch, 10).eval()
    ran = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, a: ran.append(mod))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(_input(arch))
    for h in hooks:
        h.remove()
    assert [id(m) for m in bn_layers(model)] == [id(m) for m in model.modules() if any(m is r for r in ran)]
    assert count_bn(model) == len(BNInputStats(model)) == len({id(m) for m in ran})
    if arch == "inception_v3":  # AuxLogits' two BN layers are registered but never run in eval mode
        assert count_bn(model) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - 2
        assert not any(m is b for b in bn_layers(model) for m in model.AuxLogits.modules())
    model.train()  # bn_layers traces in eval mode and leaves the model's own mode alone
    assert len(bn_layers(model)) == count_bn(model) and all(m.training for m in model.modules())


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_one_dsg_generation_step(arch):
    """SDA margins, LSE over the executed BN layers and one Adam step of the pixels: finite and moved."""
    from dfq.generation.generators import DSGConfig, dsg_batch

    model = build_model(arch, 10).eval()
    x0 = _input(arch, batch=4)
    x, info, margins = dsg_batch(model, tuple(x0.shape), 0, DSGConfig(iterations=1))
    assert x.shape == x0.shape and torch.isfinite(x).all()
    assert math.isfinite(info["loss_start"]) and math.isfinite(info["loss_end"])
    assert len(margins["mean"]) == count_bn(model)


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_inception_v3_prepare_calibrate_forward(protocol):
    from dfq.quant.observers import MinMaxObserver
    from dfq.quant.prepare import QuantSpec, calibrate, find_blocks, prepare, summary

    torch.manual_seed(0)
    model = build_model("inception_v3", 10).eval()
    for m in model.modules():  # non-trivial BN statistics, so folding and quantization do something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    assert "AuxLogits" not in find_blocks(model) and "Mixed_7c" in find_blocks(model)
    gm = prepare(model, 8, 8, MinMaxObserver, QuantSpec(protocol=protocol))
    assert not any(name.startswith("AuxLogits") for name, _ in gm.named_modules())
    # 94 convs + fc run in eval mode (AuxLogits' 2 convs and fc do not)
    assert summary(gm)["weight_layers"] == 95
    x = _input("inception_v3", batch=4)
    calibrate(gm, [x[:2], x[2:]])
    with torch.no_grad():
        out, ref = gm(x), model(x)
    assert out.shape == (4, 10)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1  # W8A8 stays close to FP32


def test_executed_modules_is_traced_once_per_model(monkeypatch):
    from torch import fx

    from dfq.tracing import executed_modules

    model = build_model("inception_v3", 10)
    calls = []
    real = fx.Tracer.trace
    monkeypatch.setattr(fx.Tracer, "trace", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = executed_modules(model)
    assert executed_modules(model) == first and "AuxLogits.conv0.conv" not in first and len(calls) == 1
    assert executed_modules(model, ["Mixed_7c"]) != first and len(calls) == 2  # other leaves: traced again
    model.AuxLogits = None  # the module tree changed: traced again
    assert executed_modules(model) == first and len(calls) == 3
