"""Sharded, resumable generation: whole batches per process, finished batches kept on disk.

- Sharding: under ``torchrun`` (RANK / WORLD_SIZE set) each rank takes the batches i with
  i % world_size == rank; a batch is never split (DSG ties the samples of a batch together) and is
  seeded from (seed, i) alone, so the dataset does not depend on the number of processes (with the
  same device and thread count per process). gloo on CPU, NCCL on GPU.
- Local processes (no torchrun): ``make_set(..., procs=N, spawn=...)`` makes shard 0 itself and starts shards 1..N-1
  as child processes (``spawn``: the caller's own command with ``DFQ_SHARD=k/N`` in its environment), which make
  their batches into the scratch folder and exit; no process group, the parent waits for them and assembles. On
  the CPU one thread per process holds its speed when two threads of one process slow down (the default model's
  ZeroQ iteration on the 2-core machine: 53-59 ms on one thread; 29.5 ms on two at good times, 38 ms at others), so
  two processes of one thread make a set as fast as two threads, or up to 1.3x faster (``local_procs``); the bytes
  do not change (measured: the same md5 with 1 and 2 threads per batch).
- Resume: every finished batch is written atomically into a scratch folder keyed by a hash of
  everything that determines it (source params, seed, batch plan, input shape, the model file and
  the generation code). A killed run leaves only finished batches there (a partial file is a
  ``.tmp`` that is never read), and the rerun makes only the missing ones. Batches made under other
  params have another key and are never reused.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import torch

from dfq.generation import generators, sources
from dfq.io import atomic_dir, save_json, save_torch


class ShardFailed(RuntimeError):
    """A child process of a local make_set failed (its own error is printed above the message)."""


SHARD = "DFQ_SHARD"  # "k/N" in the environment of a child process that make_set started: it makes shard k of N


def world() -> tuple[int, int]:
    """(rank, world_size): from ``DFQ_SHARD`` in a child of ``make_set``, else torchrun's environment; (0, 1) in a
    plain process."""
    if os.environ.get(SHARD):
        k, n = os.environ[SHARD].split("/")
        return int(k), int(n)
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_procs(method: str, batches: int, threads: int, device: str) -> int:
    """How many local processes make ``batches`` batches of an optimising ``method`` by default: on the CPU one per
    thread this process may use (``threads``, its share of the cores: dfq.threads), at most one per batch; 1 for
    gaussian and real batches (drawn, not optimised), on a GPU, under torchrun and in a child of ``make_set``."""
    if method in ("gaussian", "real") or str(device) != "cpu" or os.environ.get(SHARD) or "WORLD_SIZE" in os.environ:
        return 1
    return max(1, min(threads, batches))


def init(device: str) -> None:
    rank, size = world()
    if size > 1 and not os.environ.get(SHARD) and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def my_batches(num_batches: int, rank: int, size: int) -> list[int]:
    return [i for i in range(num_batches) if i % size == rank]


def finished(scratch: Path, i: int) -> bool:
    """A batch is finished when its info file exists: it is written last, after the tensors."""
    return (scratch / f"info_{i:05d}.json").is_file()


def make_batches(source, cfg, base_seed, sizes, shape, model, real, scratch: Path, todo, device="cpu") -> None:
    """Make the batches in ``todo`` not finished yet into the scratch folder (each file atomic, the info file
    last).

    Args:
        source: the source's name (``generate_batch``'s method fallback; progress and log labels).
        cfg: the source's typed config (``sources.source_config``).
        base_seed: the set's seed; batch i is seeded with ``batch_seed(base_seed, i)``.
        sizes: image count of every batch of the set, indexed by batch.
        shape: one image's shape (C, H, W).
        model: the FP32 model synthetic batches are generated against (unused when ``real`` is given).
        real: the real images of the whole set in batch order (batch i: real[sum(sizes[:i]):][:sizes[i]]); None:
            synthetic batches.
        scratch: folder of finished batches (batch_, margins_ and info_<i:05d> files), keyed by ``scratch_key``.
        todo: indices of the batches this process makes (``my_batches``); finished ones are skipped.
        device: where synthetic batches are optimised.
    """
    from tqdm import tqdm

    done = [i for i in todo if finished(scratch, i)]
    if done:
        print(f"resuming: {len(done)} of {len(todo)} batches already made in {scratch}", flush=True)
    for i in tqdm([i for i in todo if i not in done], desc=f"{source} batches"):
        seed = generators.batch_seed(base_seed, i)
        if real is not None:
            start = sum(sizes[:i])
            x, info, extras = real[start : start + sizes[i]].clone(), {}, None
        else:
            x, info, extras = sources.generate_batch(
                source, model, (sizes[i], *shape), seed, cfg, device, desc=f"{source} batch {i}"
            )
        if info:
            print(
                f"batch {i}: loss {info['loss_start']:.4g} -> {info['loss_end']:.4g} "
                f"({info['seconds_per_iter'] * 1e3:.1f} ms/iter)",
                flush=True,
            )
        save_torch(x.contiguous(), scratch / f"batch_{i:05d}.pt")
        if extras is not None:
            save_torch(extras, scratch / f"margins_{i:05d}.pt")
        save_json({"batch": i, "seed": seed, "shape": list(x.shape), **info}, scratch / f"info_{i:05d}.json")


def assemble(out: Path, meta: dict, batches: int | range, scratch: Path) -> None:
    """Copy the finished batches (``batches``: their indices, or their count from 0) into the stage output
    (atomically) and drop the scratch folder."""
    import shutil

    with atomic_dir(out) as tmp:
        infos = []
        for i in range(batches) if isinstance(batches, int) else batches:
            for name in (f"batch_{i:05d}.pt", f"margins_{i:05d}.pt"):
                if (scratch / name).is_file():
                    shutil.copyfile(scratch / name, tmp / name)
            infos.append(json.loads((scratch / f"info_{i:05d}.json").read_text()))
        num_images = sum(info["shape"][0] for info in infos)
        save_json({**meta, "num_images": num_images, "batches": infos}, tmp / "meta.json")
    shutil.rmtree(scratch)


def make_set(
    source,
    cfg,
    seed: int,
    sizes: list[int],
    shape,
    model,
    real,
    scratch: Path,
    out: Path,
    meta: dict,
    first: int = 0,
    device="cpu",
    procs: int = 1,
    spawn: Callable[[int, int], subprocess.Popen] | None = None,
) -> bool:
    """Make batches ``first``.. of a set, shared over the torchrun processes or ``procs`` local ones (one process:
    all of them), into ``scratch``; then the first process assembles them into ``out`` with ``meta``. True in that
    process. A child of a local run (``DFQ_SHARD``) makes its shard and returns False.

    Args:
        source: the source's name (progress and error messages).
        cfg: the source's config (``sources.source_config``); ignored when ``real`` is given.
        seed: the set's seed; batch i is made from ``generators.batch_seed(seed, i)``.
        sizes: every batch's size, from batch 0 (the first ``first`` are an earlier set's: not made here).
        shape: one image's shape (C, H, W).
        model: the FP32 model on ``device`` (None for sources that need none).
        real: the real images of the whole set, batch by batch, or None for a synthetic source.
        scratch: where finished batches survive a kill.
        out: the set's folder (written atomically).
        meta: what the set's meta.json records beside its batches.
        first: the first batch made here (generate_finetune continues a set).
        device: where generation runs.
        procs: local processes (torchrun not used): this one makes shard 0, ``spawn(k, procs)`` starts shard k.
        spawn: starts the child process of shard k of n (``DFQ_SHARD=k/n`` in its environment); needed when
            ``procs`` > 1.
    """
    if procs > 1:
        args = (source, cfg, seed, sizes, shape, model, real, scratch, out, meta, first, device)
        return _make_set_locally(*args, procs, spawn)
    rank, size = world()
    init(device)
    try:
        mine = [i for i in my_batches(len(sizes), rank, size) if i >= first]
        make_batches(source, cfg, seed, sizes, shape, model, real, scratch, mine, device)
        barrier()
        if rank == 0:
            assemble(out, meta, range(first, len(sizes)), scratch)
    finally:
        finish()
    return rank == 0


def _make_set_locally(source, cfg, seed, sizes, shape, model, real, scratch, out, meta, first, device, procs, spawn):
    """make_set over ``procs`` local processes: children started by ``spawn`` make shards 1.., this one shard 0; when
    all have finished, this one assembles. A failed child fails the set (its finished batches stay in ``scratch``
    for the rerun); a failure here stops the children."""
    if spawn is None:
        raise ValueError(f"make_set: procs={procs} local processes need spawn (the command that starts a shard)")
    children = [spawn(k, procs) for k in range(1, procs)]
    try:
        mine = [i for i in my_batches(len(sizes), 0, procs) if i >= first]
        make_batches(source, cfg, seed, sizes, shape, model, real, scratch, mine, device)
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        raise
    failed = [k for k, child in enumerate(children, 1) if child.wait() != 0]
    if failed:
        raise ShardFailed(
            f"{source}: the process{'es' if len(failed) > 1 else ''} making shard {', '.join(map(str, failed))} of "
            f"{procs} failed (its error is printed above); finished batches are kept in {scratch}, a rerun makes the "
            "rest"
        )
    assemble(out, meta, range(first, len(sizes)), scratch)
    return True
