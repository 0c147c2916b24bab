import pytest
import torch

from dfq.models import ARCHS, build_model, count_bn, load_checkpoint, load_state_dict, save_checkpoint


def test_fmnist_resnet_has_at_least_8_bn_layers_and_residual_blocks():
    m = build_model("fmnist_resnet")
    assert count_bn(m) == 9
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


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
