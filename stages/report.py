"""Stage report: reports/results.md (mean ± std over seeds, built with pandas; uniform and mixed-precision
cells on the test set and on the validation split, model sizes, the mixed cells' allocations), accuracy-vs-bits
with error bars, top-1 vs weight size, BN-spread and sample-grid PNGs."""
import json

from dfq.pipeline import paths
from stages._common import read_params, setup_torch


def main() -> None:
    params = read_params()
    g, ft = params.generate, params.finetune
    sources, seeds, uniform, mixed = g.sources, g.seeds, params.quantize.bits, params.quantize.mixed.cells
    setup_torch()
    from dfq.cells import cell_name, finetuned, set_name
    from dfq.io import load_torch
    from dfq.pipeline import report

    tuned = [finetuned(b) for b in ft.bits] if ft.sources else []
    bits = uniform + mixed + tuned
    fp32 = json.loads(paths.FP32_METRICS.read_text())
    meta = json.loads(paths.PREPARED_META.read_text())
    try:
        cells = report.pipeline_cells(sources, seeds, uniform + mixed, ft.sources, ft.bits)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    agg = report.aggregate(cells)
    per_set = {(s, k): json.loads(paths.diversity_metrics(set_name(s, k)).read_text()) for s in sources for k in seeds}
    diversity = report.mean_diversity(per_set)
    table = report.results_table(fp32, agg, sources, bits)
    allocs = {f"{set_name(s, k)} {c.upper()}": json.loads(paths.calibrate_metrics(cell_name(s, c, k)).read_text())
              ["allocation"] for c in mixed for s in sources for k in seeds}
    n = len(seeds)
    report.write_text(
        "# Results\n\nTop-1 % on the test set per calibration source and bit-width (weights/activations; MP<B>A<A>: "
        "mixed precision, B average weight bits): "
        f"mean ± std over {n} seed{'s' * (n > 1)} (each seed its own calibration set; top-5 mean in brackets).\n\n"
        + table + "\n![accuracy vs bits](accuracy_vs_bits.png)\n\n## Every seed\n\nTop-1 %:\n\n"
        + report.seeds_table(cells, bits)
        + report.validation_section(fp32, agg, cells, sources, bits, meta.get("val_images"))  # "" without one
        + "\n## Model size\n\nQuantized weights (every conv/linear at its bits), "
        "MB:\n\n" + report.size_table(agg, sources, bits) + "\n![top-1 vs size](size_vs_top1.png)\n"
        + ("\n## Mixed-precision allocations\n\nWeight bits per layer (* fixed by the protocol); heat maps and "
           "frontiers: `reports/sensitivity/<source>-s<seed>.png`.\n\n" + report.allocations_table(allocs)
           if allocs else "") + ("\n## Data-free fine-tuning\n\nTop-1 %, mean ± std over seeds (`<bits>-FT` columns above); "
                                 "README, dfq/quant/finetune.py.\n\n" + report.finetune_table(agg, ft.sources, ft.bits)
                                 if tuned else "") + "\n## Quantizer\n\n"
        + report.calibration_table(cells, agg, sources, bits) + "\n## Diversity of the calibration sets\n\n"
        + "Mean over seeds.\n\n" + report.diversity_table(diversity)
        + "\n![BN-statistic spread](bn_spread.png)\n\n![samples](samples.png)\n", paths.RESULTS)
    report.plot_accuracy_vs_bits(fp32, agg, sources, uniform, paths.PLOTS["accuracy_vs_bits"])
    report.plot_size_vs_top1(fp32, agg, sources, uniform + mixed, paths.PLOTS["size_vs_top1"])
    report.plot_bn_spread(diversity, paths.PLOTS["bn_spread"])
    spec = meta["input_spec"]
    samples = {s: load_torch(paths.batches(paths.calib_set(set_name(s, seeds[0])))[0])[:8] for s in sources}
    report.plot_sample_grid(samples, spec["mean"], spec["std"], paths.PLOTS["samples"])
    print(table)


if __name__ == "__main__":
    main()
