"""ONNX Runtime vs fake quant on a pipeline run's model and test set (issue 22 part 1): for each cell, the
ONNX Runtime top-1, the fake-quant top-1, their argmax agreement over the test images, the largest logit
difference and the kernels of ONNX Runtime's optimized graph.

    python docs/studies/export_agreement.py RUN_DIR SET [--protocol brecq] [--scheme asymmetric]
        [--bias int32] [--act-method dsg] [--bits w4a4 w8a8]

RUN_DIR: a pipeline run (models/fp32.pt, data/prepared/, data/calib/SET/).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dfq.cells import parse_bits  # noqa: E402
from dfq.deploy.qdq import to_onnx  # noqa: E402
from dfq.deploy.runtime import integer_report, optimized_ops, run, session  # noqa: E402
from dfq.fp32.datasets import InputSpec, open_eval_dataset  # noqa: E402
from dfq.fp32.evaluate import make_loader  # noqa: E402
from dfq.fp32.models import load_checkpoint  # noqa: E402
from dfq.io import load_torch  # noqa: E402
from dfq.quant.observers import make_observer  # noqa: E402
from dfq.quant.bias import round_biases  # noqa: E402
from dfq.quant.prepare import calibrate, prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("set")
    ap.add_argument("--protocol", default="brecq")
    ap.add_argument("--scheme", default="asymmetric")
    ap.add_argument("--weight-range", default="minmax")
    ap.add_argument("--bias", default="int32", choices=("int32", "float"))
    ap.add_argument("--act-method", default="dsg")
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w8a8"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    meta = json.loads((a.run / "data/prepared/meta.json").read_text())
    spec = InputSpec.from_dict(meta["input_spec"])
    loader = make_loader(open_eval_dataset(a.run / "data/prepared/eval", spec), 500)
    batches = [load_torch(f) for f in sorted((a.run / "data/calib" / a.set).glob("batch_*.pt"))]
    for bits in a.bits:
        model, _ = load_checkpoint(a.run / "models/fp32.pt")
        gm = prepare(model, *parse_bits(bits), lambda: make_observer(a.act_method), a.protocol, a.scheme, a.weight_range)
        calibrate(gm, batches)
        if a.bias == "int32":
            round_biases(gm)
        data, records = to_onnx(gm, (1, *spec.shape), a.protocol)
        sess = session(data, 1)
        hits_fq = hits_ort = agree = n = 0
        worst = 0.0
        with torch.no_grad():
            for x, y in loader:
                ref, out = gm(x), run(sess, x.float().contiguous())
                hits_fq += int((ref.argmax(1) == y).sum())
                hits_ort += int((out.argmax(1) == y).sum())
                agree += int((ref.argmax(1) == out.argmax(1)).sum())
                worst = max(worst, float((ref - out).abs().max()))
                n += len(y)
        rep = integer_report(optimized_ops(data))
        kernels = sorted({r["kernel"] for r in records})
        print(json.dumps({"set": a.set, "bits": bits, "protocol": a.protocol, "scheme": a.scheme, "bias": a.bias,
                          "act_method": a.act_method, "images": n, "fakequant_top1": 100 * hits_fq / n,
                          "onnx_top1": 100 * hits_ort / n, "argmax_agreement": 100 * agree / n,
                          "max_logit_diff": worst, "integer_convs": rep["integer_convs"],
                          "float_convs": rep["float_convs"], "kernels": kernels,
                          "float_layers": [r["layer"] for r in records if r["kernel"].startswith("float")]}), flush=True)


if __name__ == "__main__":
    main()
