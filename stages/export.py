"""Stage export@<cell>: the calibrated cell models/quant/<cell>.pt as an ONNX QDQ model with our integers and
scales (models/export/<cell>.onnx), evaluated with ONNX Runtime's integer kernels on the test set
(metrics/export/<cell>.json, next to the fake-quant top-1 of metrics/eval/<cell>.json), and its quantization
map (reports/quant_map/<cell>.md). ONNX Runtime threads: DFQ_THREADS (environment, default 1)."""
import json
import os
import sys
from pathlib import Path

from stages._common import load_params, save_metrics, setup_torch


def main(cell: str) -> None:
    p = load_params("export")
    setup_torch()
    from dfq.fp32.datasets import InputSpec, open_eval_dataset
    from dfq.fp32.evaluate import make_loader
    from dfq.deploy.export import activation_map, evaluate_onnx, integer_report, optimized_ops, quant_map, session, to_onnx
    from dfq.io import load_torch, save_text
    from dfq.fp32.models import load_checkpoint
    from dfq.quant.prepare import load_quantized

    qpath, epath = Path("models/quant") / f"{cell}.pt", Path("metrics/eval") / f"{cell}.json"
    for f in (qpath, epath):
        if not f.is_file():
            raise SystemExit(f"export.cells: {cell}: {f} not found (a cell must be one of generate.sources x "
                             "generate.seeds x quantize.bits, calibrated and evaluated)")
    model, meta = load_checkpoint("models/fp32.pt")
    ckpt = load_torch(qpath)
    gm = load_quantized(model, ckpt)
    spec = InputSpec.from_dict(meta["input_spec"])
    out = Path("models/export") / f"{cell}.onnx"
    data, records = to_onnx(gm, (1, *spec.shape), ckpt.get("protocol", "zeroq"), out)
    threads = int(os.environ.get("DFQ_THREADS", "0") or 0) or 1
    report = integer_report(optimized_ops(data, threads))
    floats = [r["layer"] for r in records if r["kernel"].startswith("float")]
    print(f"{cell}: float conv/linear layers in ONNX Runtime's optimized graph: {', '.join(floats) or 'none'}")
    print(f"{cell}: {out} ({len(data) / 1e6:.2f} MB); integer ops {report['integer_ops']}, float ops {report['float_ops']}")
    loader = make_loader(open_eval_dataset("data/prepared/eval", spec), p["batch_size"])
    m = evaluate_onnx(session(data, threads), loader)
    fq = json.loads(epath.read_text())
    save_metrics({"cell": cell, "bits": ckpt["bits"], "protocol": ckpt.get("protocol", "zeroq"),
               "weight_scheme": ckpt.get("weight_scheme", "asymmetric"),
               "onnx_top1": m["top1"], "onnx_top5": m["top5"], "fakequant_top1": fq["top1"],
               "top1_diff": m["top1"] - fq["top1"], "images": m["images"],
               "ms_per_image": m["ms_per_image"], "batch_size": p["batch_size"], "ort_threads": threads,
               "onnx_bytes": len(data), "onnx_path": str(out), **report},
              Path("metrics/export") / f"{cell}.json")
    save_text(quant_map(records, activation_map(gm), report, f"{cell} ({ckpt['bits']}, protocol "
                        f"{ckpt.get('protocol', 'zeroq')}, weights {ckpt.get('weight_scheme', 'asymmetric')})"),
              Path("reports/quant_map") / f"{cell}.md")
    print(f"{cell}: ONNX Runtime top-1 {m['top1']:.2f}% (fake quant {fq['top1']:.2f}%, "
          f"diff {m['top1'] - fq['top1']:+.2f}), {m['ms_per_image']:.3f} ms/image at batch {p['batch_size']}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.export CELL   (e.g. zeroq-s0-w8a8)")
    main(sys.argv[1])
