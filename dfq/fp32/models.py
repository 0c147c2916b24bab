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

from dfq.io import load_torch, save_torch
from dfq.tracing import bn_layers


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


class PadShortcut(nn.Module):
    """The parameter-free "option A" shortcut: every second pixel, new channels zero-padded half
    before and half after."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout - cin) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The standard CIFAR ResNet-(6n+2) (He et al. 2016) with option-A shortcuts; state-dict keys follow
    the widely used akamaster layout (conv1, bn1, layer1..3, linear)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, stages = 16, []
        for i, w in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(CifarBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_ARCHS = ("resnet18", "resnet50", "mobilenet_v2", "inception_v3", "shufflenet_v2_x1_0")


def _torchvision(name: str):
    """The torchvision model as its pretrained builder configures it (weights are loaded afterwards):
    the builder of a weights enum overrides some constructor defaults, e.g. inception_v3's
    transform_input=True (its pretrained weights expect inputs mapped to [-1, 1]; tested against
    torchvision's builder for every arch here). Its AuxLogits head is kept (the pretrained state dict
    holds it) but does not run in eval mode."""

    def build(num_classes=1000):
        import torchvision

        kw = {"aux_logits": True, "init_weights": False, "transform_input": True} if name == "inception_v3" else {}
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kw)

    return build


ARCHS = {
    "fmnist_resnet": lambda num_classes=10: FMNISTResNet(1, num_classes),
    # the outer lambda binds each depth d (ruff's B023 cannot see that)
    **{f"cifar_resnet{d}": (lambda d: lambda num_classes=10: CifarResNet(d, num_classes))(d) for d in (20, 32, 44, 56)},  # noqa: B023
    **{name: _torchvision(name) for name in TORCHVISION_ARCHS},
}

# What each family expects as input: (C, H, W), mean, std of the normalisation from [0, 1].
INPUT_SPECS = {
    "fmnist_resnet": {"shape": [1, 28, 28], "mean": [0.2860], "std": [0.3530]},
    "cifar": {"shape": [3, 32, 32], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    "imagenet": {"shape": [3, 224, 224], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
}  # torchvision archs: torchvision_spec (their DEFAULT weights' preprocessing)


def torchvision_spec(arch: str) -> dict:
    """Input spec of a torchvision arch from its DEFAULT weights' own preprocessing: crop size, mean, std
    and the shorter-side resize (``resize``: 232 for resnet50 and mobilenet_v2, whose DEFAULT weights are
    the V2 recipe; 256 for resnet18 and shufflenet; 342 for inception_v3's 299 crop)."""
    import torchvision

    t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return {
        "shape": [3, t.crop_size[0], t.crop_size[0]],
        "mean": list(t.mean),
        "std": list(t.std),
        "resize": int(t.resize_size[0]),
    }


def input_spec(arch: str) -> dict | None:
    """The input spec of a known arch (None for user models: the dataset's spec is used)."""
    if arch.startswith("cifar_resnet"):
        return INPUT_SPECS["cifar"]
    if arch in TORCHVISION_ARCHS:
        return torchvision_spec(arch)
    if arch in INPUT_SPECS:
        return INPUT_SPECS[arch]
    return None


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A registered arch, or any user model given as ``package.module:callable`` (called with no args)."""
    if ":" in arch:
        import importlib

        mod_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model.arch={arch!r}: cannot import {attr!r} from {mod_name!r}: {exc}") from exc
        try:
            model = factory()
        except Exception as exc:  # whatever the user's callable raises: one message naming the param
            raise ValueError(f"model.arch={arch!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ValueError(f"model.arch={arch!r} returned {type(model).__name__}, not an nn.Module")
        return model
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is unknown; allowed: {', '.join(sorted(ARCHS))} or module:callable")
    return ARCHS[arch](num_classes=num_classes)


def output_classes(model: nn.Module, spec: dict) -> int:
    """Number of classes the model predicts (one forward pass of a zero image)."""
    with torch.no_grad():
        return int(model.eval()(torch.zeros(1, *spec["shape"])).shape[1])


def count_bn(model: nn.Module) -> int:
    """Number of BatchNorm2d layers an eval forward runs (those BN-statistic generation matches)."""
    return len(bn_layers(model))


def class_count_mismatch(model: nn.Module, state: dict) -> tuple[int, int, str] | None:
    """(the model's classes, the weights' classes, a classifier key) when ``state`` differs from the
    model's own state dict only in the class count: the same keys, and every tensor of another shape
    differs in its first dimension alone, one size in the model and one other size in the weights."""
    own = model.state_dict()
    if own.keys() != state.keys():
        return None
    diff = [(k, own[k].shape, state[k].shape) for k in own if own[k].shape != state[k].shape]
    if not diff or any(len(a) != len(b) or len(a) == 0 or a[1:] != b[1:] for _, a, b in diff):
        return None
    sizes = {(a[0], b[0]) for _, a, b in diff}
    if len(sizes) != 1:
        return None
    ((mine, theirs),) = sizes
    key = next((k for k, a, _ in reversed(diff) if len(a) >= 2), diff[-1][0])  # the last such weight: the head
    return mine, theirs, key


def load_state_dict(model: nn.Module, state: dict, source: str, classes_from: str = "the model") -> nn.Module:
    """Strictly load ``state`` (a plain state dict, or a dict holding ``state_dict``; ``module.`` stripped).
    Weights for another class count get their own message, saying where the model's class count came
    from (``classes_from``, e.g. "the dataset")."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: not a state dict (expected a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        classes = class_count_mismatch(model, state)
        if classes:
            mine, theirs, key = classes
            raise ValueError(
                f"{source}: weights do not match: {classes_from} has {mine} classes and the weights "
                f"{theirs} ({key} has {theirs} outputs): use weights trained for these classes, or "
                f"data with {theirs} classes"
            ) from exc
        raise ValueError(f"{source}: weights do not match the architecture: {exc}") from exc
    return model


def save_checkpoint(model: nn.Module, arch: str, num_classes: int, input_spec: dict, path) -> None:
    """An FP32 checkpoint that rebuilds itself: arch, class count, input spec and the state dict.

    Args:
        model: the FP32 model; its state dict is saved detached, on the CPU and contiguous.
        arch: architecture name that ``build_model`` rebuilds the model from on load.
        num_classes: number of output classes (``build_model``'s class count).
        input_spec: the model's input spec as a dict (``InputSpec.to_dict()``: shape, mean, std, resize when set).
        path: file to write (str or path-like); written atomically and byte-for-byte reproducibly (``save_torch``).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch({"arch": arch, "num_classes": num_classes, "input_spec": input_spec, "state_dict": state}, path)


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by ``save_checkpoint`` (loaded with weights_only=True); returns (model, meta)."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or not {"arch", "num_classes", "state_dict"} <= ckpt.keys():
        raise ValueError(f"{path}: not a dfq checkpoint (needs arch, num_classes, state_dict)")
    model = load_state_dict(build_model(ckpt["arch"], ckpt["num_classes"]), ckpt["state_dict"], str(path))
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}


def check_classes(model: nn.Module, spec: dict, num_classes: int, classes_from: str = "the dataset") -> None:
    """A clear error when the model's output size differs from the dataset's class count (``classes_from``
    names where that count came from, e.g. an ImageFolder's param and folder)."""
    out = output_classes(model, spec)
    if out != num_classes:
        raise ValueError(
            f"class-count mismatch: the model predicts {out} classes but {classes_from} has {num_classes} "
            "(check model.arch/model.weights against data.*)"
        )


def load_torchvision_weights(model: nn.Module, arch: str, classes_from: str = "the model") -> nn.Module:
    """torchvision's default pretrained weights (from the torch hub cache; downloaded when online)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # offline with an empty hub cache, or an unknown arch
        raise ValueError(
            f"model.weights=torchvision: cannot get pretrained {arch} weights ({exc}); put them in the "
            "torch hub cache or give model.weights a local file"
        ) from exc
    return load_state_dict(model, state, f"model.weights=torchvision ({arch})", classes_from)
