"""Stage generate@<source>-<seed>: one calibration set in the model's normalised input space, a file per batch.

Sources: gaussian (N(0, 1) noise), zeroq (BN-statistic matching), dsg (slack margins + layerwise
sample enhancement; its margins are saved beside each batch) and real (data.num_images drawn by seed
from the data stage's pool). Batch i is made from the seed derived from (seed, i), so batches are
independent; every source gets the same batches (data.num_images in generate.batch_size).
`generate SOURCE SEED finetune` (stage generate_finetune) continues the set up to finetune.num_images: the
batches after the calibration set's, into data/finetune/<source>-s<seed>/. DFQ_GEN_PROCS=N (environment) shards
the batches over N torchrun processes (1: one process); unset, on the CPU an optimising source's batches are shared by
one process per core of this stage's share (same bytes; up to 1.3x faster on 2 cores). Finished batches survive a
kill in .dfq-scratch/ (rerun: the missing ones).
"""

import os
import sys

from dfq.pipeline import paths
from stages._common import device, provenance, read_params, scratch_key, setup_torch, shard_process


def main(source: str, seed: int, extend: bool = False) -> None:
    params = read_params()
    torch = setup_torch()
    from dfq.cells import set_name
    from dfq.fp32.models import load_checkpoint
    from dfq.generation import generators, sharding, sources
    from dfq.io import load_torch

    g, num, name, dev = params.generate, params.data.num_images, set_name(source, seed), device()
    if source not in (g.model_extra or {}):
        raise SystemExit(f"generate source {source!r} has no params group generate.{source} in params.yaml")
    model, meta = load_checkpoint(paths.FP32)
    sizes = generators.batch_sizes(num, g.batch_size)
    first, n = (len(sizes), params.finetune.num_images - num) if extend else (0, 0)
    sizes += generators.batch_sizes(n, g.batch_size)
    out = (paths.finetune_set if extend else paths.calib_set)(name)
    shape, group, method = tuple(meta["input_spec"]["shape"]), g.group(source), g.method(source)
    threads = torch.get_num_threads()
    procs = 1 if os.environ.get("DFQ_GEN_PROCS") else sharding.local_procs(method, len(sizes) - first, threads, dev)
    torch.set_num_threads(max(1, threads // procs))  # each process its share of the cores
    spec = dict(source=source, cfg=group, seed=seed, sizes=sizes, shape=shape, threads=torch.get_num_threads())
    scratch = paths.SCRATCH / "generate" / f"{name}-{scratch_key('stages.generate', spec, [paths.FP32])}"
    record = dict(source=source, method=method, params=group, seed=seed, batch_size=sizes[0], env=provenance())
    try:
        real = None
        if method == "real":
            pool = load_torch(paths.REAL_POOL)
            real = torch.cat([sources.real_subset(pool, num, seed), sources.real_subset(pool, n, seed, skip=num)])
        cfg, model = g.config(source), model.to(dev)
        args = (source, cfg, seed, sizes, shape, model, real, scratch, out, record, first, dev)
        ok = sharding.make_set(*args, procs=procs, spawn=shard_process)
    except sharding.ShardFailed as exc:
        raise SystemExit(f"generate@{name}: {exc}") from None
    except (ValueError, FloatingPointError) as exc:
        raise SystemExit(f"generate@{name}: {exc} (nothing was written)") from None
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise SystemExit(
            f"generate@{name}: out of memory with batches of {sizes[0]} images ({exc.__class__.__name__}): "
            "lower generate.batch_size, or run on a device with more memory; nothing was written"
        ) from None
    if ok:
        print(f"{name}: {sum(sizes[first:])} images in {len(sizes) - first} batches -> {out}/")


def launch(source: str, seed: str, *mode: str) -> None:
    """DFQ_GEN_PROCS=N > 1 outside torchrun: relaunch this stage under torchrun with N processes."""
    procs = int(os.environ.get("DFQ_GEN_PROCS", "1") or 1)
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("DFQ_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
        run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "stages.generate"]
        os.execvp(sys.executable, [sys.executable, *run, source, seed, *mode])
    main(source, int(seed), mode == ("finetune",))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or not sys.argv[2].isdigit() or sys.argv[3:] not in ([], ["finetune"]):
        raise SystemExit("usage: python -m stages.generate SOURCE SEED [finetune]   (e.g. zeroq 0)")
    launch(*sys.argv[1:])
