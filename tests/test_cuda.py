"""The GPU path (DFQ_DEVICE=cuda): the same library calls on CUDA agree with the CPU.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

import pytest
import torch

from dfq.fp32.evaluate import evaluate
from dfq.fp32.models import build_model
from dfq.generation.bn_stats import BNInputStats, per_sample_stats
from dfq.generation.generators import DSGConfig, ZeroQConfig, dsg_batch, zeroq_batch
from dfq.generation.losses import dsg_loss, lse_weights, zeroq_loss
from dfq.quant.observers import MinMaxObserver, make_observer
from dfq.quant.prepare import QuantSpec, calibrate, prepare, weight_quantized_layers
from dfq.quant.reconstruction import ReconConfig, reconstruct

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """Compare float32 with float32: no TensorFloat-32 convolutions or matmuls on the GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-12)) < tol


def test_fused_moments_gradcheck_on_cuda():
    a = torch.randn(3, 4, 5, 5, dtype=torch.float64, device=CUDA, requires_grad=True)
    shift = torch.randn(4, dtype=torch.float64, device=CUDA)
    assert torch.autograd.gradcheck(lambda t: per_sample_stats(t, shift), (a,))


def test_bn_statistic_losses_and_gradients_match_the_cpu(narrow_resnet):
    """Forward + backward of the ZeroQ and DSG losses through the hooks, float32, CPU vs CUDA."""
    model = narrow_resnet()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for dev in ("cpu", CUDA):
        m = model.to(dev)
        with BNInputStats(m).to(dev) as stats:
            xd = x.to(dev).detach().requires_grad_(True)
            m(xd)
            w = lse_weights(len(x), len(stats), 2.0).to(dev)
            z = zeroq_loss(xd, stats)
            d = dsg_loss(xd, stats, None, w)
            (z + d).backward()
            results[dev] = (z.detach(), d.detach(), xd.grad)
    for c, g in zip(results["cpu"], results[CUDA]):
        assert _close(g, c, 1e-4)


def test_generation_runs_on_cuda_and_returns_cpu_images_like_the_cpu_run(narrow_resnet):
    shape = (6, 1, 16, 16)
    xc, ic = zeroq_batch(narrow_resnet(), shape, 3, ZeroQConfig(iterations=5), device="cpu")
    xg, ig = zeroq_batch(
        narrow_resnet().to(CUDA), shape, 3, ZeroQConfig(iterations=5), device=CUDA
    )  # the stage moves the model
    assert xg.device.type == "cpu" and ig["loss_end"] < ig["loss_start"]
    assert abs(ig["loss_start"] - ic["loss_start"]) < 1e-4 * abs(ic["loss_start"])
    # Adam's first steps are nearly sign(gradient): compare the loss reached, not pixel by pixel
    assert abs(ig["loss_end"] - ic["loss_end"]) < 1e-2 * abs(ic["loss_end"])
    x, info, margins = dsg_batch(narrow_resnet().to(CUDA), shape, 3, DSGConfig(iterations=5), device=CUDA)
    assert x.device.type == "cpu" and info["loss_end"] < info["loss_start"]
    assert all(m.device.type == "cpu" for m in margins["mean"] + margins["std"])


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_calibrated_fake_quant_model_matches_the_cpu(protocol, narrow_resnet):
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = {}
    for dev in ("cpu", CUDA):
        gm = prepare(narrow_resnet(), 4, 4, lambda: make_observer("mse"), QuantSpec(protocol))
        calibrate(gm, [x[:8], x[8:]], dev)
        with torch.no_grad():
            out[dev] = gm(x.to(dev))
    # a value sitting on a rounding boundary may round the other way on another device: compare loosely
    assert _close(out[CUDA], out["cpu"], 2e-2)


def test_evaluate_on_cuda_with_a_dataloader(narrow_resnet):
    model = narrow_resnet()
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    cpu, gpu = evaluate(model, loader, "cpu"), evaluate(model, loader, CUDA)
    assert cpu["top1"] == gpu["top1"] and cpu["top5"] == gpu["top5"]


def test_reconstruction_on_cuda_puts_weights_on_grid(narrow_resnet):
    data = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    gm = prepare(narrow_resnet(), 3, 4, MinMaxObserver, QuantSpec(protocol="brecq"))
    out = reconstruct(gm, data, "qdrop", ReconConfig(iterations=50, batch_size=16), CUDA)
    assert all(torch.isfinite(torch.tensor(u["error_after"])) for u in out["units"])
    for layer in weight_quantized_layers(gm):
        s = layer.weight_scale.view(-1, *([1] * (layer.weight.dim() - 1)))
        q = layer.weight.detach() / s + layer.weight_zero_point.view_as(s).float()
        assert layer.weight.device.type == "cuda"
        assert torch.all((q - q.round()).abs() < 1e-3)


def test_torchvision_resnet18_generation_step_on_cuda():
    """One ImageNet-size step: 224 px, hooks on all 20 BN layers, gradient to the input only."""
    model = build_model("resnet18", 1000).eval().to(CUDA)
    with BNInputStats(model).to(CUDA) as stats:
        x = torch.randn(4, 3, 224, 224, device=CUDA, requires_grad=True)
        model(x)
        zeroq_loss(x, stats).backward()
    assert len(stats) == 20 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_statistics_of_a_channels_last_activation_match_contiguous_ones():
    a = torch.randn(4, 8, 14, 14, device=CUDA, dtype=torch.float64)
    shift = torch.randn(8, device=CUDA, dtype=torch.float64)
    grads = []
    for t in (a.clone(), a.contiguous(memory_format=torch.channels_last)):
        t.requires_grad_(True)
        m, s = per_sample_stats(t, shift)
        (m.square().sum() + s.sum()).backward()
        grads.append((m.detach(), s.detach(), t.grad))
    for u, v in zip(*grads):
        assert torch.allclose(u, v)
    assert grads[1][2].is_contiguous(memory_format=torch.channels_last)


def test_genie_batch_on_cuda_starts_where_the_cpu_starts_and_lowers_the_loss(narrow_resnet):
    """Genie-D on CUDA: the same seeded generator, latents and swing shifts as on the CPU (so the first loss
    agrees), a finite batch of the right shape, reproducible on the device, the loss going down, and
    genie_dsg's margins on the CPU afterwards."""
    from dfq.generation.genie import GenieConfig, GenieDSGConfig, genie_batch

    cfg = GenieConfig(iterations=20, latent_dim=16, width=16)
    shape = (8, 1, 16, 16)
    cpu = genie_batch(narrow_resnet(), shape, 3, cfg, "cpu")
    gpu = genie_batch(narrow_resnet().to(CUDA), shape, 3, cfg, CUDA)
    again = genie_batch(narrow_resnet().to(CUDA), shape, 3, cfg, CUDA)
    assert gpu[0].device.type == "cpu" and gpu[0].shape == shape and torch.isfinite(gpu[0]).all()
    assert gpu[1]["loss_start"] == pytest.approx(cpu[1]["loss_start"], rel=1e-4)
    assert gpu[1]["loss_end"] < gpu[1]["loss_start"]
    assert torch.allclose(gpu[0], again[0], atol=1e-4)
    _, _, margins = genie_batch(narrow_resnet().to(CUDA), shape, 3, GenieDSGConfig(iterations=2, width=16), CUDA)
    assert all(m.device.type == "cpu" for m in margins["mean"])
