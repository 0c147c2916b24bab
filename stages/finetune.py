"""Stage finetune@<source>-<seed>-<bits>: the calibrated cell models/quant/<source>-s<seed>-<bits>.pt distilled from
the FP32 model on finetune.num_images synthetic images (the calibration set, data/calib/<set>, then the extra
batches of data/finetune/<set>), written as the cell <bits>-ft (models/quant/<set>-<bits>-ft.pt), which evaluate,
report, track and export treat like any other. An int32-bias cell gets its biases back on the int32 grid.
Resumable: each epoch's training state is written atomically in .dfq-scratch/finetune/; a rerun continues it.
"""
import shutil
import sys
from pathlib import Path

from stages._common import device, load_params, provenance, setup_torch


def main(name: str, bits: str) -> None:
    p = load_params("finetune")
    torch = setup_torch()
    from dfq.generation import sharding
    from dfq.quant.finetune import FinetuneConfig, finetune
    from dfq.io import load_torch, save_json, save_torch
    from dfq.fp32.models import load_checkpoint
    from dfq.quant.prepare import load_quantized

    cell = Path("models/quant") / f"{name}-{bits}.pt"
    files = [f for d in ("data/calib", "data/finetune") for f in sorted(Path(d, name).glob("batch_*.pt"))]
    if not cell.is_file() or not files:
        raise SystemExit(f"finetune@{name}-{bits}: needs {cell} and data/calib/{name} (run calibrate and generate)")
    images = torch.cat([load_torch(f) for f in files])[: p["num_images"]]
    if len(images) < p["num_images"]:
        raise SystemExit(f"finetune.num_images={p['num_images']}: only {len(images)} images in data/calib/{name} "
                         f"and data/finetune/{name} (rerun generate_finetune@{name.replace('-s', '-')})")
    cfg = FinetuneConfig(**p["train"])
    teacher, _ = load_checkpoint("models/fp32.pt")
    ckpt = load_torch(cell)
    student = load_quantized(load_checkpoint("models/fp32.pt")[0], ckpt)
    key = sharding.scratch_key({"cfg": p["train"], "threads": torch.get_num_threads(), "n": len(images)},
                               ["models/fp32.pt", cell, "dfq/quant/finetune.py", *files])
    scratch = Path(".dfq-scratch", "finetune", f"{name}-{bits}-{key}")
    scratch.mkdir(parents=True, exist_ok=True)
    if (scratch / "state.pt").is_file():
        print(f"resuming from {scratch / 'state.pt'}", flush=True)
    print(f"{name}-{bits}: fine-tuning on {len(images)} images, {cfg.epochs} epochs", flush=True)
    # an int32-bias cell gets its biases back on the int32 grid inside finetune, before kl_end is measured
    result = finetune(student, teacher, images, cfg, device(), scratch / "state.pt",
                      int32_biases=ckpt.get("bias") == "int32")
    biases = result["int32_biases"]
    out = Path("models/quant") / f"{name}-{bits}-ft.pt"
    save_torch({**{k: v for k, v in ckpt.items() if k != "state_dict"}, "rounding": "finetune",
                "finetune_from": ckpt.get("rounding", "nearest"), "finetune": p["train"], "images": len(images),
                "int32_biases": biases, "state_dict": {k: v.cpu() for k, v in student.state_dict().items()}}, out)
    save_json({"seconds": round(result["seconds"], 1), "rounding": "finetune", **result,
               "finetune_from": ckpt.get("rounding", "nearest"), "env": provenance()},
              Path("metrics/finetune") / f"{name}-{bits}-ft.json")
    shutil.rmtree(scratch)
    print(f"{name}-{bits}: KL {result['kl_start']:.4f} -> {result['kl_end']:.4f} on the fine-tuning images "
          f"({result['seconds']:.0f} s) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.finetune SET BITS   (e.g. zeroq-s0 w4a4)")
    main(sys.argv[1], sys.argv[2])
