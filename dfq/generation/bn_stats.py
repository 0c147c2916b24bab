"""BatchNorm statistics: the INPUT of every BN layer recorded as the layer runs, and per-sample channel statistics.

Recording at the BN layers themselves (forward pre-hooks, or on the CPU the layer's own forward for the
context's duration) is robust on models whose module registration order differs from execution order, which
pairing convolutions with BNs by position is not.
For an input a (B, C, H, W): m[b, c] = mean_hw a[b, c], s[b, c] = sqrt(var_hw a[b, c] + 1e-6)
(population variance over H x W, the estimator BN itself normalises with).
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.tracing import bn_layers

STD_EPS = 1e-6


def _centred_moments(a: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) mean and L2 norm over H x W of a - shift for a (B, C, H, W) CPU activation and a (C, 1) shift: one
    subtraction and two reductions (the CPU moments of both Functions below)."""
    y = a.flatten(2) - shift
    return y.mean(-1), torch.linalg.vector_norm(y, dim=-1)


def _moment_coefficients(g1, g2, n, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, k) of the moments' gradient d/da [g1 . E[y] + g2 . E[y^2]] = c + k * a for y = a - shift over n values:
    k = 2 g2 / n, c = g1 / n - k * shift."""
    k = (2.0 / n) * g2
    return g1 / n - k * shift, k


class _ShiftedMoments(torch.autograd.Function):
    """Raw moments E[y], E[y^2] over H x W of y_i = a_i - shift_i for several activations a_i at once.

    forward(shift (sum C_i,), n (sum C_i,) = H_i W_i per channel, a_1 (B, C_1, H_1, W_1), a_2, ...)
    -> m1, m2, both (B, sum C_i). Forward per activation: on the CPU one subtraction and two reductions
    (the shift keeps E[y^2] - E[y]^2 well conditioned), on a GPU one Welford ``var_mean`` pass (2x
    slower than that on the CPU), shifted afterwards over all layers at once. Nothing is saved but the
    activations (which autograd holds anyway). Backward: d/da_i [g1 . E[y] + g2 . E[y^2]] = c + k * a_i
    with k = 2 g2 / N and c = g1 / N - k * shift computed once per call (for all layers on a GPU,
    where BNInputStats makes one call), then ONE broadcast addcmul per activation: the fewest kernels
    and full-size temporaries per BN layer (on a GPU, kernel launches, not arithmetic, bound generation
    at moderate batch sizes). Any memory format: the GPU path reduces over dims (2, 3) and the
    gradient takes the activation's layout.
    """

    @staticmethod
    def forward(ctx, shift: torch.Tensor, n: torch.Tensor, *acts: torch.Tensor):
        sizes = [a.shape[1] for a in acts]
        ctx.save_for_backward(shift, n, *acts)
        if acts[0].is_cuda:
            var_mean = [torch.var_mean(a, (2, 3), correction=0) for a in acts]
            m1 = torch.cat([m for _, m in var_mean], 1) - shift
            return m1, torch.addcmul(torch.cat([v for v, _ in var_mean], 1), m1, m1)
        m1, norms = zip(*(_centred_moments(a, s) for a, s in zip(acts, shift.view(-1, 1).split(sizes))))
        return torch.cat(m1, 1), torch.cat(norms, 1).square_() / n

    @staticmethod
    def backward(ctx, g1: torch.Tensor, g2: torch.Tensor):
        shift, n, *acts = ctx.saved_tensors
        c, k = _moment_coefficients(g1, g2, n, shift)
        sizes = [a.shape[1] for a in acts]
        if acts[0].is_cuda:  # 4-D: any memory format, no copy
            c, k = c[:, :, None, None].split(sizes, 1), k[:, :, None, None].split(sizes, 1)
            return None, None, *(torch.addcmul(ci, a, ki) for a, ci, ki in zip(acts, c, k))
        # CPU: over (B, C, H*W) rows, 1.4x faster there than the 4-D broadcast
        c, k = c.unsqueeze(-1).split(sizes, 1), k.unsqueeze(-1).split(sizes, 1)
        return None, None, *(torch.addcmul(ci, a.flatten(2), ki).view_as(a) for a, ci, ki in zip(acts, c, k))


class _BatchNormMoments(torch.autograd.Function):
    """An eval-mode BatchNorm2d layer and the raw moments of its input in one autograd node (the CPU path of
    ``BNInputStats``): forward(a, shift (C,), n (C,), running_mean, running_var, weight, bias, eps, invstd)
    -> (y, m1, m2) with y torch's own ``batch_norm`` of ``a`` and (m1, m2) ``_ShiftedMoments``' of ``a`` alone,
    op for op. Backward: the moments' gradient c + k * a (as ``_ShiftedMoments.backward``) plus BN's input
    gradient (dy * invstd) * weight, ``invstd`` = 1 / sqrt(running_var + eps) in double then float: bitwise what
    torch's batch-norm backward gives in eval mode, whose CPU kernel takes 4-5x a product here (it also
    reduces over dy), and the same sum autograd forms from two nodes (addition commutes)."""

    @staticmethod
    def forward(ctx, a, shift, n, mean, var, weight, bias, eps, invstd):
        y = torch.nn.functional.batch_norm(a, mean, var, weight, bias, False, 0.0, eps)
        m1, norm = _centred_moments(a, shift.view(-1, 1))
        m2 = norm.square_() / n
        ctx.save_for_backward(a, shift, n, invstd, weight)
        return y, m1, m2

    @staticmethod
    def backward(ctx, gy, g1, g2):
        a, shift, n, invstd, weight = ctx.saved_tensors
        c, k = _moment_coefficients(g1, g2, n, shift)
        grad = torch.addcmul(c.unsqueeze(-1), a.flatten(2), k.unsqueeze(-1)).view_as(a)
        scaled = gy * invstd.view(-1, 1, 1)
        if weight is not None:
            scaled.mul_(weight.view(-1, 1, 1))  # not addcmul_: its fused multiply-add rounds differently
        return grad.add_(scaled), *([None] * 8)


def channel_counts(activations: list[torch.Tensor]) -> torch.Tensor:
    """(sum C_i,) the number of spatial positions H_i W_i, repeated for each channel of each activation."""
    a0 = activations[0]
    return torch.cat(
        [torch.full((a.shape[1],), float(a.shape[2:].numel()), dtype=a0.dtype, device=a0.device) for a in activations]
    )


def shifted_moments(
    activations: list[torch.Tensor], shift: torch.Tensor, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, sum C_i) raw moments E[y], E[y^2] over H x W of y_i = a_i - shift_i, every (B, C_i, H_i, W_i)
    activation a_i at once (``shift``: (sum C_i,), the per-channel shifts side by side; ``counts``:
    ``channel_counts(activations)``, passed in by callers that cache it)."""
    counts = channel_counts(activations) if counts is None else counts
    return _ShiftedMoments.apply(shift.to(activations[0].dtype), counts, *activations)


def moments_to_stats(m1: torch.Tensor, m2: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std from shifted raw moments (any shape that broadcasts with ``shift``)."""
    var = (m2 - m1 * m1).clamp_min(0)
    return m1 + shift, torch.sqrt(var + STD_EPS)


def per_sample_stats(a: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over the spatial dimensions of a (B, C, H, W) tensor.

    Computed from the raw moments E[y], E[y^2] of y = a - shift by a fused autograd Function (cheap
    forward and one-op backward; see ``_ShiftedMoments``). ``shift`` (per channel, e.g. the BN running
    mean) keeps E[y^2] - E[y]^2 well conditioned.
    """
    if shift is None:
        shift = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    return moments_to_stats(*shifted_moments([a], shift), shift)


class BNInputStats:
    """Records per-sample statistics of every BatchNorm2d input during a forward pass.

    Use as a context manager; after ``model(x)``, ``concatenated()`` is (m, s), both (B, sum C_i): the
    per-sample channel means and stds of all layers side by side (what the losses use), and ``means[i]``
    / ``stds[i]`` are layer i's (B, C_i) columns of them, in ``model.modules()`` order;
    ``running_mean[i]`` / ``running_std[i]`` are the layer's targets mu_i and sigma_i = sqrt(running_var_i
    + bn.eps). On a GPU the hooks only record the BN inputs (tensors autograd keeps for the backward
    pass anyway) and the moments of all layers are computed in ONE Function call on first use, so each
    layer adds one kernel forward and two backward (launches bound a GPU iteration). On the CPU each
    layer's moments are computed at once, while the activation is still in cache, and their
    gradient is formed when the backward pass reaches that layer (deferring both was 1.3x slower on
    CIFAR ResNet-20, 2 cores); only the cheap rest runs once over all layers' channels. There, inside the
    context, a frozen eval-mode layer's forward is replaced (an instance attribute, removed on exit) by one
    autograd node for BN and its input's moments (``_BatchNormMoments``: the same bits, and its backward spares
    torch's batch-norm backward kernel, 4-5x a product); other layers, and every layer on a GPU, are
    recorded by forward pre-hooks.
    """

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError(
                "the model has no BatchNorm2d layers: BN-statistic sources (zeroq, dsg) need them; "
                "use the gaussian or real calibration source instead"
            )
        self.running_mean = [bn.running_mean.detach().clone() for bn in self.layers]
        self.running_std = [torch.sqrt(bn.running_var.detach() + bn.eps) for bn in self.layers]
        # per layer: the BN input (GPU, deferred) or its (m1, m2) raw moments (CPU, computed in the hook)
        self._recorded: list = [None] * len(self.layers)
        self._hw: list[int] = [0] * len(self.layers)  # H_i * W_i of each layer's last input
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles: list = []
        self._patched: list = []
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.layers)

    def _record(self, i: int, a: torch.Tensor) -> None:
        self._hw[i] = a.shape[2:].numel()
        self._recorded[i] = a if a.is_cuda else shifted_moments([a], self.running_mean[i], self._counts([a]))
        self._stats = None

    def _make_hook(self, i: int):
        def hook(module, inputs):
            self._record(i, inputs[0])

        return hook

    def _make_forward(self, i: int, bn: nn.BatchNorm2d):
        """Layer i's forward while recording on the CPU: BN and its input's moments in one autograd node
        (``_BatchNormMoments``) when the layer is a frozen eval-mode BN with running statistics on a float32 input;
        otherwise the hook's recording and the layer's own forward."""
        forward = type(bn).forward.__get__(bn)

        def fused(a: torch.Tensor) -> torch.Tensor:
            params = [p for p in (bn.weight, bn.bias) if p is not None]
            if (
                a.device.type != "cpu"
                or a.dtype != torch.float32  # the bitwise match with torch's kernels is float32's
                or bn.training
                or bn.running_var is None
                or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
            ):
                if bn.training:  # may update the running statistics in place (no version bump): drop the invstd
                    self._cache.pop(("invstd", i), None)
                self._record(i, a)
                return forward(a)
            self._hw[i] = a.shape[2:].numel()
            y, m1, m2 = _BatchNormMoments.apply(
                a, self.running_mean[i], self._counts([a]), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                bn.eps, self._invstd(i, bn),
            )  # fmt: skip
            self._recorded[i], self._stats = (m1, m2), None
            return y

        return fused

    def _invstd(self, i: int, bn: nn.BatchNorm2d) -> torch.Tensor:
        """1 / sqrt(running_var + eps) of layer i as torch's batch-norm kernels form it (in double, then float),
        kept until the running variance changes (an in-place edit bumps its version; a training-mode pass, whose
        kernel updates it without, drops the entry)."""
        key, version = ("invstd", i), bn.running_var._version
        hit = self._cache.get(key)
        if hit is None or hit[0] is not bn.running_var or hit[1] != version:
            hit = self._cache[key] = (
                bn.running_var,
                version,
                (1 / torch.sqrt(bn.running_var.double() + bn.eps)).float(),
            )
        return hit[2]

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s): per-sample channel means and stds of every layer, (B, sum C_i), from the last forward."""
        if self._stats is None:
            self.check_complete()
            shift = self.per_channel(self.running_mean)
            rec = self._recorded
            if isinstance(rec[0], torch.Tensor):
                m1, m2 = shifted_moments(rec, shift, self._counts(rec))
            else:
                m1, m2 = torch.cat([r[0] for r in rec], 1), torch.cat([r[1] for r in rec], 1)
            self._stats = moments_to_stats(m1, m2, shift)
            self._recorded = [None] * len(self.layers)  # inputs are held by the graph now, or freed
        return self._stats

    def _counts(self, activations: list[torch.Tensor]) -> torch.Tensor:
        key = ("counts", *(a.shape[1:] for a in activations))
        if key not in self._cache:
            self._cache[key] = channel_counts(activations)
        return self._cache[key]

    def _split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.split([len(mu) for mu in self.running_mean], 1))

    def split_layers(self, t: torch.Tensor) -> list[torch.Tensor]:
        """A (B, sum C_i) tensor cut into its layers' (B, C_i) columns."""
        return self._split(t)

    def spatial_counts(self) -> torch.Tensor:
        """(sum C_i,) H_i W_i of each layer's last input, one per channel (for unbiased variances)."""
        key = ("hw", tuple(self._hw))
        if key not in self._cache:
            mu = self.running_mean
            self._cache[key] = torch.cat([torch.full_like(m, float(n)) for n, m in zip(self._hw, mu)])
        return self._cache[key]

    @property
    def means(self) -> list[torch.Tensor]:
        return self._split(self.concatenated()[0])

    @property
    def stds(self) -> list[torch.Tensor]:
        return self._split(self.concatenated()[1])

    @staticmethod
    def _fusable(bn: nn.BatchNorm2d) -> bool:
        """Whether layer ``bn`` runs torch's own BatchNorm2d forward, which ``_make_forward`` may stand in for."""
        return type(bn).forward is nn.BatchNorm2d.forward and "forward" not in vars(bn)

    def __enter__(self) -> "BNInputStats":
        self._handles, self._patched = [], []
        cpu = self.running_mean[0].device.type == "cpu"
        for i, bn in enumerate(self.layers):
            if cpu and self._fusable(bn):
                bn.forward = self._make_forward(i, bn)  # an instance attribute: removed on exit
                self._patched.append(bn)
            else:
                self._handles.append(bn.register_forward_pre_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for bn in self._patched:
            del bn.forward
        self._handles, self._patched = [], []

    def to(self, device) -> "BNInputStats":
        self.running_mean = [t.to(device) for t in self.running_mean]
        self.running_std = [t.to(device) for t in self.running_std]
        self._cache, self._stats = {}, None
        return self

    def per_channel(self, values: list[torch.Tensor]) -> torch.Tensor:
        """One value per channel of every layer, concatenated to (sum C_i,): entry i of ``values`` is a
        scalar (one per layer, broadcast over its channels) or a (C_i,) tensor. Cached per list, so
        per-iteration losses pay for it once."""
        hit = self._cache.get(id(values))
        if hit is None or hit[0] is not values:
            flat = torch.cat(
                [
                    torch.as_tensor(v, dtype=mu.dtype, device=mu.device).expand(mu.shape)
                    for v, mu in zip(values, self.running_mean)
                ]
            )
            hit = self._cache[id(values)] = (values, flat)
        return hit[1]

    def layer_sum(self) -> torch.Tensor:
        """(sum C_i, L) 0/1 matrix: ``per_channel_matrix @ layer_sum()`` sums each layer's channels,
        one matmul for all layers instead of a Python loop of reductions."""
        if "layer_sum" not in self._cache:
            sizes = [len(mu) for mu in self.running_mean]
            seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            self._cache["layer_sum"] = torch.nn.functional.one_hot(seg, len(sizes)).to(self.running_mean[0])
        return self._cache["layer_sum"]

    def check_complete(self) -> None:
        if self._stats is not None:
            return
        missing = [i for i, r in enumerate(self._recorded) if r is None]
        if missing:
            raise RuntimeError(f"BatchNorm layers {missing} were not executed in the forward pass")
