"""Mixed precision under a size budget: per-layer weight sensitivity and its exact allocation (ZeroQ,
Cai et al. 2020, Sec. 3.3: sensitivity on synthetic data, Pareto frontier of size vs sensitivity).

Sensitivity of weight layer l at b bits: KL(softmax(FP32 logits) || softmax(logits of the model with
ONLY layer l's weights fake-quantized at b bits)), averaged over the calibration images; activations
and every other layer stay at full precision. The model is prepared once under the pipeline's
protocol, weight scheme and weight range (so with the brecq protocol BN is folded first and the grid
is the one calibration uses), then each layer is re-gridded at each candidate bit-width and switched
on alone. The layers the protocol fixes at 8 bits (brecq: first and last) are measured at nothing and
not allocatable.

Allocation: choose b_l per allocatable layer to minimise sum_l S[l][b_l] subject to
sum_l n_l b_l <= budget (n_l: the layer's weight count). The objective and the constraint are both
additive, so a partial choice over the first layers that is no smaller and no cheaper than another
(dominated) can never start an optimal choice: keeping, layer by layer, only the non-dominated
(size, summed sensitivity) pairs is exact, and the last pair is the whole Pareto frontier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dfq.cells import mixed_budget
from dfq.io import atomic_path
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import QUANT_TYPES, QuantSpec, prepare, set_quant_state


@torch.no_grad()
def measure(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    candidates: Sequence[int],
    spec: QuantSpec = QuantSpec(),
    device="cpu",
    desc: str = "sensitivity",
) -> dict:
    """Per weight layer (in module order): its name in the prepared model, weight count, fixed bits
    (8 for a layer the protocol fixes, else None) and mean KL per candidate bit-width (None if fixed).

    Args:
        model: the FP32 model (prepared here with 8-bit quantizers; only one layer's weights quantized at a time,
            activations never).
        batches: calibration image batches, each (N, C, H, W); at least one image in all.
        candidates: weight bit-widths tried at every layer the protocol does not fix.
        spec: protocol, weight scheme, weight range and bias rule the model is prepared with.
        device: where the model and batches run.
        desc: progress-bar label.
    """
    candidates = [int(b) for b in candidates]
    gm = prepare(model, 8, 8, MinMaxObserver, spec).eval().to(device)
    set_quant_state(gm, weights=False, acts=False)  # FP32 (BN folded under brecq: equal to 1e-5)
    batches = [x.to(device) for x in batches]
    n = sum(len(x) for x in batches)
    if n == 0:
        raise ValueError("sensitivity needs calibration images; got none")
    ref = [F.log_softmax(gm(x).double(), 1) for x in batches]
    fixed = set(gm.fixed_weight_layers)
    layers = [(name, m) for name, m in gm.named_modules() if isinstance(m, QUANT_TYPES)]
    rows = []
    for name, m in tqdm(layers, desc=desc, leave=False):
        row = {"name": name, "params": m.weight.numel(), "fixed_bits": 8 if name in fixed else None, "kl": None}
        if name not in fixed:
            row["kl"] = []
            for b in candidates:
                m.set_weight_bits(b)
                m.weight_quant = True
                total = sum(
                    F.kl_div(F.log_softmax(gm(x).double(), 1), r, reduction="sum", log_target=True).item()
                    for x, r in zip(batches, ref)
                )
                m.weight_quant = False
                row["kl"].append(max(total, 0.0) / n)  # KL >= 0; clamp float rounding of an exact grid
        rows.append(row)
    return {
        "candidates": candidates,
        "images": n,
        "protocol": spec.protocol,
        "weight_scheme": spec.weight_scheme,
        "weight_range": spec.weight_range,
        "layers": rows,
    }


@dataclass
class Frontier:
    """The non-dominated (size, cost) pairs of all per-layer choices: ``sizes`` (total weight bits of the
    allocatable layers) ascending, ``costs`` (summed sensitivity) strictly descending."""

    sizes: np.ndarray
    costs: np.ndarray
    candidates: tuple[int, ...]
    trail: list[tuple[np.ndarray, np.ndarray]]  # per layer: parent index, candidate index of each kept pair

    def allocation(self, i: int) -> list[int]:
        """Bits per layer of frontier point ``i``."""
        bits = []
        for parent, choice in reversed(self.trail):
            bits.append(self.candidates[int(choice[i])])
            i = int(parent[i])
        return bits[::-1]


def pareto_frontier(
    costs: Sequence[Sequence[float]], params: Sequence[int], candidates: Sequence[int], max_size: int | None = None
) -> Frontier:
    """Exact Pareto frontier of (sum n_l b_l, sum costs[l][b_l]) over every choice of b_l in
    ``candidates``; ``costs[l][j]`` is layer l's cost at ``candidates[j]``. With ``max_size``, pairs that
    cannot fit (their size plus the smallest size of the remaining layers exceeds it) are dropped as
    they are made: the frontier below ``max_size`` is unchanged."""
    bits = np.asarray(candidates, dtype=np.int64)
    if len(costs) != len(params) or any(len(c) != len(bits) for c in costs):
        raise ValueError("costs must have one row per layer and one value per candidate bit-width")
    rest = np.concatenate([np.cumsum(np.asarray(params, dtype=np.int64)[::-1] * bits.min())[::-1][1:], [0]])
    sizes, total, trail = np.zeros(1, dtype=np.int64), np.zeros(1), []
    for row, n, later in zip(costs, params, rest):
        s = (sizes[:, None] + int(n) * bits[None, :]).ravel()
        c = (total[:, None] + np.asarray(row, dtype=np.float64)[None, :]).ravel()
        parent, choice = np.divmod(np.arange(len(s)), len(bits))
        order = np.lexsort((c, s))  # by size, then cost
        s, c, parent, choice = s[order], c[order], parent[order], choice[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(c)[:-1]])
        keep = c < best_before  # strictly cheaper than every pair no larger than it
        if max_size is not None:
            keep &= s + later <= max_size
        sizes, total = s[keep], c[keep]
        trail.append((parent[keep], choice[keep]))
    return Frontier(sizes, total, tuple(int(b) for b in bits), trail)


def budget_bits(avg_bits: float, params: Sequence[int]) -> int:
    """The size budget in bits: avg_bits x the allocatable weight count, rounded down (exact arithmetic)."""
    return math.floor(Fraction(str(avg_bits)) * int(sum(params)))


def allocate(
    costs: Sequence[Sequence[float]], params: Sequence[int], candidates: Sequence[int], max_size: int
) -> tuple[list[int], int, float]:
    """The bits per layer minimising the summed cost with sum n_l b_l <= max_size: (bits, size, cost)."""
    f = pareto_frontier(costs, params, candidates, max_size)
    if not len(f.sizes):
        smallest = int(sum(params)) * min(candidates)
        raise ValueError(
            f"no allocation fits {max_size} bits: the smallest ({min(candidates)} bits everywhere) takes {smallest}"
        )
    i = len(f.sizes) - 1  # every pair left fits; the largest is the cheapest
    return f.allocation(i), int(f.sizes[i]), float(f.costs[i])


def _allocatable(sens: dict) -> list[dict]:
    return [r for r in sens["layers"] if r["fixed_bits"] is None]


def frontier_of(sens: dict) -> Frontier:
    """The whole frontier of a ``measure`` result (every budget)."""
    rows = _allocatable(sens)
    return pareto_frontier([r["kl"] for r in rows], [r["params"] for r in rows], sens["candidates"])


def load_measurement(path, spec: QuantSpec) -> dict:
    """A ``measure`` result saved as JSON, checked to be measured under the given quantizer settings."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run the sensitivity stage of this calibration set first)")
    sens = json.loads(path.read_text())
    want = {k: v for k, v in spec.record().items() if k != "bias"}  # biases do not change a weight's KL
    other = {k: sens.get(k) for k, v in want.items() if sens.get(k) != v}
    if other:
        raise ValueError(f"{path} was measured with {other}, not {want}: rerun the sensitivity stage")
    return sens


def allocate_cell(sens: dict, budget: float | str) -> tuple[dict[str, int], dict]:
    """The allocation of a mixed cell: the bits of every weight layer (fixed ones included, for ``prepare``), and a
    summary: the budget, the average reached, the summed KL and one row per layer (name, params, bits, KL at
    those bits, fixed). ``budget``: average weight bits over the allocatable layers, or a cell name
    ('mp4a4': the same; 'mp0.03mba4': at most 0.03 MB for every quantized weight, the fixed layers' 8 bits
    included, as ``dfq.quant.prepare.weight_size`` counts it)."""
    kind, value = ("bits", float(budget)) if not isinstance(budget, str) else mixed_budget(budget)[:2]
    rows = _allocatable(sens)
    params = [r["params"] for r in rows]
    fixed_bits = sum(r["params"] * r["fixed_bits"] for r in sens["layers"] if r["fixed_bits"])
    if kind == "bits":
        limit = budget_bits(value, params)
    else:
        limit = math.floor(Fraction(str(value)) * 8 * 10**6) - fixed_bits
        smallest = (fixed_bits + sum(params) * min(sens["candidates"])) / 8e6
        if limit < sum(params) * min(sens["candidates"]):
            raise ValueError(
                f"mixed cell {budget!r}: the smallest model takes {smallest:.6g} MB ({min(sens['candidates'])}"
                f"-bit allocatable layers{', 8-bit fixed layers' if fixed_bits else ''}); raise the budget"
            )
    bits, size, cost = allocate([r["kl"] for r in rows], params, sens["candidates"], limit)
    chosen = dict(zip((r["name"] for r in rows), bits))
    table = [
        {
            "name": r["name"],
            "params": r["params"],
            "bits": r["fixed_bits"] or chosen[r["name"]],
            "kl": None if r["fixed_bits"] else r["kl"][sens["candidates"].index(chosen[r["name"]])],
            "fixed": r["fixed_bits"] is not None,
        }
        for r in sens["layers"]
    ]
    return {r["name"]: r["bits"] for r in table}, {
        "budget_avg_bits" if kind == "bits" else "budget_mb": value,
        "budget_bits": limit,
        "avg_bits": size / sum(params),
        "weight_mb": (size + fixed_bits) / 8e6,
        "kl_sum": cost,
        "allocatable_params": sum(params),
        "layers": table,
    }


def uniform_costs(sens: dict) -> dict[int, float]:
    """Summed KL of every allocatable layer at the same candidate bit-width."""
    rows = _allocatable(sens)
    return {b: sum(r["kl"][j] for r in rows) for j, b in enumerate(sens["candidates"])}


def frontier_table(sens: dict, f: Frontier, step: float = 0.5) -> str:
    """Markdown: for budgets of min..max candidate bits in ``step``s, the frontier point chosen (average
    bits, summed KL, bits per allocatable layer in module order)."""
    params = [r["params"] for r in _allocatable(sens)]
    lines = [
        f"Pareto frontier: {len(f.sizes)} points over {len(params)} allocatable layers "
        f"({sum(params)} weights); bits per layer in module order",
        "",
        "| budget (avg bits) | avg bits | summed KL | bits per layer |",
        "|---|---|---|---|",
    ]
    lo, hi = min(sens["candidates"]), max(sens["candidates"])
    for k in range(int(round((hi - lo) / step)) + 1):
        budget = budget_bits(lo + k * step, params)
        i = int(np.searchsorted(f.sizes, budget, side="right")) - 1
        if i >= 0:
            lines.append(
                f"| {lo + k * step:g} | {f.sizes[i] / sum(params):.3f} | {f.costs[i]:.4g} | "
                + " ".join(map(str, f.allocation(i)))
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(sens: dict, f: Frontier, title: str, path) -> None:
    """Heat map of log10 KL (layers x candidate bits; fixed layers shown blank) beside the frontier
    (summed KL vs average bits) with the uniform allocations marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cands = sens["layers"], sens["candidates"]
    grid = np.array(
        [[np.nan] * len(cands) if r["kl"] is None else [math.log10(max(v, 1e-12)) for v in r["kl"]] for r in rows]
    )
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(11, 0.28 * len(rows) + 2.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.3]}
    )
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cands)), [str(b) for b in cands])
    ax.set_yticks(
        range(len(rows)),
        [f"{r['name']} ({r['params']})" + (" [8 fixed]" if r["kl"] is None else "") for r in rows],
        fontsize=7,
    )
    ax.set_xlabel("weight bits")
    fig.colorbar(im, ax=ax, label="log10 KL(FP32 || one layer quantized)")
    params = sum(r["params"] for r in _allocatable(sens))
    bx.plot(f.sizes / params, f.costs, drawstyle="steps-post", label="Pareto frontier (mixed)")
    uni = uniform_costs(sens)
    bx.plot(list(uni), list(uni.values()), "o", color="tab:red", label="uniform")
    bx.set_yscale("log")
    bx.set_xlabel("average weight bits (allocatable layers)")
    bx.set_ylabel("summed KL")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
