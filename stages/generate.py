"""Stage generate@<source>-<seed>: one calibration set in the model's normalised input space, a file per batch.

Sources: gaussian (N(0, 1) noise), zeroq (BN-statistic matching), dsg (slack margins + layerwise
sample enhancement; its margins are saved beside each batch) and real (data.num_images drawn by seed
from the data stage's pool). Batch i is made from the seed derived from (seed, i), so batches are
independent; every source gets the same batches (data.num_images in generate.batch_size).
`generate SOURCE SEED finetune` (stage generate_finetune) continues the set up to finetune.num_images: the
batches after the calibration set's, into data/finetune/<source>-s<seed>/. DFQ_GEN_PROCS=N (environment) shards
the batches over N torchrun processes; finished batches survive a kill in .dfq-scratch/ (rerun: the missing ones).
"""
import os
import sys
from pathlib import Path

from stages._common import device, load_params, provenance, setup_torch

CODE = ["dfq/generation/generators.py", "dfq/generation/losses.py", "dfq/generation/bn_stats.py", "dfq/generation/sharding.py", "stages/generate.py"]


def main(source: str, seed: int, extend: bool = False) -> None:
    data_p, gen_p, ft_p = load_params("data", "generate", "finetune")
    torch = setup_torch()
    from dfq import cells
    from dfq.generation import generators, sharding
    from dfq.io import load_torch
    from dfq.fp32.models import load_checkpoint

    if source not in gen_p or not isinstance(gen_p[source], dict):
        raise SystemExit(f"generate source {source!r} has no params group generate.{source} in params.yaml")
    cfg = gen_p[source]
    try:
        method = generators.method_of(source, cfg)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model, meta = load_checkpoint("models/fp32.pt")
    sizes, name = generators.batch_sizes(data_p["num_images"], gen_p["batch_size"]), cells.set_name(source, seed)
    first, n = (len(sizes), ft_p["num_images"] - data_p["num_images"]) if extend else (0, 0)
    sizes, out = sizes + generators.batch_sizes(n, gen_p["batch_size"]), Path("data/finetune" if extend else "data/calib", name)
    shape = tuple(meta["input_spec"]["shape"])
    key = sharding.scratch_key({"source": source, "cfg": cfg, "seed": seed, "sizes": sizes, "shape": shape,
                                "threads": torch.get_num_threads()}, ["models/fp32.pt", *CODE])
    scratch = Path(".dfq-scratch", "generate", f"{name}-{key}")
    rank, size = sharding.world()
    sharding.init(device())
    try:
        pool = load_torch("data/prepared/calib_real.pt") if method == "real" else None
        real = None if pool is None else torch.cat([generators.real_subset(pool, data_p["num_images"], seed),
                                                    generators.real_subset(pool, n, seed, skip=data_p["num_images"])])
        mine = [i for i in sharding.my_batches(len(sizes), rank, size) if i >= first]
        sharding.make_batches(source, cfg, seed, sizes, shape, model.to(device()), real, scratch, mine, device())
        sharding.barrier()
        if rank == 0:
            sharding.assemble(out, {"source": source, "method": method, "params": cfg, "seed": seed, "batch_size": sizes[0],
                                    "env": provenance()}, range(first, len(sizes)), scratch)
    except (ValueError, FloatingPointError) as exc:
        raise SystemExit(f"generate@{name}: {exc} (nothing was written)") from None
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise SystemExit(f"generate@{name}: out of memory with batches of {sizes[0]} images ({exc.__class__.__name__}): "
                         "lower generate.batch_size, or run on a device with more memory; nothing was written") from None
    finally:
        sharding.finish()
    if rank == 0:
        print(f"{name}: {sum(sizes[first:])} images in {len(sizes) - first} batches -> {out}/")


def launch(source: str, seed: str, *mode: str) -> None:
    """DFQ_GEN_PROCS=N > 1 outside torchrun: relaunch this stage under torchrun with N processes."""
    procs = int(os.environ.get("DFQ_GEN_PROCS", "1") or 1)
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("DFQ_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
        os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={procs}", "-m", "stages.generate", source, seed, *mode])
    main(source, int(seed), mode == ("finetune",))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or not sys.argv[2].isdigit() or sys.argv[3:] not in ([], ["finetune"]):
        raise SystemExit("usage: python -m stages.generate SOURCE SEED [finetune]   (e.g. zeroq 0)")
    launch(*sys.argv[1:])
