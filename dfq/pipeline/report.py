"""Reports: the results table (markdown) and PNG plots a person would rather look at than read."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from dfq.cells import base_bits, cell_name, finetuned, is_mixed
from dfq.io import atomic_path, save_text
from dfq.pipeline.paths import evaluate_stage


def set_metrics(sources: list[str], seeds: list[int], bits: list[str], eval_dir="metrics/eval",
                calib_dir="metrics/calibrate") -> pd.DataFrame:
    """One row per (source, seed, bits) cell: its evaluation metrics (test: top1, top5; validation split:
    val_top1, val_top5 when measured) and calibration wall time, read from ``<eval_dir>/<source>-s<seed>-<bits>.json``
    (and the same name in ``calib_dir``). A metrics file's ``env`` (dfq.provenance) stays one column of dicts.

    Args:
        sources: calibration source names.
        seeds: the seeds of every source.
        bits: cell names, e.g. w4a4, mp4a4 or w4a4-ft.
        eval_dir: folder of the evaluation metrics files; a missing file raises FileNotFoundError naming its stage.
        calib_dir: folder of the calibration (or fine-tuning) metrics files, read for ``seconds``; a missing file gives
            None.
    """
    rows = []
    for s in sources:
        for k in seeds:
            for b in bits:
                path = Path(eval_dir) / f"{cell_name(s, b, k)}.json"
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing (run the {evaluate_stage(s, k, b)} stage first)")
                calib = Path(calib_dir) / path.name
                seconds = json.loads(calib.read_text())["seconds"] if calib.is_file() else None
                rows.append({**json.loads(path.read_text()), "source": s, "seed": k, "bits": b,
                             "calibration_seconds": seconds})
    return pd.DataFrame(rows)


def pipeline_cells(sources: list[str], seeds: list[int], bits: list[str], tuned_sources: list[str] = (),
                   tuned_bits: list[str] = ()) -> pd.DataFrame:
    """Every cell of the pipeline: sources x seeds x bits (uniform and mixed), then the fine-tuned cells
    ``tuned_sources`` x seeds x ``<tuned_bits>-ft`` (their ``calibration_seconds``: the fine-tuning time).

    Args:
        sources: calibration source names.
        seeds: the seeds of every source.
        bits: calibrated cells, uniform and mixed (e.g. w4a4, mp4a4).
        tuned_sources: sources with fine-tuned cells (empty: none, only the calibrated cells).
        tuned_bits: the cells those were fine-tuned from, read as <bits>-ft with times from metrics/finetune.
    """
    cells = set_metrics(sources, seeds, bits)
    if not tuned_sources:
        return cells
    tuned = set_metrics(tuned_sources, seeds, [finetuned(b) for b in tuned_bits], calib_dir="metrics/finetune")
    return pd.concat([cells, tuned], ignore_index=True)


def finetune_table(agg: pd.DataFrame, sources: list[str], bits: list[str]) -> str:
    """Markdown: each fine-tuned cell beside the calibrated cell it starts from (top-1 mean ± std over seeds),
    the gain in points and the fine-tuning wall time."""
    idx = agg.set_index(["source", "bits"])
    lines = ["| source | bits | calibrated | fine-tuned | gain | fine-tuning s | seeds |", "|" + "---|" * 7]
    for s in sources:
        for b in bits:
            c, t = idx.loc[(s, b)], idx.loc[(s, finetuned(b))]
            lines.append(f"| {s} | {b.upper()} | {_pm(c['top1_mean'], c['top1_std'])} | {_pm(t['top1_mean'], t['top1_std'])} "
                         f"| {t['top1_mean'] - c['top1_mean']:+.2f} | {t['calibration_seconds_mean']:.0f} | {int(t['seeds'])} |")
    return "\n".join(lines) + "\n"


def aggregate(cells: pd.DataFrame, metrics=("top1", "top5", "val_top1", "val_top5", "calibration_seconds",
                                            "weight_mb")) -> pd.DataFrame:
    """Mean, sample std (ddof 1; NaN for one seed) and seed count of each metric per (source, bits),
    in the order the cells come in. Columns ``<metric>_mean``, ``<metric>_std``, ``seeds``."""
    metrics = [m for m in metrics if m in cells]
    g = cells.groupby(["source", "bits"], sort=False)
    out = g[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


RANKING_SEEDS = 3  # seeds a ranking of sources needs (DEVELOPERS.md: one seed at W4A4 moves by a point or more)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def results_table(fp32: dict, agg: pd.DataFrame, sources: list[str], bits: list[str], prefix: str = "") -> str:
    """Markdown table: one row per source, columns FP32 and each bit-width: top-1 % mean ± std over
    seeds (top-5 mean in brackets), and the seed count. ``prefix`` "val_": the validation split's
    (val_top1, val_top5) instead of the test set's; a cell without them is n/a.

    Args:
        fp32: the FP32 model's metrics (top1, top5, val_top1, val_top5 when measured), in %.
        agg: ``aggregate`` of the cells: <metric>_mean, <metric>_std and seeds per (source, bits).
        sources: table rows, in order.
        bits: table columns, in order; a (source, bits) pair missing from ``agg`` is n/a.
        prefix: "": the test set's top1/top5; "val_": the validation split's.
    """
    t1, t5 = f"{prefix}top1", f"{prefix}top5"
    head = "| source | seeds | FP32 | " + " | ".join(b.upper() for b in bits) + " |"
    lines = [head, "|" + "---|" * (3 + len(bits))]
    idx = agg.set_index(["source", "bits"])
    for s in sources:
        cells = []
        for b in bits:
            r = idx.loc[(s, b)] if (s, b) in idx.index else {}
            if pd.notna(r.get(f"{t1}_mean", float("nan"))):
                cells.append(f"{_pm(r[f'{t1}_mean'], r[f'{t1}_std'])} ({r[f'{t5}_mean']:.2f})")
            else:
                cells.append("n/a")
        n = int(idx.loc[s]["seeds"].max()) if s in idx.index.get_level_values(0) else 0
        ref = f"{fp32[t1]:.2f} ({fp32[t5]:.2f})" if t1 in fp32 else "n/a"
        lines.append(f"| {s} | {n} | {ref} | " + " | ".join(cells) + " |")
    fewest = int(agg["seeds"].min()) if len(agg) else 0
    if fewest < RANKING_SEEDS:
        lines += ["", f"**{fewest} seed{'s' * (fewest != 1)} per cell: not a ranking.** A cell moves by up to a point "
                      f"between seeds at W4A4 (between machines too, README); rank sources on the mean of at least "
                      f"{RANKING_SEEDS} seeds (`generate.seeds: [0, 1, 2]`)."]
    return "\n".join(lines) + "\n"


def validation_section(fp32: dict, agg: pd.DataFrame, cells: pd.DataFrame, sources: list[str], bits: list[str],
                       images: int | None = None) -> str:
    """Markdown section of the validation split's accuracy (val_top1, val_top5): the results table and every
    seed's top-1, as for the test set; "" when no cell was measured on one (data.val_images 0).

    Args:
        fp32: the FP32 model's metrics (val_top1, val_top5 when measured), in %.
        agg: ``aggregate`` of the cells (val_top1_mean, val_top1_std, ... and seeds per (source, bits)).
        cells: one row per cell (``set_metrics`` / ``pipeline_cells``), with a val_top1 column when measured.
        sources: table rows, in order.
        bits: table columns, in order.
        images: size of the validation split, named in the text (None or 0: not named).
    """
    if "val_top1" not in cells or cells["val_top1"].isna().all():
        return ""
    n = f"{images} " if images else ""
    return (f"\n## Validation split\n\nTop-1 % on the {n}validation images (training images disjoint from the real "
            "calibration pool, data.val_images): settings are chosen on these, and reported on the test set (the "
            "tables above). Mean ± std over seeds (top-5 mean in brackets).\n\n"
            + results_table(fp32, agg, sources, bits, "val_") + "\nEvery seed, top-1 %:\n\n"
            + seeds_table(cells, bits, "val_top1"))


def seeds_table(cells: pd.DataFrame, bits: list[str], metric: str = "top1") -> str:
    """Markdown table of every cell's top-1 (``metric``: val_top1 for the validation split's): one row per
    (source, seed), one column per bit-width."""
    wide = cells.pivot_table(index=["source", "seed"], columns="bits", values=metric, sort=False)
    lines = ["| source | seed | " + " | ".join(b.upper() for b in bits) + " |", "|" + "---|" * (2 + len(bits))]
    for (s, k), row in wide.iterrows():
        lines.append(f"| {s} | {k} | " + " | ".join(f"{row[b]:.2f}" if b in row and pd.notna(row[b]) else "n/a"
                                                    for b in bits) + " |")
    return "\n".join(lines) + "\n"


def calibration_table(cells: pd.DataFrame, agg: pd.DataFrame, sources: list[str], bits: list[str]) -> str:
    """The quantizer settings the cells were calibrated with and the mean calibration wall time."""
    first = cells.iloc[0]
    head = (f"Protocol `{first.get('protocol', 'zeroq')}`, rounding `{first.get('rounding', 'nearest')}`, "
            f"activation ranges `{first.get('act_method', 'n/a')}`, {first.get('weight_scheme', 'asymmetric')} "
            "per-channel weights. Calibration wall time, seconds (mean over seeds):\n\n")
    idx = agg.set_index(["source", "bits"])
    lines = ["| source | " + " | ".join(b.upper() for b in bits) + " |", "|" + "---|" * (1 + len(bits))]
    for s in sources:
        secs = [idx.loc[(s, b)].get("calibration_seconds_mean") if (s, b) in idx.index else None for b in bits]
        lines.append(f"| {s} | " + " | ".join("n/a" if t is None or pd.isna(t) else f"{t:.1f}" for t in secs) + " |")
    return head + "\n".join(lines) + "\n"


def size_table(agg: pd.DataFrame, sources: list[str], bits: list[str]) -> str:
    """Markdown: quantized weight size in MB (and average weight bits over every weight layer) per source
    and cell, mean over seeds."""
    idx = agg.set_index(["source", "bits"])
    lines = ["| source | " + " | ".join(b.upper() for b in bits) + " |", "|" + "---|" * (1 + len(bits))]
    for s in sources:
        row = []
        for b in bits:
            mb = idx.loc[(s, b)].get("weight_mb_mean") if (s, b) in idx.index else None
            row.append("n/a" if mb is None or pd.isna(mb) else f"{mb:.4f}")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def allocation_markdown(alloc: dict) -> str:
    """One mixed cell's allocation (``allocation`` of its metrics/calibrate JSON) as a markdown table."""
    budget = (f"{alloc['budget_avg_bits']:g} average weight bits over {alloc['allocatable_params']} allocatable weights"
              if "budget_avg_bits" in alloc else f"{alloc['budget_mb']:g} MB of quantized weights")
    size = f" ({alloc['weight_mb']:.4g} MB)" if "weight_mb" in alloc else ""
    head = (f"Budget {budget}: {alloc['avg_bits']:.3f} average weight bits reached{size}, summed KL "
            f"{alloc['kl_sum']:.4g}.\n\n")
    lines = ["| layer | weights | bits | KL at these bits |", "|---|---|---|---|"]
    for r in alloc["layers"]:
        kl = "fixed by the protocol" if r["fixed"] else f"{r['kl']:.3g}"
        lines.append(f"| {r['name']} | {r['params']} | {r['bits']} | {kl} |")
    return head + "\n".join(lines) + "\n"


def allocations_table(allocs: dict[str, dict]) -> str:
    """Markdown: bits per weight layer (rows) for each mixed cell (columns, e.g. ``zeroq-s0 MP4A4``); the
    last row is the average reached over the allocatable layers. A layer fixed by the protocol is marked *."""
    names = list(allocs)
    first = next(iter(allocs.values()))
    lines = ["| layer | weights | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for i, r in enumerate(first["layers"]):
        bits = [f"{a['layers'][i]['bits']}{'*' if a['layers'][i]['fixed'] else ''}" for a in allocs.values()]
        lines.append(f"| {r['name']} | {r['params']} | " + " | ".join(bits) + " |")
    lines.append("| average | | " + " | ".join(f"{a['avg_bits']:.3f}" for a in allocs.values()) + " |")
    return "\n".join(lines) + "\n"


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
    acts = sorted({int(b.rsplit("a", 1)[1]) for b in bits}, reverse=True)
    colour = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(acts)}
    tops = [idx.loc[(s, b)]["top1_mean"] for s in sources for b in bits if (s, b) in idx.index]
    lo = max(min(tops, default=0.0) - 1, fp32["top1"] - 10)
    cols = min(len(sources), 3)
    rows = -(-len(sources) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), dpi=110, squeeze=False, sharey=True)
    for ax, s in zip(axes.flat, sources):
        for a in acts:
            for mixed in (False, True):
                cells = [b for b in bits if (s, b) in idx.index and is_mixed(b) == mixed
                         and int(b.rsplit("a", 1)[1]) == a]
                pts = sorted((idx.loc[(s, b)]["weight_mb_mean"], idx.loc[(s, b)]["top1_mean"],
                              0.0 if pd.isna(idx.loc[(s, b)]["top1_std"]) else idx.loc[(s, b)]["top1_std"], b)
                             for b in cells)
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [max(p[1], lo) for p in pts], yerr=[p[2] for p in pts], capsize=3,
                            color=colour[a], marker="*" if mixed else "o", markersize=11 if mixed else 5,
                            linestyle="none" if mixed else "-", label=f"A{a} {'mixed' if mixed else 'uniform'}")
                for x, y, _, b in pts:
                    text = b.upper() if y >= lo else f"{b.upper()} {y:.1f}"
                    if y < lo:
                        ax.plot([x], [lo], marker="v", color=colour[a], markersize=8)
                    ax.annotate(text, (x, max(y, lo)), textcoords="offset points", xytext=(-7 if mixed else 5, -3),
                                ha="right" if mixed else "left", fontsize=7, color=colour[a])  # mixed: left
        ax.axhline(fp32["top1"], color="black", linestyle="--", linewidth=1, label=f"FP32 {fp32['top1']:.2f}")
        ax.set_ylim(lo - 0.3, fp32["top1"] + 0.8)
        ax.margins(x=0.18)  # room for the labels
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("quantized weights (MB)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(sources):]:
        ax.axis("off")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].legend(fontsize=6, loc="lower right")
    n = int(agg["seeds"].max())
    fig.suptitle(f"Top-1 vs weight size per calibration source (mean ± std over {n} seed{'s' * (n > 1)}; "
                 "A: activation bits)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def mean_diversity(per_set: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Diversity diagnostics per source: each number averaged over the source's seeds."""
    out: dict[str, dict] = {}
    for s in dict.fromkeys(src for src, _ in per_set):
        ds = [d for (src, _), d in per_set.items() if src == s]
        out[s] = {"bn_spread": [sum(v) / len(ds) for v in zip(*(d["bn_spread"] for d in ds))],
                  **{k: sum(d[k] for d in ds) / len(ds) for k in ("bn_spread_mean", "feature_cosine")},
                  "images": ds[0]["images"], "seeds": len(ds)}
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_text(text: str, path) -> None:
    save_text(text, Path(path))
