"""The Genie study's table (docs/results/2026-12-06-genie.md) from the evaluate metrics of its runs.

`python docs/studies/2026-12-06/genie_table.py OUT.csv [--protocol P] RUN_DIR[=LABEL]...`: each RUN_DIR is a
clone that ran profiles/cifar10-resnet20-genie.yaml with one quantize.rounding; every metrics/eval/*.json there
becomes a CSV row, its rounding column LABEL when given (the study's commit predates `edges` in evaluate's
metrics). The table prints test and validation top-1, mean +- std (sample std) over the seeds, per bits x
rounding x source, with the number of seeds. Only cells of protocol P (default brecq) are read (a study clone
also holds the default pipeline's committed zeroq-protocol metrics); `--protocol zeroq` over a clone of the
default pipeline with more sources and seeds tabulates the default model.
"""

import json
import sys
from pathlib import Path

import pandas as pd


def main(out: str, *runs: str) -> None:
    protocol = "brecq"
    if runs[:1] == ("--protocol",):
        protocol, runs = runs[1], runs[2:]
    rows = []
    for arg in runs:
        run, _, label = arg.partition("=")
        for f in sorted(Path(run, "metrics", "eval").glob("*.json")):
            m = json.loads(f.read_text())
            if m.get("protocol") != protocol:
                continue
            row = {k: m.get(k) for k in ("source", "seed", "bits", "rounding", "top1", "val_top1")}
            row["rounding"] = label or row["rounding"]
            rows.append(row)
    # a clone copied from another (the W2A4 clones from the W3A3 ones) holds that one's cells too: each cell once
    df = pd.DataFrame(rows).drop_duplicates().sort_values(["bits", "rounding", "source", "seed"])
    df.to_csv(out, index=False)
    g = df.groupby(["bits", "rounding", "source"])
    table = g.agg(n=("seed", "count"), top1=("top1", "mean"), sd=("top1", "std"), val=("val_top1", "mean"))
    table["val_sd"] = g["val_top1"].std()
    for (bits, rounding, source), r in table.iterrows():
        test, val = f"{r.top1:.2f} ± {r.sd:.2f}", f"{r.val:.2f} ± {r.val_sd:.2f}"
        print(f"| {bits} | {rounding} | {source} | {test} | {val} | {int(r.n)} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
