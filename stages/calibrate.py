"""Stage calibrate@<source>-<seed>-<bits> (and calibrate_mixed@<source>-<seed>-<cell>): fake-quant model calibrated
(and optionally reconstructed) on one calibration set (data/calib/<source>-s<seed>).

A mixed cell mp<B>a<A> takes its per-layer weight bits from the exact allocation under B average bits of
the sensitivity stage's measurements (metrics/sensitivity/<source>-s<seed>.json); the allocation goes into
the checkpoint and metrics/calibrate/<source>-s<seed>-<cell>.json.

quantize.protocol picks the quantizer layout (zeroq | brecq), quantize.rounding the weight rounding (nearest |
adaround | brecq | qdrop | genie; on the set's cached tensors), quantize.bias int32 or float biases.
"""

import sys
import time

from dfq.pipeline import paths
from stages._common import device, read_params, save_metrics, setup_torch


def main(calib_set: str, bits: str) -> None:
    q = read_params().quantize
    torch = setup_torch()
    from dfq.cells import cell_name, is_mixed, parse_bits, parse_mixed
    from dfq.fp32.models import load_checkpoint
    from dfq.io import load_torch, save_torch
    from dfq.quant.bias import round_biases
    from dfq.quant.prepare import calibrate, prepare, summary, weight_size
    from dfq.quant.reconstruction import reconstruct
    from dfq.quant.sensitivity import allocate_cell, load_measurement

    try:
        wbits, abits = parse_mixed(bits) if is_mixed(bits) else parse_bits(bits)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model, _ = load_checkpoint(paths.FP32)
    files = paths.batches(paths.calib_set(calib_set))
    if not files:
        raise SystemExit(f"{paths.calib_set(calib_set)}: no calibration batches found")
    layer_bits = alloc = None
    if is_mixed(bits):  # bits of every weight layer: the exact allocation under the cell's budget
        try:
            layer_bits, alloc = allocate_cell(load_measurement(paths.sensitivity_metrics(calib_set), q.spec), bits)
        except (OSError, ValueError) as exc:
            raise SystemExit(str(exc)) from None
    gm = prepare(model, 8 if alloc else wbits, abits, q.observer.make, q.spec, layer_bits)
    start, recon, cell = time.perf_counter(), None, cell_name(calib_set, bits)
    if q.rounding == "nearest":
        n = calibrate(gm, (load_torch(f) for f in files), device(), desc=f"calibrate {cell}")
    else:
        data = torch.cat([load_torch(f) for f in files])
        n = len(data)
        print(f"{cell}: {q.rounding} reconstruction on {n} images", flush=True)
        recon = reconstruct(gm, data, q.rounding, q.reconstruction, device())
    biases = round_biases(gm) if q.spec.bias == "int32" else 0  # on the int32 grid the export writes them on
    seconds, out = time.perf_counter() - start, paths.quant_checkpoint(cell)
    extra = {**({"reconstruction": recon["units"]} if recon else {}), **({"layer_bits": layer_bits} if alloc else {})}
    info = dict(source=calib_set, bits=bits, **q.spec.record(), rounding=q.rounding, act_method=q.observer.act_method)
    info.update(images=n, int32_biases=biases, **summary(gm), **extra)
    save_torch({**info, "state_dict": {k: v.cpu() for k, v in gm.state_dict().items()}}, out)
    # wall time apart from the model, so that an unchanged result stays byte-identical (evaluate skipped)
    spec = {k: v for k, v in q.spec.record().items() if k in ("protocol", "edges")}  # edges: Genie's bit rule
    metrics = dict(seconds=round(seconds, 1), rounding=q.rounding, **spec, images=n)
    save_metrics(
        {**metrics, **weight_size(gm), **({"allocation": alloc} if alloc else {})}, paths.calibrate_metrics(cell)
    )
    if alloc:
        bits_per_layer = " ".join(map(str, layer_bits.values()))
        print(
            f"{cell}: {alloc['avg_bits']:.3f} average weight bits ({alloc['weight_mb']:.4g} MB), summed KL "
            f"{alloc['kl_sum']:.4g}, bits per layer {bits_per_layer}"
        )
    print(
        f"{cell}: {info['weight_layers']} weight layers and {info['act_quantizers']} activations quantized "
        f"(protocol {q.spec.protocol}, rounding {q.rounding}, {n} images, {seconds:.1f} s) -> {out}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.calibrate SET BITS   (e.g. zeroq-s0 w4a4, zeroq-s0 mp4a4)")
    main(sys.argv[1], sys.argv[2])
