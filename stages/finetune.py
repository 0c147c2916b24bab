"""Stage finetune@<source>-<seed>-<bits>: the calibrated cell models/quant/<source>-s<seed>-<bits>.pt distilled from
the FP32 model on finetune.num_images synthetic images (the calibration set, data/calib/<set>, then the extra
batches of data/finetune/<set>), written as the cell <bits>-ft (models/quant/<set>-<bits>-ft.pt), which evaluate,
report, track and export treat like any other. An int32-bias cell gets its biases back on the int32 grid.
Resumable: each epoch's training state is written atomically in .dfq-scratch/finetune/; a rerun continues it.
"""

import shutil
import sys

from dfq.pipeline import paths
from stages._common import device, provenance, read_params, scratch_key, setup_torch


def main(calib_set: str, bits: str) -> None:
    params = read_params()
    p, given = params.finetune, params.raw["finetune"]["train"]  # given: recorded in the checkpoint as written
    torch = setup_torch()
    from dfq.cells import cell_name, finetuned
    from dfq.fp32.models import load_checkpoint
    from dfq.io import load_torch, save_json, save_torch
    from dfq.quant.finetune import finetune
    from dfq.quant.prepare import QuantSpec, load_quantized

    cell, out_cell, calib, extra = (
        cell_name(calib_set, bits),
        cell_name(calib_set, finetuned(bits)),
        paths.calib_set(calib_set),
        paths.finetune_set(calib_set),
    )
    ckpt_path, files = paths.quant_checkpoint(cell), paths.batches(calib) + paths.batches(extra)
    if not ckpt_path.is_file() or not files:
        raise SystemExit(f"finetune@{cell}: needs {ckpt_path} and {calib} (run calibrate and generate)")
    images = torch.cat([load_torch(f) for f in files])[: p.num_images]
    if len(images) < p.num_images:
        rerun = f"rerun generate_finetune@{calib_set.replace('-s', '-')}"
        raise SystemExit(
            f"finetune.num_images={p.num_images}: only {len(images)} images in {calib} and {extra} ({rerun})"
        )
    teacher, ckpt = load_checkpoint(paths.FP32)[0], load_torch(ckpt_path)
    student = load_quantized(load_checkpoint(paths.FP32)[0], ckpt)
    spec = {"cfg": given, "threads": torch.get_num_threads(), "n": len(images)}
    scratch = (
        paths.SCRATCH / "finetune" / f"{cell}-{scratch_key('stages.finetune', spec, [paths.FP32, ckpt_path, *files])}"
    )
    scratch.mkdir(parents=True, exist_ok=True)
    if (scratch / "state.pt").is_file():
        print(f"resuming from {scratch / 'state.pt'}", flush=True)
    print(f"{cell}: fine-tuning on {len(images)} images, {p.train.epochs} epochs", flush=True)
    # an int32-bias cell gets its biases back on the int32 grid inside finetune, before kl_end is measured
    int32 = QuantSpec.of_checkpoint(ckpt).bias == "int32"
    result = finetune(student, teacher, images, p.train, device(), scratch / "state.pt", int32_biases=int32)
    out, start = paths.quant_checkpoint(out_cell), ckpt.get("rounding", "nearest")
    record = {k: v for k, v in ckpt.items() if k != "state_dict"}
    record.update(rounding="finetune", finetune_from=start, finetune=given, images=len(images))
    record.update(int32_biases=result["int32_biases"], state_dict={k: v.cpu() for k, v in student.state_dict().items()})
    save_torch(record, out)
    summary = {"seconds": round(result["seconds"], 1), "rounding": "finetune", **result}  # as before: **result wins
    save_json({**summary, "finetune_from": start, "env": provenance()}, paths.calibrate_metrics(out_cell))
    shutil.rmtree(scratch)
    kl = f"KL {result['kl_start']:.4f} -> {result['kl_end']:.4f}"
    print(f"{cell}: {kl} on the fine-tuning images ({result['seconds']:.0f} s) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.finetune SET BITS   (e.g. zeroq-s0 w4a4)")
    main(sys.argv[1], sys.argv[2])
