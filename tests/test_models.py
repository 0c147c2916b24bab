import pytest
import torch

from dfq.fp32.models import ARCHS, build_model, count_bn, load_checkpoint, load_state_dict, save_checkpoint


def test_fmnist_resnet_has_at_least_8_bn_layers_and_residual_blocks():
    m = build_model("fmnist_resnet").eval()
    assert count_bn(m) == 9
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    blocks = list(m.layers)
    assert len(blocks) == 3
    # identity shortcut in block 0 (16 -> 16), 1x1-conv + BN shortcuts with stride 2 where the shape changes
    assert len(blocks[0].shortcut) == 0
    for b in blocks[1:]:
        conv, bn = b.shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, torch.nn.BatchNorm2d)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        h = m.stem(x)
        for b in blocks:
            residual = b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(h)))))
            out = b(h)
            # the block adds its shortcut to the residual branch before the last ReLU
            assert torch.allclose(out, torch.relu(residual + b.shortcut(h)), atol=1e-6)
            assert not torch.allclose(out, torch.relu(residual), atol=1e-3), "the shortcut contributes"
            h = out
        assert torch.allclose(m(x), m.fc(h.mean((2, 3))), atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_dict_round_trip_with_module_prefix(arch):
    a, b = build_model(arch), build_model(arch)
    state = {"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}}
    load_state_dict(b, state, "test")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_wrong_weights_named_in_error():
    with pytest.raises(ValueError, match="w.pt: weights do not match"):
        load_state_dict(build_model("fmnist_resnet"), {"fc.weight": torch.zeros(1)}, "w.pt")


def test_unknown_arch():
    with pytest.raises(ValueError, match="model.arch='nope'"):
        build_model("nope")


def test_checkpoint_round_trip(tmp_path):
    m = build_model("fmnist_resnet").eval()
    spec = {"shape": [1, 28, 28], "mean": [0.286], "std": [0.353]}
    save_checkpoint(m, "fmnist_resnet", 10, spec, tmp_path / "m.pt")
    again, meta = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), m(x)) and meta["input_spec"] == spec


def test_other_class_count_is_named_with_both_counts():
    with pytest.raises(
        ValueError,
        match=r"w.pt: weights do not match: the model has 3 classes and the weights 10 "
        r"\(linear.weight has 10 outputs\)",
    ):
        load_state_dict(build_model("cifar_resnet20", 3), build_model("cifar_resnet20", 10).state_dict(), "w.pt")
    with pytest.raises(ValueError, match="the dataset has 10 classes and the weights 1000 \\(fc.weight"):
        load_state_dict(
            build_model("inception_v3", 10), build_model("inception_v3", 1000).state_dict(), "w.pt", "the dataset"
        )  # two heads (fc, AuxLogits.fc) of the same class count: named by the last


def test_user_arch_whose_call_fails():
    with pytest.raises(ValueError, match=r"model.arch='os:system': calling it failed: TypeError"):
        build_model("os:system")
