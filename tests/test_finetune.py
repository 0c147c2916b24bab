"""Data-free fine-tuning (dfq.finetune): KL distillation into a calibrated fake-quant model."""
import pytest
import torch

from dfq.finetune import FinetuneConfig, augment, finetune, kl_divergence, mean_kl
from dfq.observers import MinMaxObserver
from dfq.quantize import act_quantizers, calibrate, load_quantized, prepare, round_biases, weight_quantized_layers


def _images(n=64):
    torch.manual_seed(3)
    return torch.randn(n, 1, 16, 16)


def _teacher(narrow_resnet):
    """The narrow test ResNet with confident outputs (its random classifier scaled up; logits std ~3)."""
    m = narrow_resnet()
    with torch.no_grad():
        m.fc.weight.mul_(20)
    return m


def _student(model, images, wbits=4, abits=4, protocol="zeroq"):
    gm = prepare(model, wbits, abits, MinMaxObserver, protocol, "symmetric")
    calibrate(gm, [images])
    return gm


def _on_grid(layer) -> bool:
    s = layer.weight_scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    z = layer.weight_zero_point.view_as(s).float()
    q = layer.weight.detach() / s + z
    return bool(torch.all((q - q.round()).abs() < 1e-4) and q.min() > -1e-4
                and q.max() < 2**layer.weight_bits - 1 + 1e-4)


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(8, 5)
    assert float(kl_divergence(a, a)) < 1e-6
    assert float(kl_divergence(a, a + torch.randn(8, 5))) > 0


def test_augment_crops_and_flips_per_image_reproducibly():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    a = augment(x, 1, True, torch.Generator().manual_seed(0))
    b = augment(x, 1, True, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)
    flipped = augment(x, 0, True, torch.Generator().manual_seed(1))
    for i in range(2):  # each image is itself or its mirror
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_one_step_lowers_the_kl(narrow_resnet, protocol):
    images = _images()
    teacher, student = _teacher(narrow_resnet), _student(_teacher(narrow_resnet), images, protocol=protocol)
    before = mean_kl(student, teacher, images, 64)
    cfg = FinetuneConfig(epochs=1, batch_size=64, lr=1e-3, act_lr=1e-3, schedule="constant", crop_padding=0, flip=False)
    out = finetune(student, teacher, images, cfg, progress=False)
    assert out["steps"] == 1 and out["kl_start"] == pytest.approx(before)
    assert out["kl_end"] < 0.9 * before, (before, out["kl_end"])


def test_weights_stay_on_their_grid_and_export_as_integers(narrow_resnet):
    """After fine-tuning every weight is its quantized value (the fixed grid), the checkpoint round-trips,
    and ONNX Runtime's integer model gives the fake-quant logits (int32 biases put back on their grid)."""
    from dfq.export import run, session, to_onnx

    images = _images()
    student = _student(narrow_resnet(), images, 8, 8)
    scales = [m.weight_scale.clone() for m in weight_quantized_layers(student)]
    finetune(student, narrow_resnet(), images, FinetuneConfig(epochs=2, batch_size=32, lr=0.05, act_lr=1e-3),
             progress=False)
    layers = weight_quantized_layers(student)
    assert all(_on_grid(m) for m in layers)
    assert all(torch.equal(m.weight_scale, s) for m, s in zip(layers, scales))  # the grid never moves
    assert all(fq.scale_param is None and "scale_param" not in dict(fq.named_parameters()) for fq in act_quantizers(student))
    round_biases(student)
    ckpt = {"bits": "w8a8", "protocol": "zeroq", "weight_scheme": "symmetric", "weight_range": "minmax",
            "state_dict": student.state_dict()}
    again = load_quantized(narrow_resnet(), ckpt)
    x = _images(16) * 0.9
    with torch.no_grad():
        ref = student(x)
        assert torch.equal(again(x), ref)
    data, records = to_onnx(student, (1, 1, 16, 16), "zeroq")
    assert sum(r["kernel"] != "float" and not r["kernel"].startswith("float") for r in records) == 8
    assert (run(session(data, threads=1), x) - ref).abs().max() < 1e-3


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_the_stored_model_computes_what_was_trained(narrow_resnet, protocol):
    """The model after fine-tuning (steps fixed, weights snapped to their grid) gives the outputs of the model
    in training at its last epoch, even where a large step size learning rate pushed a step across zero."""
    images, x = _images(), _images(16) * 0.9
    student, seen = _student(_teacher(narrow_resnet), images, protocol=protocol), {}

    def last(epoch, loss):
        with torch.no_grad():
            seen["y"] = student(x)
            seen["negative"] = sum(float(fq.scale_param) < 0 for fq in act_quantizers(student))

    finetune(student, _teacher(narrow_resnet), images, FinetuneConfig(epochs=3, batch_size=16, lr=0.1, act_lr=0.1),
             on_epoch=last, progress=False)
    assert seen["negative"] > 0  # the case this guards
    with torch.no_grad():
        assert torch.allclose(student(x), seen["y"], atol=1e-5)


def test_resume_after_a_kill_gives_the_same_weights(narrow_resnet, tmp_path):
    images = _images()
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.02, act_lr=1e-3)

    def student():
        return _student(narrow_resnet(), images)

    whole = student()
    finetune(whole, narrow_resnet(), images, cfg, progress=False)

    class Killed(Exception):
        pass

    def kill_after_first(epoch, loss):
        if epoch == 1:
            raise Killed

    ckpt = tmp_path / "state.pt"
    with pytest.raises(Killed):
        finetune(student(), narrow_resnet(), images, cfg, checkpoint=ckpt, on_epoch=kill_after_first, progress=False)
    assert ckpt.is_file() and not list(tmp_path.glob("*.tmp"))
    resumed = student()
    out = finetune(resumed, narrow_resnet(), images, cfg, checkpoint=ckpt, progress=False)
    assert out["resumed_from_epoch"] == 1 and len(out["loss_per_epoch"]) == 3
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_config_is_one_clear_error(narrow_resnet):
    with pytest.raises(ValueError, match="finetune.schedule='step'"):
        FinetuneConfig(schedule="step")
    with pytest.raises(ValueError, match="no images"):
        finetune(_student(narrow_resnet(), _images()), narrow_resnet(), torch.empty(0, 1, 16, 16), FinetuneConfig(),
                 progress=False)
