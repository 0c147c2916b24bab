"""Reports: reports/results.md and the markdown tables it is made of (mean ± std over seeds, built with pandas),
from the metrics files the stages wrote, and reports/cells.csv, the per-cell table `dvc plots` draws. The PNGs
results.md links to are drawn by dfq.pipeline.plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from dfq.cells import base_bits, cell_name, finetuned, is_finetuned, is_mixed, mixed_budget, parse_bits
from dfq.io import save_text
from dfq.pipeline import paths
from dfq.pipeline.paths import evaluate_stage


def set_metrics(
    sources: list[str], seeds: list[int], bits: list[str], eval_dir=paths.EVAL_DIR, calib_dir=paths.CALIBRATE_DIR
) -> pd.DataFrame:
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
                rows.append(
                    {**json.loads(path.read_text()), "source": s, "seed": k, "bits": b, "calibration_seconds": seconds}
                )
    return pd.DataFrame(rows)


def pipeline_cells(
    sources: list[str], seeds: list[int], bits: list[str], tuned_sources: list[str] = (), tuned_bits: list[str] = ()
) -> pd.DataFrame:
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
    tuned = set_metrics(tuned_sources, seeds, [finetuned(b) for b in tuned_bits], calib_dir=paths.FINETUNE_DIR)
    return pd.concat([cells, tuned], ignore_index=True)


def finetune_table(agg: pd.DataFrame, sources: list[str], bits: list[str]) -> str:
    """Markdown: each fine-tuned cell beside the calibrated cell it starts from (top-1 mean ± std over seeds),
    the gain in points and the fine-tuning wall time."""
    idx = agg.set_index(["source", "bits"])
    lines = ["| source | bits | calibrated | fine-tuned | gain | fine-tuning s | seeds |", "|" + "---|" * 7]
    for s in sources:
        for b in bits:
            c, t = idx.loc[(s, b)], idx.loc[(s, finetuned(b))]
            lines.append(
                f"| {s} | {b.upper()} | {_pm(c['top1_mean'], c['top1_std'])} | {_pm(t['top1_mean'], t['top1_std'])} "
                f"| {t['top1_mean'] - c['top1_mean']:+.2f} | {t['calibration_seconds_mean']:.0f} | {int(t['seeds'])} |"
            )
    return "\n".join(lines) + "\n"


def aggregate(
    cells: pd.DataFrame, metrics=("top1", "top5", "val_top1", "val_top5", "calibration_seconds", "weight_mb")
) -> pd.DataFrame:
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
        lines += [
            "",
            f"**{fewest} seed{'s' * (fewest != 1)} per cell: not a ranking.** A cell moves by up to a point "
            f"between seeds at W4A4 (between machines too, README); rank sources on the mean of at least "
            f"{RANKING_SEEDS} seeds (`generate.seeds: [0, 1, 2]`).",
        ]
    return "\n".join(lines) + "\n"


def validation_section(
    fp32: dict, agg: pd.DataFrame, cells: pd.DataFrame, sources: list[str], bits: list[str], images: int | None = None
) -> str:
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
    return (
        f"\n## Validation split\n\nTop-1 % on the {n}validation images (training images disjoint from the real "
        "calibration pool, data.val_images): settings are chosen on these, and reported on the test set (the "
        "tables above). Mean ± std over seeds (top-5 mean in brackets).\n\n"
        + results_table(fp32, agg, sources, bits, "val_")
        + "\nEvery seed, top-1 %:\n\n"
        + seeds_table(cells, bits, "val_top1")
    )


def seeds_table(cells: pd.DataFrame, bits: list[str], metric: str = "top1") -> str:
    """Markdown table of every cell's top-1 (``metric``: val_top1 for the validation split's): one row per
    (source, seed), one column per bit-width."""
    wide = cells.pivot_table(index=["source", "seed"], columns="bits", values=metric, sort=False)
    lines = ["| source | seed | " + " | ".join(b.upper() for b in bits) + " |", "|" + "---|" * (2 + len(bits))]
    for (s, k), row in wide.iterrows():
        lines.append(
            f"| {s} | {k} | "
            + " | ".join(f"{row[b]:.2f}" if b in row and pd.notna(row[b]) else "n/a" for b in bits)
            + " |"
        )
    return "\n".join(lines) + "\n"


def calibration_table(cells: pd.DataFrame, agg: pd.DataFrame, sources: list[str], bits: list[str]) -> str:
    """The quantizer settings the cells were calibrated with and the mean calibration wall time."""
    first = cells.iloc[0]
    head = (
        f"Protocol `{first.get('protocol', 'zeroq')}`, rounding `{first.get('rounding', 'nearest')}`, "
        f"activation ranges `{first.get('act_method', 'n/a')}`, {first.get('weight_scheme', 'asymmetric')} "
        "per-channel weights. Calibration wall time, seconds (mean over seeds):\n\n"
    )
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
    budget = (
        f"{alloc['budget_avg_bits']:g} average weight bits over {alloc['allocatable_params']} allocatable weights"
        if "budget_avg_bits" in alloc
        else f"{alloc['budget_mb']:g} MB of quantized weights"
    )
    size = f" ({alloc['weight_mb']:.4g} MB)" if "weight_mb" in alloc else ""
    head = (
        f"Budget {budget}: {alloc['avg_bits']:.3f} average weight bits reached{size}, summed KL "
        f"{alloc['kl_sum']:.4g}.\n\n"
    )
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


def mean_diversity(per_set: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Diversity diagnostics per source: each number averaged over the source's seeds."""
    out: dict[str, dict] = {}
    for s in dict.fromkeys(src for src, _ in per_set):
        ds = [d for (src, _), d in per_set.items() if src == s]
        out[s] = {
            "bn_spread": [sum(v) / len(ds) for v in zip(*(d["bn_spread"] for d in ds))],
            **{k: sum(d[k] for d in ds) / len(ds) for k in ("bn_spread_mean", "feature_cosine")},
            "images": ds[0]["images"],
            "seeds": len(ds),
        }
    return out


def diversity_table(diversity: dict[str, dict]) -> str:
    """Markdown table of the diversity diagnostics, one row per source."""
    lines = [
        "| source | mean BN-stat spread (higher = more diverse) | feature cosine (lower = more diverse) | images |",
        "|---|---|---|---|",
    ]
    for s, d in diversity.items():
        lines.append(f"| {s} | {d['bn_spread_mean']:.3f} | {d['feature_cosine']:.3f} | {d['images']} |")
    return "\n".join(lines) + "\n"


def _allocations_section(allocs: dict[str, dict]) -> str:
    if not allocs:
        return ""
    return (
        "\n## Mixed-precision allocations\n\nWeight bits per layer (* fixed by the protocol); heat maps and "
        "frontiers: `reports/sensitivity/<source>-s<seed>.png`.\n\n" + allocations_table(allocs)
    )


def _finetune_section(agg: pd.DataFrame, sources: list[str], bits: list[str]) -> str:
    if not (sources and bits):
        return ""
    return (
        "\n## Data-free fine-tuning\n\nTop-1 %, mean ± std over seeds (`<bits>-FT` columns above); "
        "README, dfq/quant/finetune.py.\n\n" + finetune_table(agg, sources, bits)
    )


def results_markdown(
    fp32: dict,
    cells: pd.DataFrame,
    sources: list[str],
    seeds: list[int],
    bits: list[str],
    allocs: dict[str, dict],
    diversity: dict[str, dict],
    tuned: tuple[list[str], list[str]] = ((), ()),
    val_images: int | None = None,
) -> str:
    """reports/results.md: the results table (test set), every seed's top-1, the validation split's section (when
    measured), model sizes, the mixed cells' allocations (when any), the fine-tuned cells beside their start (when
    any), the quantizer settings and calibration times, and the calibration sets' diversity; it links the PNGs of
    dfq.pipeline.plots (accuracy_vs_bits, size_vs_top1, bn_spread, samples), written beside it.

    Args:
        fp32: the FP32 model's metrics (top1, top5; val_top1, val_top5 when measured), in %.
        cells: one row per cell (``pipeline_cells``), fine-tuned cells included.
        sources: table rows, in order.
        seeds: the seeds of every source (their count is named in the text).
        bits: table columns, in order: uniform, mixed and fine-tuned (<bits>-ft) cells.
        allocs: the mixed cells' allocations by column name (e.g. ``zeroq-s0 MP4A4``); empty: no section.
        diversity: ``mean_diversity`` of the calibration sets, per source.
        tuned: (sources, bits) fine-tuned (finetune.sources, finetune.bits); either empty: no section.
        val_images: size of the validation split, named in its section (None or 0: not named).
    """
    agg = aggregate(cells)
    n = len(seeds)
    return (
        "# Results\n\nTop-1 % on the test set per calibration source and bit-width (weights/activations; MP<B>A<A>: "
        "mixed precision, B average weight bits): "
        f"mean ± std over {n} seed{'s' * (n > 1)} (each seed its own calibration set; top-5 mean in brackets).\n\n"
        + results_table(fp32, agg, sources, bits)
        + "\n![accuracy vs bits](accuracy_vs_bits.png)\n\n## Every seed\n\nTop-1 %:\n\n"
        + seeds_table(cells, bits)
        + validation_section(fp32, agg, cells, sources, bits, val_images)  # "" without one
        + "\n## Model size\n\nQuantized weights (every conv/linear at its bits), MB:\n\n"
        + size_table(agg, sources, bits)
        + "\n![top-1 vs size](size_vs_top1.png)\n"
        + _allocations_section(allocs)
        + _finetune_section(agg, *tuned)
        + "\n## Quantizer\n\n"
        + calibration_table(cells, agg, sources, bits)
        + "\n## Diversity of the calibration sets\n\nMean over seeds.\n\n"
        + diversity_table(diversity)
        + "\n![BN-statistic spread](bn_spread.png)\n\n![samples](samples.png)\n"
    )


CELLS_COLUMNS = (  # reports/cells.csv, the table `dvc plots` draws (dvc.yaml's top-level plots, docs/dvc-plots.md)
    *("source", "seed", "bits", "kind", "weight_bits", "act_bits"),
    *("top1", "top5", "val_top1", "val_top5", "top1_mean", "top1_std", "seeds"),
)


def cell_bits(bits: str) -> tuple[str, float | None, int]:
    """(kind, weight bits, activation bits) of a cell's bits, by dfq.cells: w4a8 -> ('uniform', 4, 8); mp3.5a8 ->
    ('mixed', 3.5, 8), the budget (an MB budget, mp0.03mba4: no weight bits, None); w4a4-ft -> ('finetuned', 4, 4)."""
    b = base_bits(bits)
    kind = "finetuned" if is_finetuned(bits) else "mixed" if is_mixed(b) else "uniform"
    if not is_mixed(b):
        return (kind, *parse_bits(b))
    unit, budget, abits = mixed_budget(b)
    return kind, budget if unit == "bits" else None, abits


def _number(value, fmt: str = ".4f") -> str:
    """Fixed formatting, so an unchanged result writes the same bytes; missing (None, NaN): empty."""
    return "" if value is None or pd.isna(value) else format(value, fmt)


def _bits_fields(bits: str) -> dict[str, str]:
    kind, wbits, abits = cell_bits(bits)
    return {"bits": bits, "kind": kind, "weight_bits": _number(wbits, "g"), "act_bits": str(abits)}


def cells_csv(cells: pd.DataFrame) -> str:
    """reports/cells.csv: one row per (source, seed, bits) cell (top1, top5, val_top1, val_top5 when measured), then
    per (source, bits) one row ``seed`` = mean with top1_mean, top1_std (sample std; empty for one seed) and seeds;
    each row with the cell's kind, weight bits and activation bits (``cell_bits``). Rows sorted by (source, bits,
    seed, the mean last), numbers at 4 decimals: the same cells give the same bytes."""
    keyed = []
    for r in cells.to_dict("records"):
        metrics = {m: _number(r.get(m)) for m in ("top1", "top5", "val_top1", "val_top5")}
        keyed.append(((r["source"], r["bits"], 0, int(r["seed"])), {"seed": str(int(r["seed"])), **metrics}))
    for r in aggregate(cells, ("top1",)).to_dict("records"):
        stats = {"top1_mean": _number(r["top1_mean"]), "top1_std": _number(r["top1_std"]), "seeds": str(r["seeds"])}
        keyed.append(((r["source"], r["bits"], 1, 0), {"seed": "mean", **stats}))
    out = io.StringIO()
    writer = csv.DictWriter(out, CELLS_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    for (source, bits, *_), row in sorted(keyed, key=lambda kr: kr[0]):
        writer.writerow({"source": source, **_bits_fields(bits), **row})
    return out.getvalue()


def write_text(text: str, path) -> None:
    save_text(text, Path(path))
