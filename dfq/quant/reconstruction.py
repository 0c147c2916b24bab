"""Output reconstruction on calibration data: AdaRound, BRECQ and QDrop on a prepared fake-quant model.

Each *unit* is optimised on its own, in execution order, from cached tensors: its input x_hat as the
already-quantized model produces it, and as target y the output of the same unit in an untouched FP32
copy of the model, run on that copy's own input (BRECQ's asymmetric objective). The copy is made before
any unit is rounded, so no target sees earlier units' rounded weights or quantized activations; QDrop's
dropped elements keep the quantized model's own unquantized values. The loss is
||unit(x_hat) - y||^2 (summed over channels, averaged over the rest) plus, for the rounding variables,
lambda * sum(1 - |2 h(V) - 1|^beta) with beta annealed from beta_start to beta_end after a warm-up
without the regulariser (AdaRound, Nagel et al. 2020).

- ``adaround``: units are single conv/linear layers; weights with full-precision activations, then the
  activation ranges are calibrated on the reconstructed model.
- ``brecq`` (Li et al. 2021): units are residual blocks (plus the layers outside any block); weights
  first with full-precision activations, calibration, then each unit's activation step sizes learned
  LSQ-style with the rounding fixed.
- ``qdrop`` (Wei et al. 2022): calibration first, then per block the rounding and the activation step
  sizes learned together while each activation element skips quantization with probability p.
- ``genie`` (Genie-M, Jeon et al. 2023; genie_m.py): ``qdrop`` with each weight channel's step size learned
  too (the base integers frozen), cosine-annealed step-size lrs, unit inputs mixed element-wise from the
  quantized and the FP32 model, regulariser weight 1 and Genie's first/second/last-layer bits, each a knob
  of ``GenieMConfig`` (all off: exactly ``qdrop``).

Every optimisation step draws exactly ``batch_size`` cached rows (with replacement). The official Genie code
reshapes its permutation of the N cached rows into 32 rows, so its minibatch is N/32 rows (batch 32 only for
N = 1024); we keep ``batch_size`` whatever N is.
"""

from __future__ import annotations

import copy
import time

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import fx, nn
from tqdm import tqdm

from dfq.quant.fake_quant import AdaRoundWeight
from dfq.quant.genie_m import GenieMConfig, GenieWeight, cosine_factor, mix_inputs
from dfq.quant.prepare import QUANT_TYPES, act_quantizers, calibrate, set_quant_state

ROUNDINGS = ("nearest", "adaround", "brecq", "qdrop", "genie")


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class ReconConfig:
    """AdaRound / BRECQ / QDrop / Genie-M reconstruction (quantize.reconstruction; read when rounding is not
    nearest). ``genie`` is read only when rounding is genie; there its reg_weight replaces ``reg_weight``."""

    iterations: int = Field(2000, gt=0)  # rounding optimisation steps per unit (papers: 10k-20k)
    act_iterations: int = Field(2000, gt=0)  # brecq: LSQ step-size steps per unit
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)  # Adam on the rounding variables V
    act_lr: float = Field(4e-5, gt=0)  # Adam on the activation step sizes
    reg_weight: float = Field(0.01, ge=0)  # lambda
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warmup: float = Field(0.2, ge=0, lt=1)  # fraction of iterations without the regulariser
    drop_prob: float = Field(0.5, ge=0, le=1)  # qdrop: probability of keeping an activation at full precision
    seed: int = Field(0, ge=0)
    genie: GenieMConfig = GenieMConfig()


class _Stop(Exception):
    """Raised from a hook once the tensor of interest is captured: the rest of the forward is skipped."""


@torch.no_grad()
def capture(gm: nn.Module, name: str, data: torch.Tensor, output: bool, batch: int = 128) -> torch.Tensor:
    """The input (or output) of submodule ``name`` for every calibration image, in the current quant state.

    Args:
        gm: the model run on ``data`` (in its current quant state).
        name: qualified name of the submodule (``gm.get_submodule(name)``).
        data: calibration images (N, C, H, W), on the model's device.
        output: True: the submodule's output; False: its (first) input.
        batch: images per forward pass; the tensors of every batch are concatenated.
    """
    mod, got = gm.get_submodule(name), []

    def keep(t):
        got.append(t.detach())
        raise _Stop

    h = (
        mod.register_forward_hook(lambda m, a, out: keep(out))
        if output
        else mod.register_forward_pre_hook(lambda m, a: keep(a[0]))
    )
    try:
        for i in range(0, len(data), batch):
            try:
                gm(data[i : i + batch])
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(got)


def recon_units(gm: fx.GraphModule, layerwise: bool) -> list[str]:
    """Unit names in execution order: every weight layer (layerwise), or every block of the prepared
    model's top-level graph plus the weight layers outside blocks."""
    units = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, fx.GraphModule) and any(isinstance(m, QUANT_TYPES) for m in mod.modules()):
            if layerwise:
                units += [
                    f"{node.target}.{n.target}"
                    for n in mod.graph.nodes
                    if n.op == "call_module" and isinstance(mod.get_submodule(n.target), QUANT_TYPES)
                ]
            else:
                units.append(node.target)
        elif isinstance(mod, QUANT_TYPES):
            units.append(node.target)
    return units


def rec_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().sum(1).mean()


@torch.no_grad()
def unit_error(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    """Mean reconstruction error of ``unit`` over all cached inputs."""
    total = sum(
        float(rec_error(unit(x[i : i + batch]), y[i : i + batch])) * len(x[i : i + batch])
        for i in range(0, len(x), batch)
    )
    return total / len(x)


def beta_at(t: int, cfg: ReconConfig) -> float | None:
    """Annealed beta at step t, None during the warm-up (no regulariser)."""
    warm = int(cfg.warmup * cfg.iterations)
    if t < warm:
        return None
    rel = (t - warm) / max(1, cfg.iterations - warm)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def _optimizer(layers: list, fqs: list, cfg: ReconConfig, genie: GenieMConfig | None, iterations: int):
    """Attach the rounding modules to ``layers`` (Genie's, with a learnable step, when ``genie`` has weight_lr > 0)
    and build (optimiser, scheduler): one Adam with the groups V (cfg.lr, constant), the step sizes of ``fqs``
    (cfg.act_lr) and the weight-step ratios (genie.weight_lr); with genie.cosine the two step-size groups are
    cosine-annealed to 0 over ``iterations`` (scheduler None otherwise). (None, None): nothing to learn."""
    learn_step = genie is not None and genie.weight_lr > 0
    for m in layers:
        cls = GenieWeight if learn_step else AdaRoundWeight
        m.adaround = cls(m.weight, m.weight_scale, m.weight_zero_point, m.weight_bits).to(m.weight.device)
    groups, annealed = [], []
    if layers:
        groups.append({"params": [m.adaround.v for m in layers], "lr": cfg.lr})
        annealed.append(False)
    if fqs:
        groups.append({"params": [fq.learn_scale() for fq in fqs], "lr": cfg.act_lr})
        annealed.append(True)
    if learn_step and layers:
        groups.append({"params": [m.adaround.ratio for m in layers], "lr": genie.weight_lr})
        annealed.append(True)
    if not groups:
        return None, None
    opt = torch.optim.Adam(groups)
    if genie is None or not genie.cosine:
        return opt, None
    factors = [(lambda t: cosine_factor(t, iterations)) if a else (lambda t: 1.0) for a in annealed]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factors)


@torch.no_grad()
def _finish(layers: list, fqs: list) -> None:
    """Hard rounding written into each layer's weight (and a learned step into its ``weight_scale``, which the
    checkpoint's state dict carries); activation step sizes fixed, QDrop off."""
    for m in layers:
        m.adaround.hard = True
        m.weight.copy_(m.adaround())
        if isinstance(m.adaround, GenieWeight):
            m.weight_scale.copy_(m.adaround.step().reshape(m.weight_scale.shape))
        del m.adaround
    for fq in fqs:
        fq.fix_scale()
        fq.drop_prob = 0.0


def optimize_unit(
    unit: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ReconConfig,
    learn_weights: bool,
    learn_acts: bool,
    drop_prob: float = 0.0,
    desc: str = "",
    x_fp: torch.Tensor | None = None,
    genie: GenieMConfig | None = None,
) -> dict:
    """Reconstruct one unit from cached (x, y); the rounding is fixed to {0, 1} and written into the
    layers' weights at the end (every weight then sits on its quantization grid).

    Args:
        unit: the submodule reconstructed (one layer or one block of the prepared model), changed in place.
        x: the unit's cached inputs as the quantized model produces them, (N, ...).
        y: the cached targets: the FP32 copy's unit outputs, (N, ...).
        cfg: iterations, act_iterations, batch_size, lr, act_lr, reg_weight, beta schedule, warmup and seed.
        learn_weights: learn the AdaRound rounding of the unit's weight layers (cfg.iterations steps); False: activation
            step sizes only (cfg.act_iterations steps).
        learn_acts: learn the activation quantizers' step sizes LSQ-style (lr cfg.act_lr); fixed at the end.
        drop_prob: QDrop: probability each activation element skips quantization while optimising (0: never); reset to 0
            at the end.
        desc: progress-bar label.
        x_fp: Genie-M: the FP32 copy's unit inputs, (N, ...), mixed element-wise into x's rows (an element from x with
            probability genie.input_prob); None: x alone.
        genie: Genie-M's knobs (GenieMConfig): learned weight steps, cosine step-size lrs, its regulariser weight
            (instead of cfg.reg_weight); None: AdaRound's rounding on fixed steps.
    """
    layers = [m for m in unit.modules() if isinstance(m, QUANT_TYPES)] if learn_weights else []
    fqs = act_quantizers(unit)
    before = unit_error(unit, x, y)
    iterations = cfg.iterations if learn_weights else cfg.act_iterations
    opt, sched = _optimizer(layers, fqs if learn_acts else [], cfg, genie, iterations)
    for fq in fqs:
        fq.drop_prob = drop_prob
    reg_weight = cfg.reg_weight if genie is None else genie.reg_weight
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(iterations if opt else 0), desc=desc, leave=False, mininterval=1.0)
    for t in bar:  # exactly batch_size rows a step (the official Genie code's minibatch is N/32 rows)
        idx = torch.randint(len(x), (min(cfg.batch_size, len(x)),), generator=gen).to(x.device)
        xb = x.index_select(0, idx)  # x[idx]'s bytes; advanced indexing is 5-8x slower on the CPU
        if x_fp is not None:
            xb = mix_inputs(xb, x_fp.index_select(0, idx), genie.input_prob)
        rec = rec_error(unit(xb), y.index_select(0, idx))
        loss = rec
        beta = beta_at(t, cfg) if layers else None
        if beta is not None:
            loss = rec + reg_weight * sum(m.adaround.regularizer(beta) for m in layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if t % 100 == 0:
            bar.set_postfix(rec=f"{rec.item():.4g}", loss=f"{loss.item():.4g}")
    _finish(layers, fqs)
    return {"error_before": before, "error_after": unit_error(unit, x, y)}


def _check_edges(gm: nn.Module, cfg: ReconConfig) -> None:
    """Rounding genie: the model must be prepared with the first/second/last-layer rule genie.bit_rule asks for."""
    have, want = getattr(gm, "edges", "protocol"), "genie" if cfg.genie.bit_rule else "protocol"
    if have != want:
        raise ValueError(
            f"rounding genie with genie.bit_rule={cfg.genie.bit_rule} needs a model prepared with "
            f"QuantSpec(edges={want!r}) (dfq.quant.genie_m.genie_spec); this one has edges={have!r}"
        )


def _weights_unit(gm: fx.GraphModule, fp32: nn.Module, name: str, data: torch.Tensor, method: str, cfg) -> dict:
    """Cache unit ``name``'s inputs and FP32 targets, then learn its rounding (and, qdrop/genie, its activation
    step sizes with QDrop); the unit's log entry."""
    acts = method in ("qdrop", "genie")
    genie = cfg.genie if method == "genie" else None
    set_quant_state(gm, weights=True, acts=acts)
    x = capture(gm, name, data, output=False)
    x_fp = capture(fp32, name, data, output=False) if genie is not None and genie.input_prob < 1 else None
    y = capture(fp32, name, data, output=True)
    r = optimize_unit(
        gm.get_submodule(name),
        x,
        y,
        cfg,
        learn_weights=True,
        learn_acts=acts,
        drop_prob=cfg.drop_prob if acts else 0.0,
        desc=f"{method} {name}",
        x_fp=x_fp,
        genie=genie,
    )
    print(f"  {method} {name}: error {r['error_before']:.4g} (nearest) -> {r['error_after']:.4g}", flush=True)
    return {"unit": name, **r}


def reconstruct(gm: fx.GraphModule, data: torch.Tensor, method: str, cfg: ReconConfig, device="cpu") -> dict:
    """Reconstruct a prepared model on calibration images ``data`` (N, C, H, W); activation ranges end
    calibrated. Returns per-unit errors (before = nearest rounding) and wall times.

    Args:
        gm: the prepared fake-quant model, changed in place (moved to ``device``, weights rounded, activations
            calibrated). Rounding genie: prepared with ``genie_spec``'s QuantSpec (Genie's bits iff genie.bit_rule).
        data: calibration images (N, C, H, W).
        method: adaround | brecq | qdrop | genie (anything else, nearest included, raises ValueError).
        cfg: the reconstruction settings (ReconConfig).
        device: where the model, the data and the cached tensors live.
    """
    if method not in ROUNDINGS[1:]:
        raise ValueError(f"quantize.rounding={method!r} is unknown; allowed: {', '.join(ROUNDINGS)}")
    if method == "genie":
        _check_edges(gm, cfg)
    gm.eval().to(device)
    data = data.to(device)
    for p in gm.parameters():
        p.requires_grad_(False)
    fp32 = copy.deepcopy(gm)  # untouched FP32 model (weights and activations unquantized): every target
    set_quant_state(fp32, weights=False, acts=False)
    torch.manual_seed(cfg.seed)  # QDrop's random drop masks (and Genie's input mixing)
    units = recon_units(gm, layerwise=method == "adaround")
    t0 = time.perf_counter()
    joint = method in ("qdrop", "genie")  # activation ranges calibrated first, then learned with the rounding
    if joint:
        calibrate(gm, data.split(128), device, desc=f"calibrate (before {method})")
    log = [_weights_unit(gm, fp32, name, data, method, cfg) for name in units]
    set_quant_state(gm, weights=True, acts=True)
    if not joint:
        calibrate(gm, data.split(128), device, desc="calibrate activations")
    t_weights = time.perf_counter() - t0
    if method == "brecq":
        for entry in log:
            name = entry["unit"]
            x = capture(gm, name, data, output=False)
            y = capture(fp32, name, data, output=True)
            r = optimize_unit(
                gm.get_submodule(name), x, y, cfg, learn_weights=False, learn_acts=True, desc=f"brecq act {name}"
            )
            entry.update(act_error_before=r["error_before"], act_error_after=r["error_after"])
            print(f"  brecq act {name}: error {r['error_before']:.4g} -> {r['error_after']:.4g}", flush=True)
    return {"units": log, "seconds_weights": t_weights, "seconds_total": time.perf_counter() - t0}
