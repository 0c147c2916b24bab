"""Stage evaluate@<source>-<seed>-<bits> (and evaluate_mixed@<source>-<seed>-<cell>, evaluate_finetune): top-1/top-5
of the calibrated fake-quant model on the test set (top1, top5) and on the validation split (val_top1, val_top5:
training images disjoint from the real pool, where choices are made), the size of its quantized weights (each layer
at its own bits) and what decided the numbers (env: torch build, CPU, threads, device)."""

import sys

from dfq.pipeline import paths
from stages._common import device, read_params, save_metrics, setup_torch, workers

RECORDED = ("protocol", "rounding", "weight_scheme", "weight_range", "act_method", "edges")  # edges: genie's only


def main(calib_set: str, bits: str) -> None:
    batch_size = read_params().evaluate.batch_size
    setup_torch()
    from dfq.cells import cell_name, parse_set
    from dfq.fp32.datasets import InputSpec
    from dfq.fp32.evaluate import split_accuracy
    from dfq.fp32.models import load_checkpoint
    from dfq.io import load_torch
    from dfq.quant.prepare import load_quantized, weight_size

    cell, (source, seed) = cell_name(calib_set, bits), parse_set(calib_set)
    model, meta = load_checkpoint(paths.FP32)
    ckpt = load_torch(paths.quant_checkpoint(cell))
    gm = load_quantized(model, ckpt)
    spec = InputSpec.from_dict(meta["input_spec"])
    try:
        m = split_accuracy(gm, spec, paths.PREPARED, batch_size, device(), workers(), f"evaluate {cell}")
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    save_metrics(
        {
            **m,
            "source": source,
            "seed": seed,
            "bits": bits,
            **weight_size(gm),
            **{k: ckpt[k] for k in RECORDED if k in ckpt},
        },
        paths.eval_metrics(cell),
    )
    val = f", validation top-1 {m['val_top1']:.2f}%" if "val_top1" in m else ""
    print(f"{cell}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}% (test){val}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.evaluate SET BITS   (e.g. zeroq-s0 w4a4, zeroq-s0 mp4a4)")
    main(sys.argv[1], sys.argv[2])
