"""Stage evaluate@<source>-<seed>-<bits> (and evaluate_mixed@<source>-<seed>-<cell>): top-1/top-5 of the calibrated
fake-quant model on the test set, and the size of its quantized weights (each layer at its own bits)."""
import sys
from pathlib import Path

from stages._common import device, load_params, setup_torch, workers


def main(source: str, bits: str) -> None:
    p = load_params("evaluate")
    setup_torch()
    from dfq.datasets import InputSpec, open_eval_dataset
    from dfq.evaluate import evaluate, make_loader
    from dfq.io import load_torch, save_json
    from dfq.models import load_checkpoint
    from dfq.quantize import load_quantized, weight_size

    model, meta = load_checkpoint("models/fp32.pt")
    ckpt = load_torch(Path("models/quant") / f"{source}-{bits}.pt")
    gm = load_quantized(model, ckpt)
    spec = InputSpec.from_dict(meta["input_spec"])
    loader = make_loader(open_eval_dataset("data/prepared/eval", spec), p["batch_size"], workers())
    m = evaluate(gm, loader, device(), desc=f"evaluate {source}-{bits}")
    name, _, seed = source.rpartition("-s")  # the calibration set <source>-s<seed>
    save_json({"top1": m["top1"], "top5": m["top5"], "source": name, "seed": int(seed), "bits": bits, **weight_size(gm),
               **{k: ckpt[k] for k in ("protocol", "rounding", "weight_scheme", "weight_range", "act_method")
                  if k in ckpt}},
              Path("metrics/eval") / f"{source}-{bits}.json")
    print(f"{source}-{bits}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.evaluate SET BITS   (e.g. zeroq-s0 w4a4, zeroq-s0 mp4a4)")
    main(sys.argv[1], sys.argv[2])
