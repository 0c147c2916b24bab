"""Stage sensitivity@<source>-<seed>: per weight layer and candidate bit-width (quantize.mixed.candidates), the
KL divergence between the FP32 softmax and that of the model with only that layer's weights quantized,
on one calibration set (data/calib/<source>-s<seed>); the Pareto frontier of size vs summed KL.

Writes metrics/sensitivity/<source>-s<seed>.json (read by calibrate_mixed) and the heat map + frontier
reports/sensitivity/<source>-s<seed>.png. The wall time is printed, not saved: an unchanged result stays
byte-identical, so the mixed cells downstream are not rerun.
"""

import sys
import time

from dfq.pipeline import paths
from stages._common import device, read_params, save_metrics, setup_torch


def main(calib_set: str) -> None:
    q = read_params().quantize
    setup_torch()
    from dfq.fp32.models import load_checkpoint
    from dfq.io import load_torch
    from dfq.quant import sensitivity

    model, _ = load_checkpoint(paths.FP32)
    files = paths.batches(paths.calib_set(calib_set))
    if not files:
        raise SystemExit(f"{paths.calib_set(calib_set)}: no calibration batches found")
    start = time.perf_counter()
    sens = sensitivity.measure(
        model, [load_torch(f) for f in files], q.mixed.candidates, q.spec, device(), desc=f"sensitivity {calib_set}"
    )
    seconds = time.perf_counter() - start
    front = sensitivity.frontier_of(sens)
    n = sum(r["params"] for r in sens["layers"] if r["fixed_bits"] is None)
    save_metrics(
        {
            "set": calib_set,
            **sens,
            "allocatable_params": n,
            "uniform_kl_sum": {str(b): v for b, v in sensitivity.uniform_costs(sens).items()},
            "frontier": {"avg_bits": (front.sizes / n).tolist(), "kl_sum": front.costs.tolist()},
        },
        paths.sensitivity_metrics(calib_set),
    )
    title = f"{calib_set}: weight sensitivity ({q.spec.protocol} protocol, {sens['images']} images)"
    sensitivity.plot(sens, front, title, paths.sensitivity_plot(calib_set))
    print(sensitivity.frontier_table(sens, front))
    print(
        f"{calib_set}: {len(sens['layers'])} weight layers x {len(sens['candidates'])} bit-widths on "
        f"{sens['images']} images in {seconds:.1f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.sensitivity SET   (e.g. zeroq-s0)")
    main(sys.argv[1])
