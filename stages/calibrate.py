"""Stage calibrate@<source>-<seed>-<bits> (and calibrate_mixed@<source>-<seed>-<cell>): fake-quant model calibrated
(and optionally reconstructed) on one calibration set (data/calib/<source>-s<seed>).

A mixed cell mp<B>a<A> takes its per-layer weight bits from the exact allocation under B average bits of
the sensitivity stage's measurements (metrics/sensitivity/<source>-s<seed>.json); the allocation goes into
the checkpoint and metrics/calibrate/<source>-s<seed>-<cell>.json.

quantize.protocol picks the quantizer layout (zeroq | brecq), quantize.rounding the weight rounding (nearest |
adaround | brecq | qdrop; on the set's cached tensors), quantize.bias int32 or float biases.
"""
import sys
import time
from pathlib import Path

from stages._common import device, load_params, save_metrics, setup_torch


def main(source: str, bits: str) -> None:
    q = load_params("quantize")
    torch = setup_torch()
    from dfq.io import load_torch, save_torch
    from dfq.fp32.models import load_checkpoint
    from dfq.quant.observers import make_observer
    from dfq.quant.prepare import calibrate, prepare, round_biases, summary, weight_size
    from dfq.cells import is_mixed, parse_bits, parse_mixed
    from dfq.quant.reconstruction import ReconConfig, reconstruct

    try:
        wbits, abits = parse_mixed(bits) if is_mixed(bits) else parse_bits(bits)
        make_observer(q["act_method"])  # validate the method before any work
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model, meta = load_checkpoint("models/fp32.pt")
    files = sorted(Path("data/calib", source).glob("batch_*.pt"))
    if not files:
        raise SystemExit(f"data/calib/{source}: no calibration batches found")
    layer_bits = alloc = None
    if is_mixed(bits):  # bits of every weight layer: the exact allocation under the cell's budget
        from dfq.quant.sensitivity import allocate_cell, load_measurement  # not a dep of uniform cells
        try:
            layer_bits, alloc = allocate_cell(load_measurement(
                f"metrics/sensitivity/{source}.json", q["protocol"], q["weight_scheme"], q["weight_range"]), bits)
        except (OSError, ValueError) as exc:
            raise SystemExit(str(exc)) from None
    gm = prepare(model, 8 if alloc else wbits, abits,
                 lambda: make_observer(q["act_method"], percentile=q["percentile"], ema_momentum=q["ema_momentum"]),
                 q["protocol"], q["weight_scheme"], q["weight_range"], layer_bits)
    start = time.perf_counter()
    recon = None
    if q["rounding"] == "nearest":
        n = calibrate(gm, (load_torch(f) for f in files), device(), desc=f"calibrate {source}-{bits}")
    else:
        data = torch.cat([load_torch(f) for f in files])
        n = len(data)
        print(f"{source}-{bits}: {q['rounding']} reconstruction on {n} images", flush=True)
        recon = reconstruct(gm, data, q["rounding"], ReconConfig(**q["reconstruction"]), device())
    biases = round_biases(gm) if q["bias"] == "int32" else 0  # on the int32 grid dfq.deploy.export writes them on
    seconds = time.perf_counter() - start
    info = {"source": source, "bits": bits, "protocol": q["protocol"], "weight_scheme": q["weight_scheme"],
            "weight_range": q["weight_range"], "bias": q["bias"], "rounding": q["rounding"],
            "act_method": q["act_method"], "images": n, "int32_biases": biases, **summary(gm),
            **({"reconstruction": recon["units"]} if recon else {}), **({"layer_bits": layer_bits} if alloc else {})}
    out = Path("models/quant") / f"{source}-{bits}.pt"
    save_torch({**info, "state_dict": {k: v.cpu() for k, v in gm.state_dict().items()}}, out)
    # wall time apart from the model, so that an unchanged result stays byte-identical (evaluate skipped)
    save_metrics({"seconds": round(seconds, 1), "rounding": q["rounding"], "protocol": q["protocol"], "images": n,
                  **weight_size(gm), **({"allocation": alloc} if alloc else {})},
                 Path("metrics/calibrate") / f"{source}-{bits}.json")
    if alloc:
        print(f"{source}-{bits}: {alloc['avg_bits']:.3f} average weight bits ({alloc['weight_mb']:.4g} MB), summed KL {alloc['kl_sum']:.4g}, "
              f"bits per layer {' '.join(map(str, layer_bits.values()))}")
    print(f"{source}-{bits}: {info['weight_layers']} weight layers and {info['act_quantizers']} activations "
          f"quantized (protocol {q['protocol']}, rounding {q['rounding']}, {n} images, {seconds:.1f} s) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.calibrate SET BITS   (e.g. zeroq-s0 w4a4, zeroq-s0 mp4a4)")
    main(sys.argv[1], sys.argv[2])
