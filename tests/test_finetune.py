"""Data-free fine-tuning (dfq.quant.finetune): KL distillation into a calibrated fake-quant model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfq.io import load_torch
from dfq.quant.bias import round_biases
from dfq.quant.finetune import FinetuneConfig, _schedule, augment, finetune, kl_divergence, mean_kl
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import (
    QuantSpec,
    act_quantizers,
    calibrate,
    load_quantized,
    prepare,
    weight_quantized_layers,
)


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
    gm = prepare(model, wbits, abits, MinMaxObserver, QuantSpec(protocol, "symmetric"))
    calibrate(gm, [images])
    return gm


def _on_grid(layer) -> bool:
    s = layer.weight_scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    z = layer.weight_zero_point.view_as(s).float()
    q = layer.weight.detach() / s + z
    return bool(
        torch.all((q - q.round()).abs() < 1e-4) and q.min() > -1e-4 and q.max() < 2**layer.weight_bits - 1 + 1e-4
    )


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(8, 5)
    assert float(kl_divergence(a, a)) < 1e-6
    assert float(kl_divergence(a, a + torch.randn(8, 5))) > 0


# Two samples, three classes, logits whose softmaxes are simple fractions (softmax(log c) = c / sum c):
#   sample 0: teacher log(1, 2, 3) -> p = (1/6, 2/6, 3/6), student (0, 0, 0) -> q = (1/3, 1/3, 1/3)
#   sample 1: teacher log(1, 3, 6) -> p = (0.1, 0.3, 0.6), student log(5, 3, 2) -> q = (0.5, 0.3, 0.2)
# (the teacher shifted by +1.5 and the student by -2: softmax does not see a constant shift)
TEACHER = torch.tensor([[0.0, math.log(2), math.log(3)], [0.0, math.log(3), math.log(6)]]) + 1.5
STUDENT = torch.tensor([[0.0, 0.0, 0.0], [math.log(5), math.log(3), math.log(2)]]) - 2.0
# KL(teacher || student) = sum_c p_c log(p_c / q_c), averaged over the two samples
KL_T_S = (
    (1 / 6) * math.log((1 / 6) / (1 / 3))
    + (2 / 6) * math.log((2 / 6) / (1 / 3))
    + (3 / 6) * math.log((3 / 6) / (1 / 3))
    + 0.1 * math.log(0.1 / 0.5)
    + 0.3 * math.log(0.3 / 0.3)
    + 0.6 * math.log(0.6 / 0.2)
) / 2
# the other direction, KL(student || teacher), on the same numbers
KL_S_T = (
    (1 / 3) * (math.log((1 / 3) / (1 / 6)) + math.log((1 / 3) / (2 / 6)) + math.log((1 / 3) / (3 / 6)))
    + 0.5 * math.log(0.5 / 0.1)
    + 0.3 * math.log(0.3 / 0.3)
    + 0.2 * math.log(0.2 / 0.6)
) / 2


def test_kl_is_teacher_to_student_hand_computed():
    """kl_divergence(student, teacher) is KL(teacher || student), a mean over samples (not classes)."""
    assert KL_T_S == pytest.approx(0.29272, abs=1e-5) and KL_S_T == pytest.approx(0.34045, abs=1e-5)
    assert float(kl_divergence(STUDENT, TEACHER)) == pytest.approx(KL_T_S, rel=1e-6)


class _Table(nn.Module):
    """Logits looked up by the image's value (an index): a "model" whose outputs are the numbers above."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x.long().flatten()]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_mean_kl_is_teacher_to_student_hand_computed(batch_size):
    images = torch.arange(2, dtype=torch.float32).view(2, 1)
    assert mean_kl(_Table(STUDENT), _Table(TEACHER), images, batch_size) == pytest.approx(KL_T_S, rel=1e-6)


def _kl_reference(student_logits, teacher_logits) -> float:
    """KL(teacher || student) = sum p_t (log p_t - log p_s), mean over samples: a second implementation."""
    log_t, log_s = F.log_softmax(teacher_logits.double(), 1), F.log_softmax(student_logits.double(), 1)
    return float((log_t.exp() * (log_t - log_s)).sum(1).mean())


def test_training_loss_is_kl_teacher_to_student(narrow_resnet):
    """The loss the training loop minimises (its first step's value, one full batch, no augmentation) and
    kl_start are KL(teacher || student) of the models' outputs, computed here independently."""
    images = _images()
    teacher, student = _teacher(narrow_resnet), _student(_teacher(narrow_resnet), images, 2, 2)  # W2A2: far apart
    with torch.no_grad():
        s_logits, t_logits = student(images), teacher(images)
    expected, reverse = _kl_reference(s_logits, t_logits), _kl_reference(t_logits, s_logits)
    assert abs(expected - reverse) > 0.1 * expected  # the direction shows in these numbers
    cfg = FinetuneConfig(epochs=1, batch_size=64, lr=1e-3, act_lr=1e-3, schedule="constant", crop_padding=0, flip=False)
    out = finetune(student, teacher, images, cfg, progress=False)
    assert out["loss_per_epoch"][0] == pytest.approx(expected, rel=1e-4)
    assert out["kl_start"] == pytest.approx(expected, rel=1e-4)


def test_cosine_factor_is_1_then_half_then_0():
    cosine, constant = (
        _schedule(FinetuneConfig(schedule="cosine"), 10),
        _schedule(FinetuneConfig(schedule="constant"), 10),
    )
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5, abs=1e-12) and cosine(10) == pytest.approx(0, abs=1e-12)
    assert [constant(k) for k in (0, 5, 10)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rates_of_a_real_run_follow_the_schedule(narrow_resnet, tmp_path, monkeypatch, schedule):
    """The learning rate each optimiser step actually uses (recorded by wrapping SGD.step and Adam.step,
    which still run), and the one left after the last step (the checkpoint): 8 steps (2 epochs of 4 batches),
    cosine: lr x 0.5 (1 + cos(pi k / 8)) at step k, i.e. x1 at step 0, x0.5 at step 4, 0 after step 8."""
    used = {"SGD": [], "Adam": []}
    for cls in (torch.optim.SGD, torch.optim.Adam):

        def observed(self, *args, _step=cls.step, _name=cls.__name__, **kwargs):
            used[_name].append(self.param_groups[0]["lr"])
            return _step(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", observed)
    images = _images()
    lr, act_lr = 0.01, 0.004
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=lr, act_lr=act_lr, schedule=schedule)
    ends = []

    def after_epoch(epoch, loss):
        state = load_torch(tmp_path / "state.pt")
        ends.append((state["opt_w"]["param_groups"][0]["lr"], state["opt_a"]["param_groups"][0]["lr"]))

    finetune(
        _student(narrow_resnet(), images),
        narrow_resnet(),
        images,
        cfg,
        checkpoint=tmp_path / "state.pt",
        on_epoch=after_epoch,
        progress=False,
    )
    if schedule == "cosine":
        factors = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
        assert factors[0] == 1 and factors[4] == pytest.approx(0.5)
        end, middle = 0.0, 0.5  # after the last step; after epoch 1 (step 4)
    else:
        factors, end, middle = [1.0] * 8, 1.0, 1.0
    assert used["SGD"] == pytest.approx([lr * f for f in factors], rel=1e-9, abs=1e-15)
    assert used["Adam"] == pytest.approx([act_lr * f for f in factors], rel=1e-9, abs=1e-15)
    assert ends == [
        pytest.approx((lr * middle, act_lr * middle), abs=1e-12),
        pytest.approx((lr * end, act_lr * end), abs=1e-12),
    ]


@pytest.mark.parametrize("protocol,expected", [("zeroq", 10), ("brecq", 9)])
def test_bn_affine_parameters_and_step_sizes_are_trained(tiny_bn, protocol, expected):
    """Everything the docstring says trains changes in one step, and nothing else is trainable. By hand, for
    the tiny conv-BN-ReLU-conv-BN-ReLU-linear model (convs without bias):
    zeroq (BN kept): conv1.w, bn1.w, bn1.b, conv2.w, bn2.w, bn2.b, fc.w, fc.b + 2 step sizes (after each ReLU) = 10;
    brecq (BN folded into biased convs): conv1.w/b, conv2.w/b, fc.w/b + 3 step sizes (inputs of conv1, conv2, fc)
    = 9."""
    torch.manual_seed(1)
    images = torch.randn(16, 1, 8, 8)
    teacher = tiny_bn
    with torch.no_grad():
        teacher.fc.weight.mul_(10)
    student = _student(copy.deepcopy(teacher), images, protocol=protocol)
    before = {n: t.detach().clone() for n, t in student.state_dict().items()}
    bn_names = [n for n, m in student.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == (2 if protocol == "zeroq" else 0)
    seen = {}

    def after_step(epoch, loss):
        seen["trainable"] = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        seen["scales"] = {
            n: fq.scale.detach().clone() for n, fq in student.named_modules() if hasattr(fq, "scale_param")
        }

    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=0.05, act_lr=0.01, schedule="constant", crop_padding=0, flip=False)
    finetune(student, teacher, images, cfg, on_epoch=after_step, progress=False)
    trainable = seen["trainable"]
    assert len(trainable) == expected, sorted(trainable)
    steps = [n for n in trainable if n.endswith("scale_param")]
    assert len(steps) == len(seen["scales"]) == (2 if protocol == "zeroq" else 3)
    for name, value in trainable.items():  # every trainable tensor moved in the one step
        start = seen["scales"][name.removesuffix(".scale_param")].reshape(1) if name in steps else before[name]
        assert not torch.equal(value, start), f"{name} did not change"
    for bn in bn_names:  # gamma and beta trained (and changed), running statistics frozen
        assert {f"{bn}.weight", f"{bn}.bias"} <= trainable.keys()
        assert not torch.equal(student.get_submodule(bn).weight, before[f"{bn}.weight"])
        assert not torch.equal(student.get_submodule(bn).bias, before[f"{bn}.bias"])
        assert torch.equal(student.get_submodule(bn).running_mean, before[f"{bn}.running_mean"])
        assert torch.equal(student.get_submodule(bn).running_var, before[f"{bn}.running_var"])


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_kl_end_is_the_kl_of_the_stored_model_of_an_int32_bias_cell(narrow_resnet, protocol):
    """An int32-bias cell: kl_end is the KL(teacher || student) of the model as stored (biases back on the
    int32 grid, saved and reloaded), computed here from its outputs; the same run without re-rounding reports
    the KL before it, which differs."""
    images = _images()
    teacher = _teacher(narrow_resnet)
    cfg = FinetuneConfig(epochs=1, batch_size=32, lr=0.05, act_lr=1e-3, crop_padding=0, flip=False)
    rounded, plain = (_student(_teacher(narrow_resnet), images, 3, 3, protocol) for _ in range(2))
    out = finetune(rounded, teacher, images, cfg, progress=False, int32_biases=True)
    before = finetune(plain, teacher, images, cfg, progress=False)  # the same run, biases where training left them
    assert out["int32_biases"] > 0 and before["int32_biases"] == 0
    ckpt = {
        "bits": "w3a3",
        "protocol": protocol,
        "weight_scheme": "symmetric",
        "weight_range": "minmax",
        "bias": "int32",
        "state_dict": {k: v.clone() for k, v in rounded.state_dict().items()},
    }
    stored = load_quantized(_teacher(narrow_resnet), ckpt)
    with torch.no_grad():
        t_logits = teacher(images)
        kl_stored = _kl_reference(stored(images), t_logits)
        kl_unrounded = _kl_reference(plain(images), t_logits)
    assert out["kl_end"] == pytest.approx(kl_stored, rel=1e-5)
    assert before["kl_end"] == pytest.approx(kl_unrounded, rel=1e-5)
    assert abs(kl_stored - kl_unrounded) > 1e-3 * kl_stored  # the re-rounding moves the KL: the case this guards
    assert round_biases(plain) == out["int32_biases"]  # and it is all that separates the two runs
    a, b = rounded.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    from dfq.deploy.qdq import to_onnx
    from dfq.deploy.runtime import run, session

    images = _images()
    student = _student(narrow_resnet(), images, 8, 8)
    scales = [m.weight_scale.clone() for m in weight_quantized_layers(student)]
    finetune(
        student, narrow_resnet(), images, FinetuneConfig(epochs=2, batch_size=32, lr=0.05, act_lr=1e-3), progress=False
    )
    layers = weight_quantized_layers(student)
    assert all(_on_grid(m) for m in layers)
    assert all(torch.equal(m.weight_scale, s) for m, s in zip(layers, scales))  # the grid never moves
    assert all(
        fq.scale_param is None and "scale_param" not in dict(fq.named_parameters()) for fq in act_quantizers(student)
    )
    round_biases(student)
    ckpt = {
        "bits": "w8a8",
        "protocol": "zeroq",
        "weight_scheme": "symmetric",
        "weight_range": "minmax",
        "state_dict": student.state_dict(),
    }
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

    finetune(
        student,
        _teacher(narrow_resnet),
        images,
        FinetuneConfig(epochs=3, batch_size=16, lr=0.1, act_lr=0.1),
        on_epoch=last,
        progress=False,
    )
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
    with pytest.raises(ValueError, match=r"(?s)schedule.*'cosine' or 'constant'.*input_value='step'"):
        FinetuneConfig(schedule="step")  # the config names its field; the schema prefixes finetune.train.
    with pytest.raises(ValueError, match="no images"):
        finetune(
            _student(narrow_resnet(), _images()),
            narrow_resnet(),
            torch.empty(0, 1, 16, 16),
            FinetuneConfig(),
            progress=False,
        )
