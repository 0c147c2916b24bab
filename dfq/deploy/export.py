"""Deployable integer models: a calibrated fake-quant model as an ONNX graph in QDQ format, run by
ONNX Runtime with integer kernels, and a per-layer quantization map.

``to_onnx`` writes exactly the integers and scales calibration chose:

- weights: int8 initializers ``q - z`` (our per-channel grid shifted to zero point 0) with their
  per-channel scales, read by a DequantizeLinear; a grid that does not fit int8 with zero point 0
  (8-bit asymmetric: ``q - z`` spans up to [-255, 255]) is stored as uint8 ``q`` with per-channel zero
  points ``z`` instead (exact). ONNX Runtime fuses such a layer into QLinearConv/QGemm where a
  QuantizeLinear reads its output (its WeightBiasQuantization rounds the float bias to int32 at
  s_x * s_w first: ``quantize.round_biases`` puts the fake-quant bias there) and keeps it a float conv
  where a float op (a residual Add, a BatchNormalization) reads it;
- activations: a QuantizeLinear / DequantizeLinear pair (uint8, our scale and zero point) where each
  ActFakeQuantize sits; below 8 bits the uint8 tensor is clipped to [0, 2^b - 1] between the pair
  (an integer Clip), so the narrower grid is exact in an int8 container;
- BatchNorm the zeroq protocol keeps unfolded (conv -> BN) is folded AFTER quantization: the layer's
  integers stay ours and its per-channel scale becomes s * |gamma / sqrt(var + eps)| (a negative BN
  factor negates the channel's integers), the bias gamma (b - mean) / sqrt(var + eps) + beta, so the
  exported conv equals fake-quant conv + BN up to float rounding. A BN that cannot be folded this way
  (a -128 integer in a channel to negate; an input shared with another consumer) stays a float op;
- biases: int32 at scale s_x * s_w per channel (how every integer engine adds them; the rounding
  moves an output by at most half of s_x * s_w).

ONNX Runtime's graph optimizer then fuses DequantizeLinear -> Conv -> QuantizeLinear groups into
QLinearConv (and Gemm into QGemm, Add into QLinearAdd, ...); what it cannot fuse runs in float on
dequantized tensors. Which kernel each layer gets (``layer_kernels``) and the op counts
(``integer_report``) are read from the optimized graph ONNX Runtime runs, never assumed by the export.
"""
from __future__ import annotations

import copy
import io
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.quant.prepare import input_quantizer
from dfq.quant.fake_quant import ActFakeQuantize, QuantConv2d, QuantLinear, weight_integers
from dfq.io import atomic_path

OPSET = 17
INTEGER_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
               "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere",
               "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "NhwcMaxPool"}
# ops that only move or pick integers (ORT runs them on the uint8 tensor after its QDQ fusions)
DATA_MOVEMENT_OPS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad",
                     "Concat", "Gather", "Identity", "Resize", "Split", "Clip", "Relu"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


class _ExportAct(nn.Module):
    """An ActFakeQuantize as the exporter sees it: a uint8 QuantizeLinear/DequantizeLinear pair with
    the calibrated scale and zero point, then (below 8 bits) a clamp at the grid's top, (2^b-1-z) s."""

    def __init__(self, fq: ActFakeQuantize):
        super().__init__()
        self.bits, self.scale, self.zero_point = fq.bits, float(fq.scale), int(fq.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        if self.bits < 8:
            x = torch.clamp(x, max=(2**self.bits - 1 - self.zero_point) * self.scale)
        return x


class _ExportWeight(nn.Module):
    """A conv/linear with its weight held as our integers times per-channel scales, fake-quantized
    in forward so that the exporter writes QuantizeLinear/DequantizeLinear on it (to_onnx then stores
    the integers). ``signed``: int8 with zero point 0; else uint8 with per-channel zero points."""

    def __init__(self, layer: nn.Module, ints: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None, signed: bool):
        super().__init__()
        self.conv = layer if isinstance(layer, nn.Conv2d) else None
        shape = (-1,) + (1,) * (ints.dim() - 1)
        self.register_buffer("weight", ((ints - zero_point.reshape(shape)).float() * scale.reshape(shape)))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.signed = signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = (-128, 127) if self.signed else (0, 255)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0, lo, hi)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        c = self.conv
        return F.conv2d(x, w, self.bias, c.stride, c.padding, c.dilation, c.groups)


def _bn_factor(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    g = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return g, bn.bias.detach() - g * bn.running_mean


def _graphs(gm: nn.Module) -> list[fx.GraphModule]:
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def _export_layer(layer: nn.Module, bn: nn.BatchNorm2d | None) -> _ExportWeight | None:
    """The export form of a QuantConv2d/QuantLinear, BN folded after quantization; None if the BN
    cannot be folded into int8 integers exactly."""
    q = weight_integers(layer)
    z = layer.weight_zero_point.to(torch.int32)
    shape = (-1,) + (1,) * (q.dim() - 1)
    ints = q - z.reshape(shape)
    scale = layer.weight_scale.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    signed = int(ints.min()) >= -128 and int(ints.max()) <= 127
    if bn is not None:
        g, b = _bn_factor(bn)
        neg = g < 0
        if not signed or (neg & (ints.flatten(1).min(1).values < -127)).any():
            return None
        ints = torch.where(neg.reshape(shape), -ints, ints)
        scale = scale * g.abs()
        bias = b + g * (bias if bias is not None else 0.0)
    if signed:
        return _ExportWeight(layer, ints, scale, torch.zeros_like(z), bias, True)
    return _ExportWeight(layer, q, scale, z, bias, False)


def _qualified(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


def _input_quantizer(root: nn.Module, g: fx.GraphModule, src, prefixes: dict) -> str:
    """Name of the activation quantizer whose output ``src`` is; 'FP32' when the tensor is not quantized."""
    found = input_quantizer(root, g, src, prefixes, (ActFakeQuantize, _ExportAct))
    return found[0] if found else "FP32"


def activation_map(gm: nn.Module) -> list[dict]:
    """One record per activation quantizer of a calibrated model: where it sits and its grid."""
    rows = []
    prefixes = {id(m): n for n, m in gm.named_modules()}
    for g in _graphs(gm):
        mods = dict(g.named_modules())
        for node in g.graph.nodes:
            fq = mods.get(node.target) if node.op == "call_module" else None
            if not isinstance(fq, ActFakeQuantize):
                continue
            src = node.args[0]
            what = (type(mods[src.target]).__name__ if src.op == "call_module" else
                    "input" if src.op == "placeholder" else getattr(src.target, "__name__", str(src.target)))
            s, z, qmax = float(fq.scale), int(fq.zero_point), 2**fq.bits - 1
            rows.append({"quantizer": _qualified(prefixes[id(g)], node.target), "bits": fq.bits,
                         "after": f"{what} ({_qualified(prefixes[id(g)], src.name)})",
                         "read_by": ", ".join(_qualified(prefixes[id(g)], u.target if u.op == "call_module" else u.name)
                                              for u in node.users),
                         "scale": s, "zero_point": z, "range": f"[{-z * s:.4g}, {(qmax - z) * s:.4g}]",
                         "onnx": "uint8 QuantizeLinear/DequantizeLinear" + ("" if fq.bits == 8 else f" + uint8 Clip [0, {qmax}]")})
    return rows


def export_module(gm: nn.Module, protocol: str = "zeroq") -> tuple[nn.Module, list[dict]]:
    """A copy of the calibrated fake-quant model that the ONNX exporter turns into our QDQ graph, and
    one record per weight layer (bits, stored integers, scale range, BN, input quantizer)."""
    gm = copy.deepcopy(gm).eval().cpu()
    records: list[dict] = []
    prefixes = {id(m): n for n, m in gm.named_modules()}
    for g in _graphs(gm):
        mods = dict(g.named_modules())
        for node in list(g.graph.nodes):
            if node.op != "call_module" or not isinstance(mods.get(node.target), (QuantConv2d, QuantLinear)):
                continue
            layer, bn_node = mods[node.target], None
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and isinstance(mods.get(users[0].target), nn.BatchNorm2d):
                bn_node = users[0]
            new = _export_layer(layer, mods[bn_node.target] if bn_node is not None else None)
            folded = new is not None and bn_node is not None
            if new is None:  # BN not foldable exactly: keep it as a float op after the conv
                new = _export_layer(layer, None)
            g.add_submodule(node.target, new)
            if folded:
                bn_node.replace_all_uses_with(node)
                g.graph.erase_node(bn_node)
            full = f"{prefixes[id(g)]}.{node.target}" if prefixes[id(g)] else node.target
            records.append({"layer": full, "type": type(layer).__name__.replace("Quant", ""),
                            "weight_bits": layer.weight_bits, "weight_scheme": layer.weight_scheme,
                            "weights_stored": "int8, zero point 0" if new.signed else "uint8, per-channel zero points",
                            "weight_scale_min": float(new.scale.min()), "weight_scale_max": float(new.scale.max()),
                            "bn": "folded after quantization" if folded else
                            ("kept: float BatchNormalization" if bn_node is not None else
                             ("folded before quantization" if protocol == "brecq" else "none")),
                            "input": _input_quantizer(gm, g, node.args[0], prefixes)})
        for node in g.graph.nodes:
            if node.op == "call_module" and isinstance(mods.get(node.target), ActFakeQuantize):
                g.add_submodule(node.target, _ExportAct(mods[node.target]))
        g.delete_all_unused_submodules()
        g.graph.lint()
        g.recompile()
    return gm, records


# ---------------------------------------------------------------------------------------------- ONNX graph


def _constants(model) -> dict:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in values:  # the exporter's de-duplicated initializers
            values[n.output[0]] = values[n.input[0]]
    return values


def _layer_name(node) -> str:
    """The torch module path of an exported node: '/layers.0/conv1/Conv' -> 'layers.0.conv1'."""
    return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def _qdq_rewrite(model) -> None:
    """Weights as integer initializers, int32 biases, integer clips for sub-8-bit activations, ConvInteger
    where a conv's output stays float (int8 weights). Which kernel each layer then runs is decided by ONNX
    Runtime's optimizer and read from its optimized graph (``layer_kernels``), never assumed here."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    consts = _constants(model)
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, new_nodes, new_inits = [], [], []
    # 1. weight QuantizeLinear on an initializer -> the integer initializer itself
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            w, s, z = consts[n.input[0]], consts[n.input[1]], consts[n.input[2]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            shape[axis] = -1
            info = np.iinfo(z.dtype)
            q = np.clip(np.rint(w / s.reshape(shape)) + z.reshape(shape).astype(np.int64), info.min, info.max)
            new_inits.append(numpy_helper.from_array(q.astype(z.dtype), n.output[0]))
            drop.append(n)
    for i in new_inits:
        consts[i.name] = numpy_helper.to_array(i)
    # 2. Q -> DQ -> Clip(max) (a sub-8-bit activation) -> Q -> Clip(uint8, 0, 2^b - 1) -> DQ
    for n in g.node:
        if n.op_type != "Clip":
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers[dq.output[0]]) != 1:
            continue
        s, z = float(consts[dq.input[1]]), int(consts[dq.input[2]])
        top = int(round(float(consts[n.input[2]]) / s)) + z
        name = n.output[0] + "_qmax"
        new_inits.append(numpy_helper.from_array(np.array(top, dtype=np.uint8), name))
        new_inits.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), name + "_min"))
        clipped = dq.input[0] + "_clipped"
        new_nodes.append(helper.make_node("Clip", [dq.input[0], name + "_min", name], [clipped],
                                          name=n.name + "_uint8"))
        dq.input[0] = clipped
        for c in consumers.get(n.output[0], []):
            for k, i in enumerate(c.input):
                if i == n.output[0]:
                    c.input[k] = dq.output[0]
        for k, o in enumerate(g.output):
            if o.name == n.output[0]:
                raise ValueError("an activation clip on the graph output is not supported")
        drop.append(n)
    for n in drop:
        g.node.remove(n)
    g.node.extend(new_nodes)
    drop, new_nodes = [], []
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits |= {i.name for i in new_inits}
    # 2b. MaxPool -> Q [-> Clip] -> DQ with a float MaxPool input: the same quantizer copied before the
    #     MaxPool (exact: max commutes with a monotone quantizer), so the pool runs on uint8 and the conv
    #     before it fuses into QLinearConv (ResNet stems: conv -> ReLU -> MaxPool -> quantizer)
    for n in list(g.node):
        if n.op_type != "MaxPool" or len(consumers.get(n.output[0], [])) != 1:
            continue
        q = consumers[n.output[0]][0]
        src = producer.get(n.input[0])
        if q.op_type != "QuantizeLinear" or (src is not None and src.op_type == "DequantizeLinear"):
            continue
        chain = [q]
        while len(consumers.get(chain[-1].output[0], [])) == 1 and consumers[chain[-1].output[0]][0].op_type == "Clip":
            chain.append(consumers[chain[-1].output[0]][0])
        if not any(c.op_type == "DequantizeLinear" for c in consumers.get(chain[-1].output[0], [])):
            continue
        dq = next(c for c in consumers[chain[-1].output[0]] if c.op_type == "DequantizeLinear")
        prev = n.input[0]
        for k, node in enumerate(chain + [dq]):
            out = f"{n.output[0]}_pre_{k}"
            new_nodes.append(helper.make_node(node.op_type, [prev, *node.input[1:]], [out], name=f"{n.name}_pre_{k}",
                                              **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
            prev = out
        n.input[0] = prev
    g.node.extend(new_nodes)
    new_nodes = []
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # 3. a conv reading a quantized input with int8 weights: if only QuantizeLinear reads its output,
    #    ONNX Runtime fuses it into QLinearConv (bias as int32 at s_x * s_w); if a float op reads it (a
    #    residual add, an unfolded BN), ConvInteger on the integers, then the float rescale s_x * s_w
    #    per channel and the float bias (ONNX Runtime has no such fusion for convs)
    #    (uint8 weights with per-channel zero points, 8-bit asymmetric, are left to ONNX Runtime: its
    #    WeightBiasQuantization rounds their bias to int32 at s_x * s_w and fuses the group into QLinearConv
    #    where a QuantizeLinear reads the output; round_biases puts the fake-quant bias on that grid)
    for n in list(g.node):
        if n.op_type not in ("Conv", "Gemm"):
            continue
        dq_x, dq_w = producer.get(n.input[0]), producer.get(n.input[1])
        if dq_x is None or dq_x.op_type != "DequantizeLinear":
            continue
        sx, sw, zw = consts[dq_x.input[1]], consts[dq_w.input[1]], consts[dq_w.input[2]]
        if zw.dtype != np.int8 or np.any(zw != 0):
            continue
        sb = (sx * sw).astype(np.float32)
        has_bias = len(n.input) > 2 and n.input[2] in inits
        readers = consumers.get(n.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "Relu":  # ONNX Runtime drops a Relu before a Q at zero point 0
            readers = consumers.get(readers[0].output[0], [])
        if n.op_type == "Gemm" or (readers and all(r.op_type == "QuantizeLinear" for r in readers)):
            if has_bias:
                b = np.rint(consts[n.input[2]] / sb).astype(np.int32)
                name = n.input[2] + "_int32"
                new_inits += [numpy_helper.from_array(b, name), numpy_helper.from_array(sb, name + "_scale"),
                              numpy_helper.from_array(np.zeros_like(b), name + "_zero_point")]
                new_nodes.append(helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zero_point"],
                                                  [name + "_dq"], axis=0, name=name + "_DequantizeLinear"))
                n.input[2] = name + "_dq"
            continue
        base = n.output[0]
        c = sw.size
        # ONNX Runtime's ConvInteger is ~3.6x faster with uint8 weights (u8u8) than int8 ones: the same
        # integers shifted by 128, zero point 128 (ConvInteger takes one weight zero point per layer)
        w_u8 = (consts[dq_w.input[0]].astype(np.int16) + 128).astype(np.uint8)
        new_inits += [numpy_helper.from_array(sb.reshape(1, c, 1, 1), base + "_rescale"),
                      numpy_helper.from_array(w_u8, base + "_weight_uint8"),
                      numpy_helper.from_array(np.array(128, dtype=np.uint8), base + "_weight_zero_point")]
        conv = helper.make_node("ConvInteger", [dq_x.input[0], base + "_weight_uint8", dq_x.input[2],
                                                base + "_weight_zero_point"], [base + "_int32"],
                                name=n.name + "_ConvInteger")
        conv.attribute.extend(n.attribute)
        tail = [conv, helper.make_node("Cast", [base + "_int32"], [base + "_acc"], to=onnx.TensorProto.FLOAT,
                                       name=n.name + "_Cast"),
                helper.make_node("Mul", [base + "_acc", base + "_rescale"], [base if not has_bias else base + "_scaled"],
                                 name=n.name + "_Rescale")]
        if has_bias:
            bias = consts[n.input[2]].astype(np.float32).reshape(1, c, 1, 1)
            new_inits.append(numpy_helper.from_array(bias, base + "_bias"))
            tail.append(helper.make_node("Add", [base + "_scaled", base + "_bias"], [base], name=n.name + "_Bias"))
        new_nodes += tail
        drop.append(n)
    for n in drop:
        g.node.remove(n)
    g.node.extend(new_nodes)
    while True:  # drop nodes nothing reads any more (the DequantizeLinear of a weight ConvInteger took)
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + [i for i in new_inits if i.name in used])
    _toposort(g)
    onnx.checker.check_model(model)


def _toposort(g) -> None:
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes, out = list(g.node), []
    while nodes:
        ready = [n for n in nodes if all(i in known for i in n.input)]
        if not ready:
            raise RuntimeError("ONNX graph has a cycle or a missing input")
        for n in ready:
            out.append(n)
            known.update(n.output)
            nodes.remove(n)
    del g.node[:]
    g.node.extend(out)


def to_onnx(gm: nn.Module, input_shape: tuple[int, ...], protocol: str = "zeroq",
            path: str | Path | None = None) -> tuple[bytes, list[dict]]:
    """The calibrated fake-quant model ``gm`` as ONNX QDQ bytes (batch axis dynamic), and the layer
    records of ``export_module``; written atomically to ``path`` when given."""
    import onnx

    module, records = export_module(gm, protocol)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.zeros(1, *input_shape[1:]), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    _qdq_rewrite(model)
    data = model.SerializeToString()
    kernels = layer_kernels(optimized_model(data))
    for r in records:
        r["kernel"] = kernels.get(r["layer"], "?")
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data, records


# ---------------------------------------------------------------------------------------------- ONNX Runtime


def session(model: bytes | str | Path, threads: int = 1, optimized_path: str | Path | None = None):
    """An ONNX Runtime CPU session with every graph optimization on (QDQ fusions included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only (saving an NCHWc-optimized graph warns it is machine specific)
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def optimized_model(model: bytes | str | Path, threads: int = 1):
    """The graph ONNX Runtime actually runs after its optimizations (an onnx ModelProto)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "optimized.onnx"
        session(model, threads, path)
        return onnx.load(str(path))


def optimized_ops(model, threads: int = 1) -> Counter:
    """Op types of the graph ONNX Runtime actually runs after its optimizations (``model``: ONNX bytes or
    path, or an optimized ModelProto from ``optimized_model``)."""
    if not hasattr(model, "graph"):
        model = optimized_model(model, threads)
    return Counter(n.op_type for n in model.graph.node)


# the ops of an optimized graph that compute a conv/linear layer, and how the quant map names them
LAYER_KERNELS = {"QLinearConv": "QLinearConv", "QGemm": "QGemm", "QLinearMatMul": "QLinearMatMul",
                 "ConvInteger": "ConvInteger + float rescale", "MatMulInteger": "MatMulInteger + float rescale",
                 "MatMulIntegerToFloat": "MatMulIntegerToFloat", "Conv": "float Conv", "FusedConv": "float Conv",
                 "NchwcConv": "float Conv", "Gemm": "float Gemm", "FusedGemm": "float Gemm", "MatMul": "float MatMul",
                 "FusedMatMul": "float MatMul"}


def layer_kernels(optimized) -> dict[str, str]:
    """The kernel ONNX Runtime runs for each conv/linear layer (by torch module path), read from its optimized
    graph: an integer kernel's name (QLinearConv, QGemm, ConvInteger + float rescale, ...) or 'float <op>'.
    Fused and rewritten nodes keep the exported node's name as a prefix ('/layers.0/conv1/Conv_token_4')."""
    kernels: dict[str, str] = {}
    for n in optimized.graph.node:
        if n.op_type in LAYER_KERNELS and n.name.strip("/").count("/"):
            kernels.setdefault(_layer_name(n), LAYER_KERNELS[n.op_type])
    return kernels


def integer_report(ops: Counter) -> dict:
    """Which op types of the optimized graph compute in integers and which in float."""
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    float_ops = {k: v for k, v in ops.items() if k not in INTEGER_OPS | QDQ_OPS | DATA_MOVEMENT_OPS}
    return {"integer_ops": dict(sorted(integer.items())), "float_ops": dict(sorted(float_ops.items())),
            "qdq_ops": {k: v for k, v in sorted(ops.items()) if k in QDQ_OPS},
            "integer_convs": sum(v for k, v in integer.items() if "Conv" in k),
            "float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0) + ops.get("NchwcConv", 0)}


def run(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def evaluate_onnx(sess, loader) -> dict:
    """Top-1/top-5 (percent) of an ONNX Runtime session over a DataLoader, and its time per image."""
    top1 = top5 = n = 0
    seconds = 0.0
    for x, y in loader:
        t = time.perf_counter()
        out = run(sess, x.float().contiguous())
        seconds += time.perf_counter() - t
        pred = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = pred == y.view(-1, 1)
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
        n += len(y)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": n, "ms_per_image": 1000.0 * seconds / n}


# ---------------------------------------------------------------------------------------------- quantization map


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
    lines = [f"# Quantization map: {title}", "",
             "Weight layers (per-channel weights; integers exactly as calibrated; `kernel`: what ONNX Runtime "
             "runs after its graph optimizations):", "", layers.to_markdown(index=False), "",
             "Activation quantizers (per tensor, uint8 containers; below 8 bits an integer Clip keeps the "
             "narrower grid):", "", a.to_markdown(index=False), "",
             "## What stays FP32", "",
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
             ""]
    return "\n".join(lines)
