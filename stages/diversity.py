"""Stage diversity@<source>: BN-statistic spread per layer and penultimate-feature cosine similarity."""

import sys

from dfq.pipeline import paths
from stages._common import device, save_metrics, setup_torch


def main(calib_set: str) -> None:
    setup_torch()
    from dfq.fp32.models import load_checkpoint
    from dfq.generation.diversity import diagnose
    from dfq.io import load_torch

    model, _ = load_checkpoint(paths.FP32)
    files = paths.batches(paths.calib_set(calib_set))
    if not files:
        raise SystemExit(f"{paths.calib_set(calib_set)}: no calibration batches found")
    try:
        d = diagnose(model, (load_torch(f) for f in files), device())
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    save_metrics({"source": calib_set, **d}, paths.diversity_metrics(calib_set))
    print(
        f"{calib_set}: mean BN-statistic spread {d['bn_spread_mean']:.3f} (per layer "
        f"{', '.join(f'{s:.2f}' for s in d['bn_spread'])}), feature cosine {d['feature_cosine']:.3f}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.diversity SOURCE")
    main(sys.argv[1])
