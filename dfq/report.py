"""Reports: the results table (markdown) and PNG plots a person would rather look at than read."""
from __future__ import annotations

from pathlib import Path

import torch


def results_table(fp32: dict, results: dict[tuple[str, str], dict], sources: list[str], bits: list[str]) -> str:
    """Markdown table: one row per source, columns FP32 and each bit-width (top-1 %, top-5 in brackets)."""
    head = "| source | FP32 | " + " | ".join(b.upper() for b in bits) + " |"
    lines = [head, "|" + "---|" * (2 + len(bits))]
    for s in sources:
        cells = []
        for b in bits:
            r = results.get((s, b))
            cells.append(f"{r['top1']:.2f} ({r['top5']:.2f})" if r else "n/a")
        lines.append(f"| {s} | {fp32['top1']:.2f} ({fp32['top5']:.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def calibration_table(results: dict[tuple[str, str], dict], sources: list[str], bits: list[str]) -> str:
    """The quantizer settings the cells were calibrated with and the calibration wall time of each."""
    first = next(iter(results.values()))
    head = (f"Protocol `{first.get('protocol', 'zeroq')}`, rounding `{first.get('rounding', 'nearest')}`, "
            f"{first.get('weight_scheme', 'asymmetric')} per-channel weights. Calibration wall time, seconds:\n\n")
    lines = ["| source | " + " | ".join(b.upper() for b in bits) + " |", "|" + "---|" * (1 + len(bits))]
    for s in sources:
        secs = [results[(s, b)].get("calibration_seconds") for b in bits]
        lines.append(f"| {s} | " + " | ".join("n/a" if t is None else f"{t:.1f}" for t in secs) + " |")
    return head + "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_bits(fp32: dict, results: dict, sources: list[str], bits: list[str], path) -> None:
    """Top-1 against bit-width, one line per source, FP32 as a dashed reference."""
    plt = _plt()
    order = sorted(bits, key=lambda b: int(b[1:].split("a")[0]) * 10 + int(b.split("a")[1]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in sources:
        xs = [b for b in order if (s, b) in results]
        ax.plot([b.upper() for b in xs], [results[(s, b)]["top1"] for b in xs], marker="o", label=s)
    ax.axhline(fp32["top1"], color="black", linestyle="--", linewidth=1, label=f"FP32 {fp32['top1']:.2f}")
    ax.set_xlabel("bit-width (weights/activations)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs bit-width per calibration source")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_sample_grid(samples: dict[str, torch.Tensor], mean, std, path, per_row: int = 8) -> None:
    """One row per source of calibration images, de-normalised to [0, 1] for display."""
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


def diversity_table(diversity: dict[str, dict]) -> str:
    """Markdown table of the diversity diagnostics, one row per source."""
    lines = ["| source | mean BN-stat spread (higher = more diverse) | feature cosine (lower = more diverse) | images |",
             "|---|---|---|---|"]
    for s, d in diversity.items():
        lines.append(f"| {s} | {d['bn_spread_mean']:.3f} | {d['feature_cosine']:.3f} | {d['images']} |")
    return "\n".join(lines) + "\n"


def plot_bn_spread(diversity: dict[str, dict], path) -> None:
    """Per-layer spread of per-sample BN statistics (std over samples / running std), per source."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for s, d in diversity.items():
        ax.plot(range(len(d["bn_spread"])), d["bn_spread"], marker="o",
                label=f"{s} (cos {d['feature_cosine']:.2f})")
    ax.set_xlabel("BatchNorm layer")
    ax.set_ylabel("spread of per-sample means / running std")
    ax.set_title("Sample diversity per BN layer (homogenised data sits near 0)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    from dfq.io import atomic_path

    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_text(text: str, path) -> None:
    from dfq.io import save_text

    save_text(text, Path(path))
