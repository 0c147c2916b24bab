"""Stage report: reports/results.md (mean ± std over seeds, built with pandas; uniform and mixed-precision
cells on the test set and on the validation split, model sizes, the mixed cells' allocations), reports/cells.csv
(every cell's and every (source, bits) mean's top-1, for `dvc plots`), accuracy-vs-bits with error bars, top-1 vs
weight size, BN-spread and sample-grid PNGs."""

import json

from dfq.cells import cell_name, finetuned, set_name
from dfq.pipeline import paths
from stages._common import read_params, setup_torch


def _read_json(path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    params = read_params()
    g, ft = params.generate, params.finetune
    sources, seeds, uniform, mixed = g.sources, g.seeds, params.quantize.bits, params.quantize.mixed.cells
    setup_torch()
    from dfq.io import load_torch
    from dfq.pipeline import plots, report

    tuned = [finetuned(b) for b in ft.bits] if ft.sources else []
    bits = uniform + mixed + tuned
    fp32, meta = _read_json(paths.FP32_METRICS), _read_json(paths.PREPARED_META)
    try:
        cells = report.pipeline_cells(sources, seeds, uniform + mixed, ft.sources, ft.bits)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    agg = report.aggregate(cells)
    per_set = {(s, k): _read_json(paths.diversity_metrics(set_name(s, k))) for s in sources for k in seeds}
    diversity = report.mean_diversity(per_set)
    allocs = {
        f"{set_name(s, k)} {c.upper()}": _read_json(paths.calibrate_metrics(cell_name(s, c, k)))["allocation"]
        for c in mixed
        for s in sources
        for k in seeds
    }
    text = report.results_markdown(
        fp32, cells, sources, seeds, bits, allocs, diversity, (ft.sources, ft.bits), meta.get("val_images")
    )
    report.write_text(text, paths.RESULTS)
    report.write_text(report.cells_csv(cells), paths.CELLS_TABLE)
    plots.plot_accuracy_vs_bits(fp32, agg, sources, uniform, paths.PLOTS["accuracy_vs_bits"])
    plots.plot_size_vs_top1(fp32, agg, sources, uniform + mixed, paths.PLOTS["size_vs_top1"])
    plots.plot_bn_spread(diversity, paths.PLOTS["bn_spread"])
    spec = meta["input_spec"]
    samples = {s: load_torch(paths.batches(paths.calib_set(set_name(s, seeds[0])))[0])[:8] for s in sources}
    plots.plot_sample_grid(samples, spec["mean"], spec["std"], paths.PLOTS["samples"])
    print(report.results_table(fp32, agg, sources, bits))


if __name__ == "__main__":
    main()
