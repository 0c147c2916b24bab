"""The quantization map of an exported cell (reports/quant_map/<cell>.md): every weight layer with the
integers it stores and the kernel ONNX Runtime runs for it, every activation quantizer with its grid,
and what stays FP32 in the integer model and why."""

from __future__ import annotations

from torch import nn

from dfq.deploy.module import graph_modules, qualified
from dfq.quant.fake_quant import ActFakeQuantize


def activation_map(gm: nn.Module) -> list[dict]:
    """One record per activation quantizer of a calibrated model: where it sits and its grid."""
    rows = []
    prefixes = {id(m): n for n, m in gm.named_modules()}
    for g in graph_modules(gm):
        mods = dict(g.named_modules())
        for node in g.graph.nodes:
            fq = mods.get(node.target) if node.op == "call_module" else None
            if not isinstance(fq, ActFakeQuantize):
                continue
            src = node.args[0]
            what = (
                type(mods[src.target]).__name__
                if src.op == "call_module"
                else "input"
                if src.op == "placeholder"
                else getattr(src.target, "__name__", str(src.target))
            )
            s, z, qmax = float(fq.scale), int(fq.zero_point), 2**fq.bits - 1
            rows.append(
                {
                    "quantizer": qualified(prefixes[id(g)], node.target),
                    "bits": fq.bits,
                    "after": f"{what} ({qualified(prefixes[id(g)], src.name)})",
                    "read_by": ", ".join(
                        qualified(prefixes[id(g)], u.target if u.op == "call_module" else u.name) for u in node.users
                    ),
                    "scale": s,
                    "zero_point": z,
                    "range": f"[{-z * s:.4g}, {(qmax - z) * s:.4g}]",
                    "onnx": "uint8 QuantizeLinear/DequantizeLinear"
                    + ("" if fq.bits == 8 else f" + uint8 Clip [0, {qmax}]"),
                }
            )
    return rows


def quant_map(records: list[dict], acts: list[dict], report: dict, title: str) -> str:
    """The quantization map as markdown (pandas): every weight layer, every activation quantizer, and
    the op types ONNX Runtime runs in float after its fusions."""
    import pandas as pd

    layers = pd.DataFrame(records)
    for col in ("weight_scale_min", "weight_scale_max"):
        layers[col] = layers[col].map(lambda v: f"{v:.3g}")
    a = pd.DataFrame(acts)
    a["scale"] = a["scale"].map(lambda v: f"{v:.4g}")
    fl = ", ".join(f"{k} x{v}" for k, v in report["float_ops"].items()) or "none"
    integer = ", ".join(f"{k} x{v}" for k, v in report["integer_ops"].items()) or "none"
    unquantized = [r["layer"] for r in records if r["input"] == "FP32"]
    lines = [
        f"# Quantization map: {title}",
        "",
        "Weight layers (per-channel weights; integers exactly as calibrated; `kernel`: what ONNX Runtime "
        "runs after its graph optimizations):",
        "",
        layers.to_markdown(index=False),
        "",
        "Activation quantizers (per tensor, uint8 containers; below 8 bits an integer Clip keeps the narrower grid):",
        "",
        a.to_markdown(index=False),
        "",
        "## What stays FP32",
        "",
        f"- Integer ops in the optimized ONNX Runtime graph: {integer}.",
        f"- Float ops in the optimized graph: {fl}.",
        "- ConvInteger accumulates in int32; its output is rescaled (x s_x s_w per channel) and its bias "
        "added in float, because a float op (a residual Add, a BatchNormalization) reads it, as in the "
        "fake-quant model.",
        "- QLinearConv/QGemm biases are int32 at s_x s_w (QLinearConv's contract; ONNX Runtime rounds a float "
        "bias there itself): with `quantize.bias: int32` the fake-quant model's biases are already on that "
        "grid, with `float` they move by up to s_x s_w / 2 in the integer model.",
        f"- Layers whose input is not quantized (float conv/linear): {', '.join(unquantized) or 'none'}.",
        "- Tensors that no quantizer reads stay FP32 exactly as in the fake-quant model: residual sums "
        "before their ReLU/quantizer, pooled features where no quantizer follows the pooling, the logits.",
        "",
    ]
    return "\n".join(lines)
