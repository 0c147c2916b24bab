"""Stage generate@<source>: calibration images in the model's normalised input space, one file per batch.

Sources: gaussian (N(0, 1) noise), zeroq (BN-statistic matching), dsg (slack margins + layerwise
sample enhancement; its margins are saved beside each batch) and real (the data stage's subset).
Batch i is made from the seed derived from (generate.seed, i), so batches are independent.
"""
import sys
from pathlib import Path

from stages._common import device, load_params, setup_torch


def main(source: str) -> None:
    data_p, gen_p = load_params("data", "generate")
    setup_torch()
    from dfq import generators
    from dfq.io import load_torch
    from dfq.models import count_bn, load_checkpoint

    if source not in gen_p or not isinstance(gen_p[source], dict):
        raise SystemExit(f"generate source {source!r} has no params group generate.{source} in params.yaml")
    cfg = gen_p[source]
    try:
        method = generators.method_of(source, cfg)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model, meta = load_checkpoint("models/fp32.pt")
    model.to(device())
    sizes, note = generators.plan_batches(source, data_p["num_images"], gen_p["batch_size"], cfg, count_bn(model))
    if note:
        print(note, flush=True)
    shape = tuple(meta["input_spec"]["shape"])
    real = load_torch("data/prepared/calib_real.pt") if method == "real" else None
    try:
        write_batches(source, method, cfg, gen_p, sizes, shape, model, real, note)
    except (ValueError, FloatingPointError) as exc:
        raise SystemExit(f"generate@{source}: {exc} (nothing was written)") from None
    print(f"{source}: {sum(sizes)} images in {len(sizes)} batches -> data/calib/{source}/")


def write_batches(source, method, cfg, gen_p, sizes, shape, model, real, note) -> None:
    from tqdm import tqdm

    from dfq import generators
    from dfq.io import atomic_dir, save_json, save_torch

    infos = []
    with atomic_dir(Path("data/calib", source)) as tmp:
        for i, n in enumerate(tqdm(sizes, desc=f"{source} batches")):
            seed = generators.batch_seed(gen_p["seed"], i)
            if method == "real":
                start = sum(sizes[:i])
                x, info, extras = real[start : start + n].clone(), {}, None
            else:
                x, info, extras = generators.generate_batch(source, model, (n, *shape), seed, cfg, device(),
                                                            desc=f"{source} batch {i}")
            if info:
                print(f"batch {i}: loss {info['loss_start']:.4g} -> {info['loss_end']:.4g} "
                      f"({info['seconds_per_iter'] * 1e3:.1f} ms/iter)", flush=True)
            save_torch(x.contiguous(), tmp / f"batch_{i:05d}.pt")
            if extras is not None:
                save_torch(extras, tmp / f"margins_{i:05d}.pt")
            infos.append({"batch": i, "seed": seed, "shape": list(x.shape), **info})
        save_json({"source": source, "method": method, "params": cfg, "seed": gen_p["seed"], "batch_size": sizes[0],
                   "num_images": sum(sizes), "note": note, "batches": infos}, tmp / "meta.json")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
