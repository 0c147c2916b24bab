"""Each graph pass of dfq.deploy.qdq on a small hand-built ONNX graph, against expectations written out by
hand (node order, names, initializer dtypes and values); the end-to-end ONNX Runtime tests are in
test_export.py."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, checker, helper, numpy_helper

from dfq.deploy.qdq import (
    PASSES,
    GraphIndex,
    drop_unread,
    integer_clips,
    integer_convs,
    qdq_rewrite,
    quantize_before_maxpool,
    toposort,
    weights_as_integers,
)


def _model(nodes, inits, inputs=(("x", TensorProto.FLOAT),), outputs=("y",), shape=None):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, shape) for n, t in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(pass_, model):
    pass_(GraphIndex(model))
    return model


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _ort(model, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


F32 = np.float32


def test_index_reads_constants_and_keeps_readers_in_graph_order():
    model = _model(
        [
            _const("c", F32(2.0)),
            helper.make_node("Identity", ["k"], ["k_alias"], name="alias"),
            helper.make_node("Relu", ["x"], ["a"], name="first"),
            helper.make_node("Neg", ["b"], ["y"], name="second"),
        ],
        {"k": F32([1.0, 3.0])},
    )
    ix = GraphIndex(model)
    assert float(ix.consts["c"]) == 2.0 and ix.consts["k_alias"].tolist() == [1.0, 3.0]  # the exporter's shared init
    second, first = _node(model, "second"), _node(model, "first")
    ix.set_input(second, 0, "x")  # 'second' now reads x as well; graph order, not order of the change
    assert [n.name for n in ix.readers("x")] == ["first", "second"] and not ix.is_read("b")
    added = ix.add("Abs", ["x"], ["z"], "third")
    assert [n.name for n in ix.readers("x")] == ["first", "second", "third"] and ix.producer["z"] is added
    ix.remove(first)
    assert [n.name for n in ix.readers("x")] == ["second", "third"] and "a" not in ix.producer
    assert [n.name for n in model.graph.node] == ["", "alias", "second", "third"]


# ---------------------------------------------------------------------------------------------- weights_as_integers


def test_weights_as_integers_stores_the_quantize_linear_result():
    """int8 per output channel (axis 0): w / s rounded half to even, saturated at 127; a QuantizeLinear without
    an axis attribute uses axis 1; uint8 with per-channel zero points saturates at 0 and 255; the activation's
    QuantizeLinear (not an initializer) stays."""
    w = F32([1.0, -1.5, 100.0, 0.125, 0.375, -0.3]).reshape(2, 1, 1, 3)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="qa"),
        helper.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dqa"),
        helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="qw", axis=0),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
        helper.make_node("QuantizeLinear", ["w2", "s2", "z2"], ["w2q"], name="qw2"),
        helper.make_node("QuantizeLinear", ["wu", "su", "zu"], ["wuq"], name="qwu", axis=0),
    ]
    inits = {
        "sa": F32(0.1),
        "za": np.uint8(0),
        "w": w,
        "sw": F32([0.5, 0.25]),
        "zw": np.int8([0, 0]),
        "w2": F32([[1.25, 3.0]]),
        "s2": F32([0.5, 2.0]),
        "z2": np.int8([0, 0]),
        "wu": F32([[0.2, -0.5], [4.0, 7.0]]),
        "su": F32([0.1, 1.0]),
        "zu": np.uint8([3, 250]),
    }
    model = _run(weights_as_integers, _model(nodes, inits))
    assert [n.name for n in model.graph.node] == ["qa", "dqa", "dqw", "conv"]
    got = _inits(model)
    assert got["wq"].dtype == np.int8 and got["wq"].reshape(2, 3).tolist() == [[2, -3, 127], [0, 2, -1]]
    assert got["w2q"].dtype == np.int8 and got["w2q"].tolist() == [[2, 2]]  # 2.5 -> 2, 1.5 -> 2
    assert got["wuq"].dtype == np.uint8 and got["wuq"].tolist() == [[5, 0], [254, 255]]
    assert "w" in got  # the float weight goes with drop_unread, once nothing reads it


# ---------------------------------------------------------------------------------------------- integer_clips


def _clip_graph(relu_reads="c", extra=()):
    return [
        _const("s", F32(0.1)),
        _const("z", np.uint8(3)),
        _const("cmax", F32(1.2)),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dequant"),
        helper.make_node("Clip", ["d", "", "cmax"], ["c"], name="clip"),
        helper.make_node("Relu", [relu_reads], ["y"], name="relu"),
        *extra,
    ]


def test_integer_clips_moves_the_clip_between_the_pair_in_integers():
    """4-bit grid, zero point 3, scale 0.1: the float clip at (15 - 3) * 0.1 becomes Clip(q, 0, 15) on uint8."""
    model = _run(integer_clips, _model(_clip_graph(), {}))
    assert [n.name for n in model.graph.node][3:] == ["quant", "dequant", "relu", "clip_uint8"]
    clip = _node(model, "clip_uint8")
    assert list(clip.input) == ["q", "c_qmax_min", "c_qmax"] and list(clip.output) == ["q_clipped"]
    assert _node(model, "dequant").input[0] == "q_clipped" and _node(model, "relu").input[0] == "d"
    got = _inits(model)
    assert got["c_qmax"].dtype == np.uint8 and int(got["c_qmax"]) == 15 and int(got["c_qmax_min"]) == 0
    toposort(GraphIndex(model))
    x = F32([-1.0, 0.05, 1.0, 2.0])  # codes 0 (saturated), 3 (0.5 rounds to even 0, + 3), 13, 23 -> 15
    assert np.allclose(_ort(model, {"x": x}), [0.0, 0.0, 1.0, 1.2])


def test_integer_clips_leaves_a_shared_dequantize_and_refuses_a_graph_output():
    shared = _model(_clip_graph(extra=[helper.make_node("Neg", ["d"], ["n"], name="other")]), {})
    assert "Clip" in _ops(_run(integer_clips, shared)) and _node(shared, "clip").input[0] == "d"
    on_output = _model(_clip_graph(relu_reads="x"), {}, outputs=("c",))
    with pytest.raises(ValueError, match="graph output"):
        _run(integer_clips, on_output)


# ---------------------------------------------------------------------------------------------- quantize_before_maxpool


def _pool_graph(pool_input="r"):
    return [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
        helper.make_node("MaxPool", [pool_input], ["p"], name="pool", kernel_shape=[2, 2]),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], name="quant", axis=1),
        helper.make_node("Clip", ["pq", "lo", "hi"], ["pc"], name="clip"),
        helper.make_node("DequantizeLinear", ["pc", "s", "z"], ["y"], name="dequant"),
    ]


POOL_INITS = {"s": F32(0.5), "z": np.uint8(0), "lo": np.uint8(0), "hi": np.uint8(3), "xq": np.uint8([[[[1]]]])}


def test_quantize_before_maxpool_copies_the_quantizer_chain_before_the_pool():
    model = _run(quantize_before_maxpool, _model(_pool_graph(), POOL_INITS))
    assert [n.name for n in model.graph.node] == [
        "relu",
        "dq_in",
        "pool",
        "quant",
        "clip",
        "dequant",
        "pool_pre_0",
        "pool_pre_1",
        "pool_pre_2",
    ]
    assert _ops(model)[-3:] == ["QuantizeLinear", "Clip", "DequantizeLinear"]
    assert [list(_node(model, f"pool_pre_{k}").input) for k in range(3)] == [
        ["r", "s", "z"],
        ["p_pre_0", "lo", "hi"],
        ["p_pre_1", "s", "z"],
    ]
    assert [a.i for a in _node(model, "pool_pre_0").attribute if a.name == "axis"] == [1]  # attributes copied
    assert _node(model, "pool").input[0] == "p_pre_2" and _node(model, "quant").input[0] == "p"
    x = F32([[[[0.4, -1.0], [1.6, 0.2]]], [[[9.0, 0.0], [0.1, 0.3]]]])  # max 1.6 -> code 3 -> 1.5; 9 -> 3 (Clip)
    assert _ort(model, {"x": x}).ravel().tolist() == [1.5, 1.5]


def test_quantize_before_maxpool_leaves_a_pool_on_quantized_values():
    model = _run(quantize_before_maxpool, _model(_pool_graph(pool_input="xd"), POOL_INITS))
    assert len(model.graph.node) == 6 and _node(model, "pool").input[0] == "xd"


# ---------------------------------------------------------------------------------------------- integer_convs


def _conv_graph(reader, w_zero=None, op="Conv", bias=True):
    """uint8 input x_q (scale 0.5), int8 weights [3], [-2] at scales 0.1, 0.2, bias [0.33, -0.07]."""
    w_zero = np.int8([0, 0]) if w_zero is None else w_zero
    tail = {
        "relu_q": [
            helper.make_node("Relu", ["y"], ["r"], name="relu"),
            helper.make_node("QuantizeLinear", ["r", "sx", "zx"], ["out"], name="quant"),
        ],
        "add": [helper.make_node("Add", ["y", "skip"], ["out"], name="residual")],
    }[reader]
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dqw", axis=0),
        helper.make_node(
            op,
            ["xd", "wd"] + (["b"] if bias else []),
            ["y"],
            name="conv",
            **({"strides": [1, 1], "pads": [0, 0, 0, 0]} if op == "Conv" else {"transB": 1}),
        ),
        *tail,
    ]
    inits = {
        "sx": F32(0.5),
        "zx": np.uint8(0),
        "w": np.int8([[[[3]]], [[[-2]]]]) if op == "Conv" else np.int8([[3], [-2]]),
        "sw": F32([0.1, 0.2]),
        "zw": w_zero,
        "b": F32([0.33, -0.07]),
        "skip": F32(0.0),
    }
    if w_zero.dtype == np.uint8:
        inits["w"] = inits["w"].astype(np.uint8)
    return _model(nodes, inits, inputs=(("xq", TensorProto.UINT8),), outputs=("out",))


def test_integer_convs_writes_the_bias_of_a_fused_conv_as_int32():
    """Only a QuantizeLinear reads the conv (through a Relu): the bias becomes int32 at s_x * s_w = [0.05, 0.1]:
    0.33 / 0.05 = 6.6 -> 7, -0.07 / 0.1 = -0.7 -> -1, behind a DequantizeLinear on axis 0."""
    model = _run(integer_convs, _conv_graph("relu_q"))
    assert [n.name for n in model.graph.node] == ["dqx", "dqw", "conv", "relu", "quant", "b_int32_DequantizeLinear"]
    dq = _node(model, "b_int32_DequantizeLinear")
    assert list(dq.input) == ["b_int32", "b_int32_scale", "b_int32_zero_point"] and list(dq.output) == ["b_int32_dq"]
    assert [a.i for a in dq.attribute] == [0] and list(_node(model, "conv").input) == ["xd", "wd", "b_int32_dq"]
    got = _inits(model)
    assert got["b_int32"].dtype == np.int32 and got["b_int32"].tolist() == [7, -1]
    assert got["b_int32_scale"].dtype == np.float32 and got["b_int32_scale"].tolist() == F32([0.05, 0.1]).tolist()
    assert got["b_int32_zero_point"].dtype == np.int32 and got["b_int32_zero_point"].tolist() == [0, 0]


def test_integer_convs_fuses_a_gemm_whatever_reads_it():
    model = _run(integer_convs, _conv_graph("add", op="Gemm"))
    assert _ops(model) == ["DequantizeLinear", "DequantizeLinear", "Gemm", "Add", "DequantizeLinear"]
    assert _inits(model)["b_int32"].tolist() == [7, -1]


@pytest.mark.parametrize("bias", [True, False])
def test_integer_convs_makes_a_conv_a_float_op_reads_conv_integer(bias):
    """A residual Add reads the conv: ConvInteger on the uint8 input and the int8 weights shifted to uint8
    (3 + 128, -2 + 128; zero point 128), Cast, the rescale s_x * s_w per channel, the float bias."""
    model = _run(integer_convs, _conv_graph("add", bias=bias))
    names = ["dqx", "dqw", "residual", "conv_ConvInteger", "conv_Cast", "conv_Rescale"] + (
        ["conv_Bias"] if bias else []
    )
    assert [n.name for n in model.graph.node] == names
    conv = _node(model, "conv_ConvInteger")
    assert list(conv.input) == ["xq", "y_weight_uint8", "zx", "y_weight_zero_point"] and list(conv.output) == [
        "y_int32"
    ]
    assert {a.name: list(a.ints) for a in conv.attribute} == {"strides": [1, 1], "pads": [0, 0, 0, 0]}
    cast = _node(model, "conv_Cast")
    assert (
        list(cast.input) == ["y_int32"] and list(cast.output) == ["y_acc"] and cast.attribute[0].i == TensorProto.FLOAT
    )
    assert list(_node(model, "conv_Rescale").output) == (["y_scaled"] if bias else ["y"])
    got = _inits(model)
    assert got["y_weight_uint8"].dtype == np.uint8 and got["y_weight_uint8"].ravel().tolist() == [131, 126]
    assert got["y_weight_zero_point"].dtype == np.uint8 and int(got["y_weight_zero_point"]) == 128
    assert got["y_rescale"].shape == (1, 2, 1, 1) and got["y_rescale"].ravel().tolist() == F32([0.05, 0.1]).tolist()
    if bias:
        assert list(_node(model, "conv_Bias").input) == ["y_scaled", "y_bias"]
        assert got["y_bias"].shape == (1, 2, 1, 1) and got["y_bias"].ravel().tolist() == F32([0.33, -0.07]).tolist()
    toposort(GraphIndex(model))  # x = 4 * 0.5 = 2: 2 * 0.3 + 0.33 = 0.93, 2 * -0.4 - 0.07 = -0.87 (integers 12, -8)
    expect = [0.93, -0.87] if bias else [0.6, -0.8]
    assert np.allclose(_ort(model, {"xq": np.full((1, 1, 1, 1), 4, np.uint8)}).ravel(), expect, atol=1e-6)


def test_integer_convs_leaves_uint8_weights_and_float_inputs():
    asym = _run(integer_convs, _conv_graph("add", w_zero=np.uint8([3, 9])))
    assert _ops(asym) == ["DequantizeLinear", "DequantizeLinear", "Conv", "Add"] and len(asym.graph.initializer) == 7
    float_in = _conv_graph("add")
    _node(float_in, "conv").input[0] = "skip"  # not a DequantizeLinear's output
    assert _ops(_run(integer_convs, float_in)) == ["DequantizeLinear", "DequantizeLinear", "Conv", "Add"]


# ---------------------------------------------------------------------------------------------- drop_unread, toposort


def test_drop_unread_removes_dead_chains_and_unread_initializers_keeping_order():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="dead1"),  # read only by dead2: goes in the second round
        helper.make_node("Neg", ["a"], ["b"], name="dead2"),
        helper.make_node("Add", ["x", "k1"], ["t"], name="add"),
        helper.make_node("Mul", ["t", "k2"], ["y"], name="mul"),
    ]
    model = _run(drop_unread, _model(nodes, {"k1": F32(1.0), "unused": F32(2.0), "k2": F32(3.0)}))
    assert [n.name for n in model.graph.node] == ["add", "mul"]
    assert [i.name for i in model.graph.initializer] == ["k1", "k2"]


def test_toposort_orders_in_waves_and_finds_cycles():
    nodes = [
        helper.make_node("Neg", ["b"], ["y"], name="C"),
        helper.make_node("Relu", ["a"], ["b"], name="B"),
        helper.make_node("Abs", ["x"], ["a"], name="A"),
        helper.make_node("Add", ["x", "k"], ["d"], name="D"),
    ]
    model = _run(toposort, _model(nodes, {"k": F32(1.0)}))
    assert [n.name for n in model.graph.node] == ["A", "D", "B", "C"]
    cycle = _model([helper.make_node("Relu", ["y"], ["a"]), helper.make_node("Neg", ["a"], ["y"])], {})
    with pytest.raises(RuntimeError, match="cycle"):
        _run(toposort, cycle)


def test_qdq_rewrite_runs_the_passes_in_order_on_a_quantized_conv():
    """Q/DQ input, a weight QuantizeLinear, a bias, Relu -> Q/DQ output: the weight becomes int8, the bias int32,
    the float weight and bias leave, the graph is topologically sorted and passes onnx.checker."""
    assert [p.__name__ for p in PASSES] == [
        "weights_as_integers",
        "integer_clips",
        "quantize_before_maxpool",
        "integer_convs",
        "drop_unread",
        "toposort",
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
        helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="qw", axis=0),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "so", "zo"], ["rq"], name="qo"),
        helper.make_node("DequantizeLinear", ["rq", "so", "zo"], ["y"], name="dqo"),
    ]
    inits = {
        "sx": F32(0.5),
        "zx": np.uint8(0),
        "w": F32([[[[0.3]]], [[[-0.4]]]]),
        "sw": F32([0.1, 0.2]),
        "zw": np.int8([0, 0]),
        "b": F32([0.33, -0.07]),
        "so": F32(0.25),
        "zo": np.uint8(0),
    }
    model = _model(nodes, inits, shape=["n", 1, 1, 1])
    qdq_rewrite(model)
    checker.check_model(model)
    assert [n.name for n in model.graph.node] == [
        "qx",
        "dqw",
        "b_int32_DequantizeLinear",
        "dqx",
        "conv",
        "relu",
        "qo",
        "dqo",
    ]
    assert [i.name for i in model.graph.initializer] == [
        "sx",
        "zx",
        "sw",
        "zw",
        "so",
        "zo",
        "wq",
        "b_int32",
        "b_int32_scale",
        "b_int32_zero_point",
    ]
    assert _inits(model)["wq"].ravel().tolist() == [3, -2]
    # x = 2: conv 0.6 + 0.35 (7 * 0.05), -0.8 - 0.1 (-1 * 0.1) -> Relu 0.95, 0 -> codes 4 (3.8), 0 -> 1.0, 0.0
    assert _ort(model, {"x": np.full((1, 1, 1, 1), 2.0, F32)}).ravel().tolist() == [1.0, 0.0]
