"""Stage export@<cell>: the calibrated cell models/quant/<cell>.pt as an ONNX QDQ model with our integers and
scales (models/export/<cell>.onnx), evaluated with ONNX Runtime's integer kernels on the test set
(metrics/export/<cell>.json, next to the fake-quant top-1 of metrics/eval/<cell>.json), and its quantization
map (reports/quant_map/<cell>.md). ONNX Runtime threads: DFQ_THREADS (environment, default 1)."""

import json
import os
import sys

from dfq.pipeline import paths
from stages._common import read_params, save_metrics, setup_torch


def _check_inputs(cell: str) -> None:
    """A clear error when the cell's checkpoint or fake-quant metrics are missing."""
    for f in (paths.quant_checkpoint(cell), paths.eval_metrics(cell)):
        if not f.is_file():
            raise SystemExit(
                f"export.cells: {cell}: {f} not found (a cell must be one of generate.sources x "
                "generate.seeds x quantize.bits, calibrated and evaluated)"
            )


def _accuracy(cell: str, ckpt: dict, spec, m: dict, fq: dict) -> dict:
    """ONNX Runtime's accuracy next to the fake-quant model's (metrics/eval), with what the cell was made with."""
    return {
        "cell": cell,
        "bits": ckpt["bits"],
        "protocol": spec.protocol,
        "weight_scheme": spec.weight_scheme,
        "onnx_top1": m["top1"],
        "onnx_top5": m["top5"],
        "fakequant_top1": fq["top1"],
        "top1_diff": m["top1"] - fq["top1"],
        "images": m["images"],
        "ms_per_image": m["ms_per_image"],
    }


def main(cell: str) -> None:
    batch_size = read_params().export.batch_size
    setup_torch()
    from dfq.deploy.qdq import to_onnx
    from dfq.deploy.quant_map import activation_map, quant_map
    from dfq.deploy.runtime import evaluate_onnx, integer_report, optimized_ops, session
    from dfq.fp32.datasets import InputSpec, open_eval_dataset
    from dfq.fp32.evaluate import make_loader
    from dfq.fp32.models import load_checkpoint
    from dfq.io import load_torch, save_text
    from dfq.quant.prepare import QuantSpec, load_quantized

    _check_inputs(cell)
    model, meta = load_checkpoint(paths.FP32)
    ckpt = load_torch(paths.quant_checkpoint(cell))
    gm, spec = load_quantized(model, ckpt), QuantSpec.of_checkpoint(ckpt)
    inputs, out = InputSpec.from_dict(meta["input_spec"]), paths.onnx_model(cell)
    data, records = to_onnx(gm, (1, *inputs.shape), spec.protocol, out)
    threads = int(os.environ.get("DFQ_THREADS", "0") or 0) or 1
    report = integer_report(optimized_ops(data, threads))
    floats = [r["layer"] for r in records if r["kernel"].startswith("float")]
    print(f"{cell}: float conv/linear layers in ONNX Runtime's optimized graph: {', '.join(floats) or 'none'}")
    ops = f"integer ops {report['integer_ops']}, float ops {report['float_ops']}"
    print(f"{cell}: {out} ({len(data) / 1e6:.2f} MB); {ops}")
    loader = make_loader(open_eval_dataset(paths.PREPARED / "eval", inputs), batch_size)
    m = evaluate_onnx(session(data, threads), loader)
    fq = json.loads(paths.eval_metrics(cell).read_text())
    run = {"batch_size": batch_size, "ort_threads": threads, "onnx_bytes": len(data), "onnx_path": str(out)}
    save_metrics({**_accuracy(cell, ckpt, spec, m, fq), **run, **report}, paths.export_metrics(cell))
    title = f"{cell} ({ckpt['bits']}, protocol {spec.protocol}, weights {spec.weight_scheme})"
    save_text(quant_map(records, activation_map(gm), report, title), paths.quant_map(cell))
    print(
        f"{cell}: ONNX Runtime top-1 {m['top1']:.2f}% (fake quant {fq['top1']:.2f}%, "
        f"diff {m['top1'] - fq['top1']:+.2f}), {m['ms_per_image']:.3f} ms/image at batch {batch_size}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.export CELL   (e.g. zeroq-s0-w8a8)")
    main(sys.argv[1])
