"""Stage report: reports/results.md, accuracy-vs-bits and sample-grid PNGs."""
import json
from pathlib import Path

from stages._common import load_params, setup_torch


def main() -> None:
    gen_p, quant_p = load_params("generate", "quantize")
    sources, bits = gen_p["sources"], quant_p["bits"]
    setup_torch()
    from dfq import report
    from dfq.io import load_torch

    fp32 = json.loads(Path("metrics/fp32.json").read_text())
    results = {}
    for s in sources:
        for b in bits:
            path = Path("metrics/eval") / f"{s}-{b}.json"
            if not path.is_file():
                raise SystemExit(f"{path}: missing (run the evaluate@{s}-{b} stage first)")
            results[(s, b)] = json.loads(path.read_text())
            calib = Path("metrics/calibrate") / f"{s}-{b}.json"
            results[(s, b)]["calibration_seconds"] = json.loads(calib.read_text())["seconds"] if calib.is_file() else None
    diversity = {s: json.loads((Path("metrics/diversity") / f"{s}.json").read_text()) for s in sources}
    table = report.results_table(fp32, results, sources, bits)
    report.write_text("# Results\n\nTop-1 % (top-5 % in brackets) on the test set, per calibration source "
                      "and bit-width (weights/activations).\n\n" + table
                      + "\n![accuracy vs bits](accuracy_vs_bits.png)\n\n## Quantizer\n\n"
                      + report.calibration_table(results, sources, bits) + "\n## Diversity of the calibration sets\n\n"
                      + report.diversity_table(diversity)
                      + "\n![BN-statistic spread](bn_spread.png)\n\n![samples](samples.png)\n", "reports/results.md")
    report.plot_accuracy_vs_bits(fp32, results, sources, bits, "reports/accuracy_vs_bits.png")
    report.plot_bn_spread(diversity, "reports/bn_spread.png")
    spec = json.loads(Path("data/prepared/meta.json").read_text())["input_spec"]
    samples = {s: load_torch(sorted(Path("data/calib", s).glob("batch_*.pt"))[0])[:8] for s in sources}
    report.plot_sample_grid(samples, spec["mean"], spec["std"], "reports/samples.png")
    print(table)


if __name__ == "__main__":
    main()
