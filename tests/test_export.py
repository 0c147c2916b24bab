"""ONNX QDQ export of calibrated fake-quant models, run by ONNX Runtime (one intra-op thread)."""
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from dfq.export import activation_map, integer_report, optimized_ops, quant_map, run, session, to_onnx, weight_integers
from dfq.observers import MinMaxObserver
from dfq.quantize import act_quantizers, calibrate, prepare, weight_quantized_layers


def _calibrated(model, wbits, abits, protocol, scheme="symmetric"):
    torch.manual_seed(1)
    x = torch.randn(64, 1, 16, 16)
    gm = prepare(model, wbits, abits, MinMaxObserver, protocol, scheme)
    calibrate(gm, [x[:32]])
    return gm, x[32:]


def _logits(gm, data, x):
    with torch.no_grad():
        ref = gm(x)
    return run(session(data, threads=1), x), ref


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_w8a8_logits_match_fake_quant_and_convs_are_integer(narrow_resnet, protocol):
    gm, x = _calibrated(narrow_resnet(), 8, 8, protocol)
    data, records = to_onnx(gm, (1, 1, 16, 16), protocol)
    ort_out, ref = _logits(gm, data, x)
    # Tolerance from the scales: ONNX Runtime adds biases as int32 at s_x * s_w and requantizes the int32
    # accumulator itself, so an activation whose fake-quant value lies within that rounding of a half step
    # lands on the neighbouring grid point. If every element of the last quantized tensor moved by one
    # step s_L, a logit would move by at most s_L * max_j sum_i |W_ji| (the pooling averages, never adds).
    fc = gm.get_submodule("fc")
    tol = float(act_quantizers(gm)[-1 if protocol == "zeroq" else 1].scale) * float(fc.quantized_weight().detach().abs().sum(1).max())
    assert (ort_out - ref).abs().max() <= tol, ((ort_out - ref).abs().max(), tol)
    assert (ort_out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    report = integer_report(optimized_ops(data))
    # 9 convs; zeroq's stem reads the FP32 image (no quantizer there), so it stays a float conv
    assert report["integer_convs"] == (8 if protocol == "zeroq" else 9) and report["integer_ops"].get("QLinearConv", 0) >= 3
    assert report["float_convs"] == (1 if protocol == "zeroq" else 0)
    kernels = {r["layer"]: r["kernel"] for r in records}
    assert kernels["layers.0.conv1"] == "QLinearConv" and kernels["layers.0.conv2"].startswith("ConvInteger")
    assert kernels["stem.0"].startswith("float") == (protocol == "zeroq")


def test_exported_weights_are_our_integers_and_scales(narrow_resnet):
    """brecq: the int8 initializer of each conv is q - z of the fake-quant layer and its scale ours;
    zeroq: the same integers up to the sign of the BN factor, scale s * |gamma / sqrt(var + eps)|."""
    for protocol in ("brecq", "zeroq"):
        gm, _ = _calibrated(narrow_resnet(), 6, 8, protocol)
        data, _ = to_onnx(gm, (1, 1, 16, 16), protocol)
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}
        conv = gm.get_submodule("layers.1.conv1")
        q = torch.tensor(inits["/layers.1/conv1/QuantizeLinear_output_0"].astype("int64"))
        scale = torch.tensor(inits["layers.1.conv1.scale"])
        ours = weight_integers(conv) - conv.weight_zero_point.view(-1, 1, 1, 1)
        if protocol == "brecq":
            assert torch.equal(q, ours.long()) and torch.equal(scale, conv.weight_scale)
        else:
            bn = narrow_resnet().layers[1].bn1
            g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            assert torch.equal(q.abs(), ours.long().abs()) and q.abs().max() <= 31  # 6-bit grid in int8
            assert torch.allclose(scale, conv.weight_scale * g.abs(), rtol=1e-6)


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 5, bias=False)).eval()


def test_sub8bit_grid_clipped_in_integers():
    """W4A4 on inputs twice the calibration range: the uint8 Clip [0, 15] between each pair keeps the
    4-bit grid. With no biases (nothing rounded to int32), ONNX Runtime's integers equal the fake-quant
    ones, so the logits agree to float rounding; without the Clips they do not."""
    gm, x = _calibrated(_plain(), 4, 4, "brecq")
    x = 2 * x
    data, _ = to_onnx(gm, (1, 1, 16, 16), "brecq")
    ort_out, ref = _logits(gm, data, x)
    assert (ort_out - ref).abs().max() < 1e-4
    model = onnx.load_from_string(data)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len(clips) == 2 and all(int(inits[c.input[2]]) == 15 for c in clips)  # the two 4-bit quantizers
    for c in clips:  # drop them: values above the calibrated range are no longer clipped
        for n in model.graph.node:
            for k, i in enumerate(n.input):
                if i == c.output[0]:
                    n.input[k] = c.input[0]
        model.graph.node.remove(c)
    unclipped, _ = _logits(gm, model.SerializeToString(), x)
    assert (unclipped - ref).abs().max() > 1e-3
    assert integer_report(optimized_ops(data))["integer_convs"] == 3


def test_asymmetric_8bit_weights_exact_in_float(narrow_resnet):
    """8-bit asymmetric per-channel weights (q - z up to [-255, 255]) are stored as uint8 with per-channel
    zero points: exact, but no ONNX Runtime integer kernel takes them, and the map says so."""
    gm, x = _calibrated(narrow_resnet(), 8, 8, "zeroq", "asymmetric")
    data, records = to_onnx(gm, (1, 1, 16, 16), "zeroq")
    ort_out, ref = _logits(gm, data, x)
    assert (ort_out - ref).abs().max() < 1e-4
    float_layers = [r for r in records if r["weights_stored"].startswith("uint8")]
    assert float_layers and all(r["kernel"].startswith("float") for r in float_layers)
    assert all(r["bn"] == "kept: float BatchNormalization" for r in float_layers if r["type"] == "Conv2d")


def test_quant_map_lists_every_layer_and_quantizer(narrow_resnet):
    gm, _ = _calibrated(narrow_resnet(), 4, 4, "zeroq")
    data, records = to_onnx(gm, (1, 1, 16, 16), "zeroq")
    acts = activation_map(gm)
    text = quant_map(records, acts, integer_report(optimized_ops(data)), "test")
    assert len(records) == len(weight_quantized_layers(gm)) == 10 and len(acts) == len(act_quantizers(gm)) == 7
    for r in records:
        assert f"| {r['layer']} " in text
    for a in acts:
        assert f"| {a['quantizer']} " in text and a["onnx"].endswith("uint8 Clip [0, 15]")
    assert "folded after quantization" in text and "Layers whose input is not quantized (float conv/linear): stem.0, fc." in text
    # every block's conv reads the quantizer of the ReLU before it (inside the block or the previous one)
    inputs = {r["layer"]: r["input"] for r in records}
    assert inputs["layers.1.conv1"] == inputs["layers.1.shortcut.0"] == "layers.0.act_fq_2"
    assert inputs["layers.0.conv2"] == "layers.0.act_fq_1" and inputs["stem.0"] == "FP32"


def test_maxpool_runs_on_uint8_and_the_stem_conv_fuses(tmp_path):
    """ResNet stem conv -> ReLU -> MaxPool -> quantizer (brecq): the quantizer is copied before the MaxPool
    (max commutes with a monotone quantizer), so the stem conv fuses into QLinearConv and the pool reads
    uint8; the logits stay those of the graph without the copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5, bias=False)).eval()
    for bits in (8, 4):
        gm, x = _calibrated(model, bits, bits, "brecq")
        data, records = to_onnx(gm, (1, 1, 16, 16), "brecq")
        ort_out, ref = _logits(gm, data, 2 * x)
        assert (ort_out - ref).abs().max() < 1e-4
        assert {r["layer"]: r["kernel"] for r in records}["0"] == "QLinearConv"
        assert integer_report(optimized_ops(data))["float_convs"] == 0
        session(data, 1, tmp_path / "optimized.onnx")
        graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
        producer = {o: n for n in graph.node for o in n.output}
        pool = next(n for n in graph.node if n.op_type.endswith("MaxPool"))
        src = producer[pool.input[0]]
        while src.op_type in ("Transpose", "Clip"):  # layout change, the 4-bit grid's integer Clip
            src = producer[src.input[0]]
        assert src.op_type == "QLinearConv"  # the pool reads the conv's uint8 output


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_int32_biases_make_the_fake_quant_model_the_integer_model(narrow_resnet, protocol):
    """W4A4: ONNX Runtime adds biases as int32 at s_x * s_w (the BN shift of the zeroq protocol at
    s_x * s_w * |gamma / sigma|). Without round_biases the fake-quant model keeps float biases and differs
    from ONNX Runtime by up to a grid step; with it, every bias the export writes is already on that grid
    and the logits agree to float rounding (a requantization tie aside)."""
    from dfq.quantize import round_biases

    torch.manual_seed(3)
    model = narrow_resnet()
    for m in model.modules():  # biases and BN shifts large enough that their rounding shows
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.uniform_(-0.5, 0.5)
    gm, x = _calibrated(model, 4, 4, protocol)
    data, _ = to_onnx(gm, (1, 1, 16, 16), protocol)
    ort_out, ref = _logits(gm, data, x)
    before = (ort_out - ref).abs().max()
    assert round_biases(gm) == (8 if protocol == "zeroq" else 10)  # zeroq: the stem and fc read FP32 tensors
    data, _ = to_onnx(gm, (1, 1, 16, 16), protocol)
    ort_out, ref = _logits(gm, data, x)
    after = (ort_out - ref).abs().max()
    assert after < 1e-3 < before, (after, before)
    assert torch.equal(ort_out.argmax(1), ref.argmax(1))
    assert round_biases(gm) and torch.allclose(gm(x), ref, atol=1e-5)  # idempotent: already on the grid
