"""Models: the embedded Fashion-MNIST ResNet and the model registry.

``fmnist_resnet``: a small ResNet with BatchNorm after every convolution, three stages of basic
blocks (16/32/64 channels, stride 2 at stages 2 and 3) and 1x1-conv + BN shortcuts where the shape
changes. With one block per stage it has 9 BatchNorm2d layers. Blocks use functional ``F.relu`` (as
the common CIFAR ResNets do) and the stem uses an ``nn.ReLU`` module, so the quantizer must find both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FMNISTResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (after global average pooling)."""
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


ARCHS = {
    "fmnist_resnet": lambda num_classes=10: FMNISTResNet(1, num_classes),
}


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is unknown; allowed: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](num_classes=num_classes)


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def load_state_dict(model: nn.Module, state: dict, source: str) -> nn.Module:
    """Strictly load ``state`` (a plain state dict, or a dict holding ``state_dict``; ``module.`` stripped)."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: not a state dict (expected a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not match the architecture: {exc}") from exc
    return model


def save_checkpoint(model: nn.Module, arch: str, num_classes: int, input_spec: dict, path) -> None:
    """An FP32 checkpoint that rebuilds itself: arch, class count, input spec and the state dict."""
    from dfq.io import save_torch

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch({"arch": arch, "num_classes": num_classes, "input_spec": input_spec, "state_dict": state}, path)


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by ``save_checkpoint`` (loaded with weights_only=True); returns (model, meta)."""
    from dfq.io import load_torch

    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or not {"arch", "num_classes", "state_dict"} <= ckpt.keys():
        raise ValueError(f"{path}: not a dfq checkpoint (needs arch, num_classes, state_dict)")
    model = load_state_dict(build_model(ckpt["arch"], ckpt["num_classes"]), ckpt["state_dict"], str(path))
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}
