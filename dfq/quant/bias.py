"""Biases on the int32 grid an integer engine adds them on (step s_x * s_w per output channel), and the graph walk
that finds s_x: which activation quantizer, if any, feeds a layer (also what the export asks, dfq.deploy).

Rounding the biases in the fake-quant model (``quantize.bias: int32``) makes it compute what ONNX Runtime's
integer kernels compute, so fake-quant and exported accuracy agree (README, docs/export.md).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from dfq.quant.fake_quant import ActFakeQuantize, weight_integers
from dfq.quant.prepare import QUANT_TYPES


def input_quantizer(
    root: nn.Module, g: fx.GraphModule, src: fx.Node, prefixes: dict, types: tuple = (ActFakeQuantize,)
) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the activation quantizer whose output the node ``src`` of graph ``g``
    (inside ``root``; ``prefixes``: id(graph) -> its qualified name) is, following a unit's input
    placeholder out to the parent graph and a unit's output into its graph; None: the tensor is FP32.

    Args:
        root: the prepared model (``prepare``'s result).
        g: the graph (top level or a unit's) that ``src`` belongs to.
        src: the node whose tensor is asked about.
        prefixes: id(graph) -> the graph's qualified name in ``root`` ('' for the top level).
        types: the module types that count as an activation quantizer.
    """
    while True:
        mods = dict(g.named_modules())
        prefix = prefixes[id(g)]
        if src.op == "call_module" and isinstance(mods.get(src.target), types):
            return (f"{prefix}.{src.target}" if prefix else src.target), mods[src.target]
        if src.op == "call_module" and isinstance(mods.get(src.target), fx.GraphModule):  # a unit's output
            g = mods[src.target]
            src = next(n for n in g.graph.nodes if n.op == "output").args[0]
            continue
        if src.op != "placeholder" or not prefix:
            return None
        parent = next(
            m
            for m in root.modules()
            if isinstance(m, fx.GraphModule)
            and any(
                n.op == "call_module" and (f"{prefixes[id(m)]}.{n.target}" if prefixes[id(m)] else n.target) == prefix
                for n in m.graph.nodes
            )
        )
        pp = prefixes[id(parent)]
        call = next(
            n
            for n in parent.graph.nodes
            if n.op == "call_module" and (f"{pp}.{n.target}" if pp else n.target) == prefix
        )
        g, src = parent, call.args[0]


@torch.no_grad()
def round_biases(gm: nn.Module) -> int:
    """Put biases on the int32 grid an integer engine adds them on: step s_x * s_w per output channel (s_x: the
    scale of the layer's input quantizer), for every conv/linear whose input is quantized. That is the grid of the
    exported int32 biases (dfq.deploy.qdq; int8 weights) and also the one ONNX Runtime's WeightBiasQuantization
    puts a float bias on when it fuses a layer with uint8 per-channel-zero-point weights (8-bit asymmetric) into
    QLinearConv/QGemm; where a float op reads the output the rounded bias is exact in float too. A conv whose only
    reader is a BatchNorm (zeroq protocol; the export folds it after quantization, scale s_w |gamma / sigma|) gets
    the BN's shift moved onto the grid s_x s_w |gamma / sigma| instead, unless the export keeps that BN a float op
    (weights that do not fit int8, or a -128 to negate). Returns the layers changed."""
    prefixes = {id(m): n for n, m in gm.named_modules()}
    changed = 0
    for g in [m for m in gm.modules() if isinstance(m, fx.GraphModule)]:
        mods = dict(g.named_modules())
        for node in g.graph.nodes:
            layer = mods.get(node.target) if node.op == "call_module" else None
            if not isinstance(layer, QUANT_TYPES):
                continue
            src = input_quantizer(gm, g, node.args[0], prefixes)
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            ints = weight_integers(layer) - layer.weight_zero_point.reshape(shape).to(torch.int32)
            if src is None:
                continue  # float input: a float conv in the export, its bias stays float
            step = float(src[1].scale) * layer.weight_scale.detach()
            users = list(node.users)
            bn = mods.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
            if isinstance(bn, nn.BatchNorm2d):
                if bn.bias is None or bn.running_mean is None or int(ints.min()) < -128 or int(ints.max()) > 127:
                    continue  # the export keeps this BN a float op
                gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                if ((gain < 0) & (ints.flatten(1).min(1).values < -127)).any():
                    continue  # the export keeps this BN a float op
                conv_b = layer.bias if layer.bias is not None else torch.zeros_like(gain)
                total, st = bn.bias - gain * bn.running_mean + gain * conv_b, step * gain.abs()
                bn.bias.copy_(torch.round(total / st) * st + gain * bn.running_mean - gain * conv_b)
            elif layer.bias is not None:
                layer.bias.copy_(torch.round(layer.bias / step) * step)
            else:
                continue
            changed += 1
    return changed
