"""Stage calibrate@<source>-<seed>-<bits>: fake-quant model calibrated (and optionally reconstructed) on one
calibration set (data/calib/<source>-s<seed>).

quantize.protocol picks the quantizer layout (zeroq | brecq), quantize.rounding the weight rounding
(nearest | adaround | brecq | qdrop); reconstruction reads the cached synthetic tensors of the source.
"""
import sys
import time
from pathlib import Path

from stages._common import device, load_params, setup_torch


def main(source: str, bits: str) -> None:
    q = load_params("quantize")
    torch = setup_torch()
    from dfq.io import load_torch, save_json, save_torch
    from dfq.models import load_checkpoint
    from dfq.observers import make_observer
    from dfq.quantize import calibrate, prepare, summary
    from dfq.quantizers import parse_bits
    from dfq.reconstruction import ReconConfig, reconstruct

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
                 lambda: make_observer(q["act_method"], percentile=q["percentile"], ema_momentum=q["ema_momentum"]),
                 q["protocol"], q["weight_scheme"], q["weight_range"])
    start = time.perf_counter()
    recon = None
    if q["rounding"] == "nearest":
        n = calibrate(gm, (load_torch(f) for f in files), device(), desc=f"calibrate {source}-{bits}")
    else:
        data = torch.cat([load_torch(f) for f in files])
        n = len(data)
        print(f"{source}-{bits}: {q['rounding']} reconstruction on {n} images", flush=True)
        recon = reconstruct(gm, data, q["rounding"], ReconConfig(**q["reconstruction"]), device())
    seconds = time.perf_counter() - start
    info = {"source": source, "bits": bits, "protocol": q["protocol"], "weight_scheme": q["weight_scheme"],
            "weight_range": q["weight_range"], "rounding": q["rounding"], "act_method": q["act_method"], "images": n,
            **summary(gm),
            **({"reconstruction": recon["units"]} if recon else {})}
    out = Path("models/quant") / f"{source}-{bits}.pt"
    save_torch({**info, "state_dict": {k: v.cpu() for k, v in gm.state_dict().items()}}, out)
    # wall time apart from the model, so that an unchanged result stays byte-identical (evaluate skipped)
    save_json({"seconds": round(seconds, 1), "rounding": q["rounding"], "protocol": q["protocol"], "images": n},
              Path("metrics/calibrate") / f"{source}-{bits}.json")
    print(f"{source}-{bits}: {info['weight_layers']} weight layers and {info['act_quantizers']} activations "
          f"quantized (protocol {q['protocol']}, rounding {q['rounding']}, {n} images, {seconds:.1f} s) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.calibrate SET BITS   (e.g. zeroq-s0 w4a4)")
    main(sys.argv[1], sys.argv[2])
