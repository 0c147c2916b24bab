"""Stage evaluate@<source>-<seed>-<bits> (and evaluate_mixed@<source>-<seed>-<cell>, evaluate_finetune): top-1/top-5
of the calibrated fake-quant model on the test set (top1, top5) and on the validation split (val_top1, val_top5:
training images disjoint from the real pool, where choices are made), the size of its quantized weights (each layer
at its own bits) and what decided the numbers (env: torch build, CPU, threads, device)."""
import sys
from pathlib import Path

from stages._common import accuracy, load_params, save_metrics, setup_torch


def main(source: str, bits: str) -> None:
    p = load_params("evaluate")
    setup_torch()
    from dfq.fp32.datasets import InputSpec
    from dfq.io import load_torch
    from dfq.fp32.models import load_checkpoint
    from dfq.quant.prepare import load_quantized, weight_size

    model, meta = load_checkpoint("models/fp32.pt")
    ckpt = load_torch(Path("models/quant") / f"{source}-{bits}.pt")
    gm = load_quantized(model, ckpt)
    m = accuracy(gm, InputSpec.from_dict(meta["input_spec"]), p["batch_size"], f"evaluate {source}-{bits}")
    name, _, seed = source.rpartition("-s")  # the calibration set <source>-s<seed>
    save_metrics({**m, "source": name, "seed": int(seed), "bits": bits, **weight_size(gm),
                  **{k: ckpt[k] for k in ("protocol", "rounding", "weight_scheme", "weight_range", "act_method")
                     if k in ckpt}},
                 Path("metrics/eval") / f"{source}-{bits}.json")
    val = f", validation top-1 {m['val_top1']:.2f}%" if "val_top1" in m else ""
    print(f"{source}-{bits}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}% (test){val}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.evaluate SET BITS   (e.g. zeroq-s0 w4a4, zeroq-s0 mp4a4)")
    main(sys.argv[1], sys.argv[2])
