"""Turning an FP32 model into a fake-quant model under the ZeroQ/DSG protocol (torch.ao style steps).

``prepare`` traces the model with torch.fx (the model is wrapped, not rewritten), swaps every Conv2d
and Linear for its weight-fake-quant twin (per-channel asymmetric, target bits, first and last layer
included, no BN folding) and inserts an activation fake-quant after every ReLU/ReLU6, whether it is
an ``nn.ReLU`` module, ``F.relu``/``torch.relu`` or a ``.relu()`` method call. ``calibrate`` runs
calibration batches through the observers and ``freeze`` fixes the activation ranges.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from dfq.quantizers import ActFakeQuantize, QuantConv2d, QuantLinear

RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = {F.relu, F.relu6, F.relu_, torch.relu, torch.relu_}
RELU_METHODS = {"relu", "relu_"}


class NothingQuantizedError(RuntimeError):
    pass


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in RELU_METHODS
    return False


def _swap_module(gm: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, new)


def prepare(model: nn.Module, wbits: int, abits: int, make_observer: Callable[[], nn.Module]) -> fx.GraphModule:
    """A traced copy of ``model`` with fake-quant weights and observing activation quantizers."""
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    n_weights = 0
    for name, mod in list(gm.named_modules()):
        if type(mod) is nn.Conv2d:
            _swap_module(gm, name, QuantConv2d(mod, wbits))
            n_weights += 1
        elif type(mod) is nn.Linear:
            _swap_module(gm, name, QuantLinear(mod, wbits))
            n_weights += 1
    modules = dict(gm.named_modules())
    n_acts = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules):
            continue
        fq_name = f"act_fq_{n_acts}"
        gm.add_submodule(fq_name, ActFakeQuantize(abits, make_observer()))
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_module(fq_name, (node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
        n_acts += 1
    if n_weights == 0 or n_acts == 0:
        raise NothingQuantizedError(
            f"nothing to quantize: found {n_weights} Conv2d/Linear layers and {n_acts} ReLU activations "
            "(the ZeroQ/DSG protocol quantizes conv/linear weights and activations after ReLU/ReLU6)"
        )
    gm.graph.lint()
    gm.recompile()
    return gm


def act_quantizers(gm: nn.Module) -> list[ActFakeQuantize]:
    return [m for m in gm.modules() if isinstance(m, ActFakeQuantize)]


def weight_quantized_layers(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


@torch.no_grad()
def calibrate(gm: nn.Module, batches: Iterable[torch.Tensor], device="cpu", desc: str = "calibrate") -> int:
    """Feed calibration batches through the observers, then freeze every activation range."""
    gm.eval().to(device)
    n = 0
    for x in tqdm(batches, desc=desc, leave=False):
        gm(x.to(device))
        n += len(x)
    if n == 0:
        raise NothingQuantizedError("calibration data is empty")
    for fq in act_quantizers(gm):
        fq.freeze()
    return n


def load_calibrated(gm: nn.Module, state: dict) -> nn.Module:
    """Load a calibrated state dict into a freshly prepared model and switch it to quantizing."""
    gm.load_state_dict(state, strict=True)
    quantizers = act_quantizers(gm)
    if not all(bool(fq.calibrated) for fq in quantizers):
        raise ValueError("the quantized checkpoint has uncalibrated activation quantizers")
    for fq in quantizers:
        fq.observing = False
    return gm.eval()


def summary(gm: nn.Module) -> dict:
    return {"weight_layers": len(weight_quantized_layers(gm)), "act_quantizers": len(act_quantizers(gm))}


