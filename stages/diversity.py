"""Stage diversity@<source>: BN-statistic spread per layer and penultimate-feature cosine similarity."""
import sys
from pathlib import Path

from stages._common import device, save_metrics, setup_torch


def main(source: str) -> None:
    setup_torch()
    from dfq.generation.diversity import diagnose
    from dfq.io import load_torch
    from dfq.fp32.models import load_checkpoint

    model, _ = load_checkpoint("models/fp32.pt")
    files = sorted(Path("data/calib", source).glob("batch_*.pt"))
    if not files:
        raise SystemExit(f"data/calib/{source}: no calibration batches found")
    try:
        d = diagnose(model, (load_torch(f) for f in files), device())
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    save_metrics({"source": source, **d}, Path("metrics/diversity") / f"{source}.json")
    print(f"{source}: mean BN-statistic spread {d['bn_spread_mean']:.3f} (per layer "
          f"{', '.join(f'{s:.2f}' for s in d['bn_spread'])}), feature cosine {d['feature_cosine']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.diversity SOURCE")
    main(sys.argv[1])
