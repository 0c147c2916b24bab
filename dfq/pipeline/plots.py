"""The report stage's PNGs: top-1 against bit-width and against quantized weight size (mean over seeds, std error
bars, FP32 dashed), the spread of per-sample BN statistics per layer, and a grid of calibration images.

A person compares sources and bit-widths faster on a picture than in reports/results.md's tables, and sees there
what the numbers hide (a homogenised synthetic set, a cell far below the others). matplotlib is imported when a
plot is drawn (Agg backend, no display), so the rest of the pipeline layer does not need it.
"""

from __future__ import annotations

import pandas as pd
import torch

from dfq.cells import is_mixed
from dfq.io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_accuracy_vs_bits(fp32: dict, agg: pd.DataFrame, sources: list[str], bits: list[str], path) -> None:
    """Top-1 against bit-width, one line per source (mean over seeds, error bars: std over seeds),
    FP32 as a dashed reference.

    Args:
        fp32: the FP32 model's metrics; its top1 (%) is the dashed line.
        agg: ``aggregate`` of the cells: top1_mean, top1_std and seeds per (source, bits).
        sources: one line each.
        bits: uniform cells w<W>a<A>, plotted in order of weight then activation bits.
        path: PNG file to write (atomically).
    """
    plt = _plt()
    order = sorted(bits, key=lambda b: int(b[1:].split("a")[0]) * 10 + int(b.split("a")[1]))
    idx = agg.set_index(["source", "bits"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for i, s in enumerate(sources):
        xs = [b for b in order if (s, b) in idx.index]
        mean = [idx.loc[(s, b)]["top1_mean"] for b in xs]
        std = [0.0 if pd.isna(v) else v for v in (idx.loc[(s, b)]["top1_std"] for b in xs)]
        pos = [order.index(b) + (i - (len(sources) - 1) / 2) * 0.04 for b in xs]  # dodge overlapping bars
        ax.errorbar(pos, mean, yerr=std, marker="o", capsize=3, label=s)
    ax.set_xticks(range(len(order)), [b.upper() for b in order])
    ax.axhline(fp32["top1"], color="black", linestyle="--", linewidth=1, label=f"FP32 {fp32['top1']:.2f}")
    n = int(agg["seeds"].max())
    ax.set_xlabel("bit-width (weights/activations)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy vs bit-width per calibration source (mean ± std over {n} seed{'s' * (n > 1)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _act_bits(cell: str) -> int:
    """Activation bits of a uniform (w<W>a<A>) or mixed (mp...a<A>) cell: the number after the last "a"."""
    return int(cell.rsplit("a", 1)[1])


def _size_points(idx: pd.DataFrame, source: str, bits: list[str], act: int, mixed: bool) -> list[tuple]:
    """(weight MB, top-1 mean, top-1 std (0 for one seed), cell) of one source's cells at ``act`` activation bits,
    mixed or uniform, sorted by size (so the uniform line joins them left to right)."""
    cells = [b for b in bits if (source, b) in idx.index and is_mixed(b) == mixed and _act_bits(b) == act]
    return sorted(
        (
            idx.loc[(source, b)]["weight_mb_mean"],
            idx.loc[(source, b)]["top1_mean"],
            0.0 if pd.isna(idx.loc[(source, b)]["top1_std"]) else idx.loc[(source, b)]["top1_std"],
            b,
        )
        for b in cells
    )


def _draw_size_series(ax, pts: list[tuple], lo: float, colour, act: int, mixed: bool) -> None:
    """One series of a size panel: uniform cells as a line of circles, mixed cells as stars, each labelled; a cell
    below ``lo`` sits on the bottom edge as a triangle with its top-1 in the label."""
    ax.errorbar(
        [p[0] for p in pts],
        [max(p[1], lo) for p in pts],
        yerr=[p[2] for p in pts],
        capsize=3,
        color=colour,
        marker="*" if mixed else "o",
        markersize=11 if mixed else 5,
        linestyle="none" if mixed else "-",
        label=f"A{act} {'mixed' if mixed else 'uniform'}",
    )
    for x, y, _, b in pts:
        text = b.upper() if y >= lo else f"{b.upper()} {y:.1f}"
        if y < lo:
            ax.plot([x], [lo], marker="v", color=colour, markersize=8)
        ax.annotate(
            text,
            (x, max(y, lo)),
            textcoords="offset points",
            xytext=(-7 if mixed else 5, -3),
            ha="right" if mixed else "left",
            fontsize=7,
            color=colour,
        )  # mixed: left


def _finish_size_panel(ax, fp32: dict, lo: float, source: str) -> None:
    """FP32's dashed line, the y range from ``lo`` to just above FP32, title, x label and grid of one panel."""
    ax.axhline(fp32["top1"], color="black", linestyle="--", linewidth=1, label=f"FP32 {fp32['top1']:.2f}")
    ax.set_ylim(lo - 0.3, fp32["top1"] + 0.8)
    ax.margins(x=0.18)  # room for the labels
    ax.set_title(source, fontsize=9)
    ax.set_xlabel("quantized weights (MB)")
    ax.grid(alpha=0.3)


def plot_size_vs_top1(fp32: dict, agg: pd.DataFrame, sources: list[str], bits: list[str], path) -> None:
    """Top-1 against quantized weight size, one panel per source, one colour per activation bit-width:
    uniform cells (circles, joined by size) and mixed-precision cells (stars), mean over seeds with std
    error bars; FP32 top-1 dashed. The y axis starts at most 10 points below FP32: a cell further down is
    drawn on the bottom edge (triangle) with its top-1 written beside it.

    Args:
        fp32: the FP32 model's metrics; its top1 (%) is the dashed line.
        agg: ``aggregate`` of the cells: top1_mean, top1_std, weight_mb_mean and seeds per (source, bits).
        sources: one panel each, three per row.
        bits: cells to plot (uniform w<W>a<A> or mixed mp...a<A>); the activation bits follow the last "a".
        path: PNG file to write (atomically).
    """
    plt = _plt()
    idx = agg.set_index(["source", "bits"])
    acts = sorted({_act_bits(b) for b in bits}, reverse=True)
    colour = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(acts)}
    tops = [idx.loc[(s, b)]["top1_mean"] for s in sources for b in bits if (s, b) in idx.index]
    lo = max(min(tops, default=0.0) - 1, fp32["top1"] - 10)
    cols = min(len(sources), 3)
    rows = -(-len(sources) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), dpi=110, squeeze=False, sharey=True)
    for ax, s in zip(axes.flat, sources):
        for a in acts:
            for mixed in (False, True):
                pts = _size_points(idx, s, bits, a, mixed)
                if pts:
                    _draw_size_series(ax, pts, lo, colour[a], a, mixed)
        _finish_size_panel(ax, fp32, lo, s)
    for ax in axes.flat[len(sources) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].legend(fontsize=6, loc="lower right")
    n = int(agg["seeds"].max())
    fig.suptitle(
        f"Top-1 vs weight size per calibration source (mean ± std over {n} seed{'s' * (n > 1)}; A: activation bits)",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)


def plot_bn_spread(diversity: dict[str, dict], path) -> None:
    """Per-layer spread of per-sample BN statistics (std over samples / running std), per source."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for s, d in diversity.items():
        ax.plot(range(len(d["bn_spread"])), d["bn_spread"], marker="o", label=f"{s} (cos {d['feature_cosine']:.2f})")
    ax.set_xlabel("BatchNorm layer")
    ax.set_ylabel("spread of per-sample means / running std")
    ax.set_title("Sample diversity per BN layer (homogenised data sits near 0)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_sample_grid(samples: dict[str, torch.Tensor], mean, std, path, per_row: int = 8) -> None:
    """One row per source of calibration images, de-normalised to [0, 1] for display.

    Args:
        samples: source name -> normalised images (N, C, H, W); one row each, the first ``per_row`` shown.
        mean: per-channel normalisation mean (a sequence of C floats), used to de-normalise.
        std: per-channel normalisation std (a sequence of C floats).
        path: PNG file to write (atomically).
        per_row: images per row (columns of the grid).
    """
    plt = _plt()
    rows = len(samples)
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.1, rows * 1.25 + 0.3), dpi=110, squeeze=False)
    m = torch.tensor(mean).view(-1, 1, 1)
    sd = torch.tensor(std).view(-1, 1, 1)
    for r, (name, x) in enumerate(samples.items()):
        for c in range(per_row):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(x):
                img = (x[c] * sd + m).clamp(0, 1)
                ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(name, loc="left", fontsize=9)
    fig.suptitle("Calibration samples per source (de-normalised, clipped to [0, 1])", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
