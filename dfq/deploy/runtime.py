"""ONNX Runtime: a CPU session with every graph optimization on, the graph it actually runs, which
kernel each layer gets there, which ops compute in integers, and top-1/top-5 over a DataLoader.

ONNX Runtime's graph optimizer fuses DequantizeLinear -> Conv -> QuantizeLinear groups into
QLinearConv (and Gemm into QGemm, Add into QLinearAdd, ...); what it cannot fuse runs in float on
dequantized tensors. Which kernel each layer gets (``layer_kernels``) and the op counts
(``integer_report``) are read from the optimized graph ONNX Runtime runs, never assumed by the export.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from dfq.fp32.evaluate import topk_correct

INTEGER_OPS = {
    "QLinearConv",
    "ConvInteger",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearReduceMean",
    "QLinearWhere",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "NhwcMaxPool",
}
# ops that only move or pick integers (ORT runs them on the uint8 tensor after its QDQ fusions)
DATA_MOVEMENT_OPS = {
    "MaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Pad",
    "Concat",
    "Gather",
    "Identity",
    "Resize",
    "Split",
    "Clip",
    "Relu",
}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# the ops of an optimized graph that compute a conv/linear layer, and how the quant map names them
LAYER_KERNELS = {
    "QLinearConv": "QLinearConv",
    "QGemm": "QGemm",
    "QLinearMatMul": "QLinearMatMul",
    "ConvInteger": "ConvInteger + float rescale",
    "MatMulInteger": "MatMulInteger + float rescale",
    "MatMulIntegerToFloat": "MatMulIntegerToFloat",
    "Conv": "float Conv",
    "FusedConv": "float Conv",
    "NchwcConv": "float Conv",
    "Gemm": "float Gemm",
    "FusedGemm": "float Gemm",
    "MatMul": "float MatMul",
    "FusedMatMul": "float MatMul",
}


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


def _layer_name(node) -> str:
    """The torch module path of an exported node: '/layers.0/conv1/Conv' -> 'layers.0.conv1'."""
    return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")


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
    return {
        "integer_ops": dict(sorted(integer.items())),
        "float_ops": dict(sorted(float_ops.items())),
        "qdq_ops": {k: v for k, v in sorted(ops.items()) if k in QDQ_OPS},
        "integer_convs": sum(v for k, v in integer.items() if "Conv" in k),
        "float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0) + ops.get("NchwcConv", 0),
    }


def run(sess, x: torch.Tensor) -> torch.Tensor:
    """The session's first output for the batch ``x`` (a CPU float tensor), as a tensor."""
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def evaluate_onnx(sess, loader) -> dict:
    """Top-1/top-5 (percent) of an ONNX Runtime session over a DataLoader, and its time per image
    (the session's run only: loading and counting are outside the clock). The hits are counted by
    ``dfq.fp32.evaluate.topk_correct``, as for the torch models."""
    top1 = top5 = n = 0
    seconds = 0.0
    for x, y in loader:
        t = time.perf_counter()
        out = run(sess, x.float().contiguous())
        seconds += time.perf_counter() - t
        c1, c5 = topk_correct(out, y)
        top1 += int(c1)
        top5 += int(c5)
        n += len(y)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": n, "ms_per_image": 1000.0 * seconds / n}
