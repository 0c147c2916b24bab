import pytest
import torch
from torch import nn

from dfq.models import build_model
from dfq.observers import MinMaxObserver
from dfq.quantize import NothingQuantizedError, act_quantizers, calibrate, load_calibrated, prepare, summary


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
    assert summary(gm) == {"weight_layers": 3, "act_quantizers": 2}


def test_finds_method_and_torch_relu():
    assert summary(prepare(MethodRelu(), 8, 8, MinMaxObserver))["act_quantizers"] == 2


def test_fmnist_resnet_all_relus_found():
    gm = prepare(build_model("fmnist_resnet"), 4, 4, MinMaxObserver)
    # stem ReLU + two F.relu per block x 3 blocks; 7 convs + 2 shortcut convs + fc
    assert summary(gm) == {"weight_layers": 10, "act_quantizers": 7}


def test_nothing_to_quantize_fails_loudly():
    with pytest.raises(NothingQuantizedError, match="0 ReLU"):
        prepare(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sigmoid()), 8, 8, MinMaxObserver)


def test_uncalibrated_quantizer_fails_loudly(tiny_bn):
    gm = prepare(tiny_bn, 8, 8, MinMaxObserver)
    with pytest.raises(RuntimeError, match="saw no data"):
        act_quantizers(gm)[0].freeze()


def test_w8a8_close_to_fp32_and_w2a2_not(tiny_bn):
    x = torch.randn(16, 1, 8, 8)
    ref = tiny_bn(x)
    errs = {}
    for bits in (8, 2):
        gm = prepare(tiny_bn, bits, bits, MinMaxObserver)
        calibrate(gm, [x[:8], x[8:]])
        errs[bits] = ((gm(x) - ref).norm() / ref.norm()).item()
    assert errs[8] < 0.02 < errs[2]


def test_checkpoint_round_trip(tiny_bn):
    x = torch.randn(8, 1, 8, 8)
    gm = prepare(tiny_bn, 4, 4, MinMaxObserver)
    calibrate(gm, [x])
    again = load_calibrated(prepare(tiny_bn, 4, 4, MinMaxObserver), gm.state_dict())
    assert torch.equal(again(x), gm(x))
    with pytest.raises(ValueError, match="uncalibrated"):
        load_calibrated(prepare(tiny_bn, 4, 4, MinMaxObserver), prepare(tiny_bn, 4, 4, MinMaxObserver).state_dict())
