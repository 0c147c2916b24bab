"""Deployable integer models: a calibrated fake-quant model as an ONNX graph in QDQ format that ONNX
Runtime runs with integer kernels (``to_onnx``: torch.onnx on ``dfq.deploy.module``'s export module, then
the named graph passes of ``PASSES`` over one ``GraphIndex``).

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
- BatchNorm the zeroq protocol keeps unfolded is folded after quantization (``dfq.deploy.module``): the
  layer's integers stay ours up to sign, its scale becomes s * |gamma / sqrt(var + eps)|;
- biases: int32 at scale s_x * s_w per channel (how every integer engine adds them; the rounding
  moves an output by at most half of s_x * s_w).

ONNX Runtime's graph optimizer then fuses DequantizeLinear -> Conv -> QuantizeLinear groups into
QLinearConv (and Gemm into QGemm, Add into QLinearAdd, ...); what it cannot fuse runs in float on
dequantized tensors. Which kernel each layer gets (``layer_kernels``) is read from the optimized graph
ONNX Runtime runs, never assumed here.
"""

from __future__ import annotations

import io
import itertools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from dfq.deploy.module import export_module
from dfq.deploy.runtime import layer_kernels, optimized_model
from dfq.io import atomic_path

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto

OPSET = 17


def _constants(model: ModelProto) -> dict:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in values:  # the exporter's de-duplicated initializers
            values[n.output[0]] = values[n.input[0]]
    return values


class GraphIndex:
    """An ONNX graph under rewrite, indexed once: the value of each constant tensor (initializers, Constant
    nodes, the exporter's Identity of a shared initializer), the node that produces each tensor and the
    nodes that read it. The passes change the graph only through ``add``, ``remove``, ``set_input`` and
    ``add_initializer``, which keep the index true, so no pass rebuilds it. Until ``toposort`` nodes are
    only removed or appended, and ``readers`` lists a tensor's readers in graph order (which reader a pass
    picks, and so the bytes written, never depends on the order a pass touched them in)."""

    def __init__(self, model: ModelProto):
        self.model, self.graph = model, model.graph
        self.consts = _constants(model)
        self.initializers = {i.name for i in self.graph.initializer}
        self.producer: dict[str, NodeProto] = {}
        self._readers: dict[str, list[NodeProto]] = {}
        self._position: dict[str, int] = {}  # first output name -> place in the graph's node list
        self._count = itertools.count()
        for n in self.graph.node:
            self._index(n)

    def _index(self, node: NodeProto) -> None:
        self._position[node.output[0]] = next(self._count)
        for o in node.output:
            self.producer[o] = node
        for i in node.input:
            self._readers.setdefault(i, []).append(node)

    def readers(self, tensor: str) -> list[NodeProto]:
        """The nodes that read ``tensor``, in graph order."""
        return sorted(self._readers.get(tensor, []), key=lambda n: self._position[n.output[0]])

    def is_read(self, tensor: str) -> bool:
        return bool(self._readers.get(tensor))

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> NodeProto:
        """Append a node (``onnx.helper.make_node``: attributes sorted by name); returns the graph's copy."""
        from onnx import helper

        self.graph.node.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        node = self.graph.node[-1]
        self._index(node)
        return node

    def remove(self, node: NodeProto) -> None:
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        for i in node.input:
            self._readers[i].remove(node)
        self.graph.node.remove(node)

    def set_input(self, node: NodeProto, k: int, tensor: str) -> None:
        """``node`` reads ``tensor`` as its k-th input."""
        self._readers[node.input[k]].remove(node)
        node.input[k] = tensor
        self._readers.setdefault(tensor, []).append(node)

    def add_initializer(self, value: np.ndarray, name: str) -> None:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers.add(name)
        self.consts[name] = numpy_helper.to_array(tensor)


# ---------------------------------------------------------------------------------------------- passes


def weights_as_integers(ix: GraphIndex) -> None:
    """Each QuantizeLinear on a float weight initializer becomes the integer initializer it computes, so
    the file stores our integers (int8 ``q - z``, or uint8 ``q`` with per-channel zero points) and the
    weight's DequantizeLinear reads them directly. Computed as QuantizeLinear defines it (round half to
    even of w / s, plus z, saturated to the zero point's type); the export module's float weight is our
    integers times s, so this gives them back."""
    weights = set(ix.initializers)
    for n in list(ix.graph.node):
        if n.op_type != "QuantizeLinear" or n.input[0] not in weights:
            continue
        w, s, z = ix.consts[n.input[0]], ix.consts[n.input[1]], ix.consts[n.input[2]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        info = np.iinfo(z.dtype)
        q = np.clip(np.rint(w / s.reshape(shape)) + z.reshape(shape).astype(np.int64), info.min, info.max)
        ix.add_initializer(q.astype(z.dtype), n.output[0])
        ix.remove(n)


def integer_clips(ix: GraphIndex) -> None:
    """Q -> DQ -> Clip(max) (a sub-8-bit activation) becomes Q -> Clip(uint8, 0, 2^b - 1) -> DQ: the grid's
    top as an integer, so the narrower grid is exact in the uint8 container and ONNX Runtime's QDQ fusions
    (which look for Q -> DQ around an op) still see the pair. The float clip at (2^b - 1 - z) s of the
    export module is exactly the integer clip at 2^b - 1."""
    for n in list(ix.graph.node):
        if n.op_type != "Clip":
            continue
        dq = ix.producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(ix.readers(dq.output[0])) != 1:
            continue
        s, z = float(ix.consts[dq.input[1]]), int(ix.consts[dq.input[2]])
        top = int(round(float(ix.consts[n.input[2]]) / s)) + z
        name = n.output[0] + "_qmax"
        ix.add_initializer(np.array(top, dtype=np.uint8), name)
        ix.add_initializer(np.array(0, dtype=np.uint8), name + "_min")
        clipped = dq.input[0] + "_clipped"
        ix.add("Clip", [dq.input[0], name + "_min", name], [clipped], n.name + "_uint8")
        ix.set_input(dq, 0, clipped)
        for c in ix.readers(n.output[0]):
            for k, i in enumerate(c.input):
                if i == n.output[0]:
                    ix.set_input(c, k, dq.output[0])
        if any(o.name == n.output[0] for o in ix.graph.output):
            raise ValueError("an activation clip on the graph output is not supported")
        ix.remove(n)


def quantize_before_maxpool(ix: GraphIndex) -> None:
    """MaxPool -> Q [-> Clip] -> DQ with a float MaxPool input: the same quantizer is copied before the
    MaxPool (exact: max commutes with a monotone quantizer), so the pool runs on uint8 and the conv before
    it fuses into QLinearConv (ResNet stems: conv -> ReLU -> MaxPool -> quantizer). The quantizer after the
    pool stays; on the already quantized values it changes nothing."""
    from onnx import helper

    for n in list(ix.graph.node):
        if n.op_type != "MaxPool" or len(ix.readers(n.output[0])) != 1:
            continue
        q, src = ix.readers(n.output[0])[0], ix.producer.get(n.input[0])
        if q.op_type != "QuantizeLinear" or (src is not None and src.op_type == "DequantizeLinear"):
            continue
        chain = [q]
        while len(ix.readers(chain[-1].output[0])) == 1 and ix.readers(chain[-1].output[0])[0].op_type == "Clip":
            chain.append(ix.readers(chain[-1].output[0])[0])
        dq = next((c for c in ix.readers(chain[-1].output[0]) if c.op_type == "DequantizeLinear"), None)
        if dq is None:
            continue
        prev = n.input[0]
        for k, node in enumerate(chain + [dq]):
            out = f"{n.output[0]}_pre_{k}"
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            ix.add(node.op_type, [prev, *node.input[1:]], [out], f"{n.name}_pre_{k}", **attrs)
            prev = out
        ix.set_input(n, 0, prev)


def _int32_bias(ix: GraphIndex, n: NodeProto, sb: np.ndarray) -> None:
    """The float bias of a conv/gemm ONNX Runtime fuses, as int32 at s_x * s_w (QLinearConv's contract)
    behind a DequantizeLinear, so that the bias the integer kernel adds is ours, not ONNX Runtime's rounding."""
    b = np.rint(ix.consts[n.input[2]] / sb).astype(np.int32)
    name = n.input[2] + "_int32"
    ix.add_initializer(b, name)
    ix.add_initializer(sb, name + "_scale")
    ix.add_initializer(np.zeros_like(b), name + "_zero_point")
    ix.add(
        "DequantizeLinear",
        [name, name + "_scale", name + "_zero_point"],
        [name + "_dq"],
        name + "_DequantizeLinear",
        axis=0,
    )
    ix.set_input(n, 2, name + "_dq")


def _conv_integer(ix: GraphIndex, n: NodeProto, dq_x: NodeProto, dq_w: NodeProto, sb: np.ndarray) -> None:
    """A conv whose output a float op reads, as ConvInteger on the integers, then the float rescale
    s_x * s_w per channel and the float bias (ONNX Runtime has no such fusion for convs)."""
    import onnx

    base, c = n.output[0], sb.size
    has_bias = len(n.input) > 2 and n.input[2] in ix.initializers
    # ONNX Runtime's ConvInteger is ~3.6x faster with uint8 weights (u8u8) than int8 ones: the same
    # integers shifted by 128, zero point 128 (ConvInteger takes one weight zero point per layer)
    w_u8 = (ix.consts[dq_w.input[0]].astype(np.int16) + 128).astype(np.uint8)
    ix.add_initializer(sb.reshape(1, c, 1, 1), base + "_rescale")
    ix.add_initializer(w_u8, base + "_weight_uint8")
    ix.add_initializer(np.array(128, dtype=np.uint8), base + "_weight_zero_point")
    if has_bias:
        bias = ix.consts[n.input[2]].astype(np.float32).reshape(1, c, 1, 1)
    conv = ix.add(
        "ConvInteger",
        [dq_x.input[0], base + "_weight_uint8", dq_x.input[2], base + "_weight_zero_point"],
        [base + "_int32"],
        n.name + "_ConvInteger",
    )
    conv.attribute.extend(n.attribute)
    name = n.name
    ix.remove(n)
    ix.add("Cast", [base + "_int32"], [base + "_acc"], name + "_Cast", to=onnx.TensorProto.FLOAT)
    ix.add("Mul", [base + "_acc", base + "_rescale"], [base if not has_bias else base + "_scaled"], name + "_Rescale")
    if has_bias:
        ix.add_initializer(bias, base + "_bias")
        ix.add("Add", [base + "_scaled", base + "_bias"], [base], name + "_Bias")


def integer_convs(ix: GraphIndex) -> None:
    """A conv/gemm reading a quantized input with int8 weights (zero point 0): if only QuantizeLinear reads
    its output (through a Relu, which ONNX Runtime drops before a Q at zero point 0), ONNX Runtime fuses it
    into QLinearConv/QGemm, and its bias is written as int32 at s_x * s_w (``_int32_bias``); if a float op
    reads it (a residual add, an unfolded BN), it becomes ConvInteger + float rescale (``_conv_integer``).
    uint8 weights with per-channel zero points (8-bit asymmetric) are left to ONNX Runtime: its
    WeightBiasQuantization rounds their bias to int32 at s_x * s_w and fuses the group into QLinearConv
    where a QuantizeLinear reads the output (``round_biases`` puts the fake-quant bias on that grid)."""
    for n in list(ix.graph.node):
        if n.op_type not in ("Conv", "Gemm"):
            continue
        dq_x, dq_w = ix.producer.get(n.input[0]), ix.producer.get(n.input[1])
        if dq_x is None or dq_x.op_type != "DequantizeLinear":
            continue
        sx, sw, zw = ix.consts[dq_x.input[1]], ix.consts[dq_w.input[1]], ix.consts[dq_w.input[2]]
        if zw.dtype != np.int8 or np.any(zw != 0):
            continue
        sb = (sx * sw).astype(np.float32)
        readers = ix.readers(n.output[0])
        if len(readers) == 1 and readers[0].op_type == "Relu":
            readers = ix.readers(readers[0].output[0])
        if n.op_type == "Gemm" or (readers and all(r.op_type == "QuantizeLinear" for r in readers)):
            if len(n.input) > 2 and n.input[2] in ix.initializers:
                _int32_bias(ix, n, sb)
        else:
            _conv_integer(ix, n, dq_x, dq_w, sb)


def drop_unread(ix: GraphIndex) -> None:
    """Nodes whose outputs nothing reads any more (the weight DequantizeLinear a ConvInteger replaced, then
    what fed only it), repeatedly, and initializers no node reads (the float weights the integers replaced)."""
    outputs = {o.name for o in ix.graph.output}
    while True:
        dead = [n for n in ix.graph.node if not any(ix.is_read(o) or o in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            ix.remove(n)
    used = {i for n in ix.graph.node for i in n.input}
    keep = [i for i in ix.graph.initializer if i.name in used]
    del ix.graph.initializer[:]
    ix.graph.initializer.extend(keep)
    ix.initializers = {i.name for i in keep}


def toposort(ix: GraphIndex) -> None:
    """Nodes in topological order (ONNX requires it; the passes append what they add at the end), in
    waves: every node whose inputs are known, in the current order, then the next wave."""
    g = ix.graph
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


PASSES = (weights_as_integers, integer_clips, quantize_before_maxpool, integer_convs, drop_unread, toposort)


# ---------------------------------------------------------------------------------------------- driver


def qdq_rewrite(model: ModelProto) -> None:
    """The exported graph rewritten in place by ``PASSES`` in order, then checked by onnx.checker."""
    import onnx

    ix = GraphIndex(model)
    for graph_pass in PASSES:
        graph_pass(ix)
    onnx.checker.check_model(model)


def _torch_export(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            torch.zeros(1, *input_shape[1:]),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


def to_onnx(
    gm: nn.Module, input_shape: tuple[int, ...], protocol: str = "zeroq", path: str | Path | None = None
) -> tuple[bytes, list[dict]]:
    """The calibrated fake-quant model ``gm`` as ONNX QDQ bytes (batch axis dynamic), and the layer
    records of ``export_module`` with the kernel ONNX Runtime's optimized graph runs for each layer;
    written atomically to ``path`` when given."""
    import onnx

    module, records = export_module(gm, protocol)
    model = onnx.load_from_string(_torch_export(module, input_shape))
    qdq_rewrite(model)
    data = model.SerializeToString()
    kernels = layer_kernels(optimized_model(data))
    for r in records:
        r["kernel"] = kernels.get(r["layer"], "?")
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data, records
