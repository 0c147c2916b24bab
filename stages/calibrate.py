"""Stage calibrate@<source>-<bits>: fake-quant model (ZeroQ/DSG protocol) calibrated on one source."""
import sys
from pathlib import Path

from stages._common import device, load_params, setup_torch


def main(source: str, bits: str) -> None:
    q = load_params("quantize")
    setup_torch()
    from dfq.io import load_torch, save_torch
    from dfq.models import load_checkpoint
    from dfq.observers import make_observer
    from dfq.quantize import calibrate, prepare, summary
    from dfq.quantizers import parse_bits

    try:
        wbits, abits = parse_bits(bits)
        make_observer(q["act_method"])  # validate the method before any work
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model, meta = load_checkpoint("models/fp32.pt")
    files = sorted(Path("data/calib", source).glob("batch_*.pt"))
    if not files:
        raise SystemExit(f"data/calib/{source}: no calibration batches found")
    gm = prepare(model, wbits, abits,
                 lambda: make_observer(q["act_method"], percentile=q["percentile"], ema_momentum=q["ema_momentum"]))
    n = calibrate(gm, (load_torch(f) for f in files), device(), desc=f"calibrate {source}-{bits}")
    info = {"source": source, "bits": bits, "act_method": q["act_method"], "images": n, **summary(gm)}
    out = Path("models/quant") / f"{source}-{bits}.pt"
    save_torch({**info, "state_dict": {k: v.cpu() for k, v in gm.state_dict().items()}}, out)
    print(f"{source}-{bits}: {info['weight_layers']} weight layers and {info['act_quantizers']} activations "
          f"quantized ({q['act_method']}, {n} images) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.calibrate SOURCE BITS   (e.g. zeroq w4a4)")
    main(sys.argv[1], sys.argv[2])
