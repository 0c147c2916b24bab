"""Stage generate@<source>: calibration images in the model's normalised input space, one file per batch.

Sources: gaussian (N(0, 1) noise), zeroq (BN-statistic matching), dsg (slack margins + layerwise
sample enhancement; its margins are saved beside each batch) and real (the data stage's subset).
Batch i is made from the seed derived from (generate.seed, i), so batches are independent.
DFQ_GEN_PROCS=N (environment, not a param) shards the batches over N torchrun processes; finished
batches survive a kill in .dfq-scratch/ and a rerun makes only the missing ones.
"""
import os
import sys
from pathlib import Path

from stages._common import device, load_params, setup_torch

CODE = ["dfq/generators.py", "dfq/losses.py", "dfq/bn_stats.py", "dfq/sharding.py", "stages/generate.py"]


def main(source: str) -> None:
    data_p, gen_p = load_params("data", "generate")
    torch = setup_torch()
    from dfq import generators, sharding
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
    key = sharding.scratch_key({"source": source, "cfg": cfg, "seed": gen_p["seed"], "sizes": sizes, "shape": shape,
                                "threads": torch.get_num_threads()}, ["models/fp32.pt", *CODE])
    scratch = Path(".dfq-scratch", "generate", f"{source}-{key}")
    rank, size = sharding.world()
    sharding.init(device())
    try:
        mine = sharding.my_batches(len(sizes), rank, size)
        done = [i for i in mine if sharding.finished(scratch, i)]
        if done:
            print(f"resuming: {len(done)} of {len(mine)} batches already made in {scratch}", flush=True)
        sharding.make_batches(source, cfg, gen_p["seed"], sizes, shape, model, real, scratch,
                              [i for i in mine if i not in done], device())
        sharding.barrier()
        if rank == 0:
            sharding.assemble(Path("data/calib", source), {"source": source, "method": method, "params": cfg,
                              "seed": gen_p["seed"], "batch_size": sizes[0], "note": note}, len(sizes), scratch)
    except (ValueError, FloatingPointError) as exc:
        raise SystemExit(f"generate@{source}: {exc} (nothing was written)") from None
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise SystemExit(f"generate@{source}: out of memory with batches of {sizes[0]} images ({exc.__class__.__name__}): "
                         "lower generate.batch_size (or generate.<source>.batch_multiple for dsg), or run on a "
                         "device with more memory; nothing was written") from None
    finally:
        sharding.finish()
    if rank == 0:
        print(f"{source}: {sum(sizes)} images in {len(sizes)} batches -> data/calib/{source}/")


def launch(source: str) -> None:
    """DFQ_GEN_PROCS=N > 1 outside torchrun: relaunch this stage under torchrun with N processes."""
    procs = int(os.environ.get("DFQ_GEN_PROCS", "1") or 1)
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("DFQ_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
        os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={procs}", "-m", "stages.generate", source])
    main(source)


if __name__ == "__main__":
    launch(sys.argv[1] if len(sys.argv) > 1 else "")
