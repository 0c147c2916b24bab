"""dfq.deploy.runtime on hand-built inputs: the top-1/top-5 counting it shares with dfq.fp32.evaluate, the
kernel label of each layer read from an optimized graph, the integer / float op report."""

from collections import Counter

import numpy as np
import torch
from onnx import TensorProto, helper
from torch import nn

from dfq.deploy.runtime import evaluate_onnx, integer_report, layer_kernels, session
from dfq.fp32.evaluate import evaluate, topk_correct

# row 0: label 2 ranks first; row 1: label 0 ranks third (top-5 only); row 2: label 5 ranks last (neither)
LOGITS = torch.tensor([[0.1, 0.2, 0.9, 0.0, 0.3, 0.4], [0.5, 0.9, 0.1, 0.8, 0.0, 0.2], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
LABELS = torch.tensor([2, 0, 5])


def test_topk_correct_counts_by_hand():
    c1, c5 = topk_correct(LOGITS, LABELS)
    assert (int(c1), int(c5)) == (1, 2) and c1.dim() == 0
    # fewer than five classes: top-5 is every class, so every row counts
    c1, c5 = topk_correct(LOGITS[:, :3], torch.tensor([2, 0, 0]))
    assert (int(c1), int(c5)) == (2, 3)


def test_evaluate_and_evaluate_onnx_count_the_same_hits():
    """The logits themselves as the model (torch: nn.Identity; ONNX: an Identity node), in two batches."""
    loader = [(LOGITS[:2], LABELS[:2]), (LOGITS[2:], LABELS[2:])]
    assert evaluate(nn.Identity(), loader) == {"top1": 100.0 / 3, "top5": 200.0 / 3, "images": 3}
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m = evaluate_onnx(session(model.SerializeToString()), loader)
    assert (m["top1"], m["top5"], m["images"]) == (100.0 / 3, 200.0 / 3, 3) and m["ms_per_image"] >= 0


def test_layer_kernels_names_each_layer_by_its_first_compute_node():
    nodes = [
        helper.make_node("QLinearConv", [], ["a"], name="/layers.0/conv1/Conv_token_4"),
        helper.make_node("Conv", [], ["b"], name="/layers.0/conv1/Conv_extra"),  # the first one wins
        helper.make_node("ConvInteger", [], ["c"], name="/layers.0/conv2/Conv_ConvInteger"),
        helper.make_node("FusedConv", [], ["d"], name="/stem/stem.0/Conv"),
        helper.make_node("Gemm", [], ["e"], name="/fc/Gemm"),
        helper.make_node("Conv", [], ["f"], name="Conv_top_level"),  # no module path: not a layer
        helper.make_node("Relu", [], ["g"], name="/layers.0/relu/Relu"),
    ]
    optimized = helper.make_model(helper.make_graph(nodes, "opt", [], []))
    assert layer_kernels(optimized) == {
        "layers.0.conv1": "QLinearConv",
        "layers.0.conv2": "ConvInteger + float rescale",
        "stem.stem.0": "float Conv",
        "fc": "float Gemm",
    }


def test_integer_report_sorts_ops_into_integer_float_and_qdq():
    ops = Counter(
        {
            "QLinearConv": 3,
            "ConvInteger": 5,
            "QGemm": 1,
            "Conv": 1,
            "NchwcConv": 2,
            "Add": 8,
            "Mul": 5,
            "QuantizeLinear": 4,
            "DequantizeLinear": 6,
            "MaxPool": 1,
            "Relu": 2,
        }
    )
    assert integer_report(ops) == {
        "integer_ops": {"ConvInteger": 5, "QGemm": 1, "QLinearConv": 3},
        "float_ops": {"Add": 8, "Conv": 1, "Mul": 5, "NchwcConv": 2},
        "qdq_ops": {"DequantizeLinear": 6, "QuantizeLinear": 4},
        "integer_convs": 8,
        "float_convs": 3,
    }


def test_session_runs_on_one_thread_with_every_optimization():
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]
