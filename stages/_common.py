"""What every stage shares: its params group, environment settings, path resolution, accuracy on the test set
and the validation split, and metrics files that record what decided them (``env``, dfq.provenance).

Device, thread count and worker count are environment (DFQ_DEVICE, DFQ_THREADS, DFQ_WORKERS), never
params, so that a hardware change never invalidates DVC's cache.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"
# Validation decides whether a stage runs, never what it writes: stages compute with the library's config classes,
# which live in the algorithm modules of their import closure, and DVC tracks the params' values. So a stage's code
# (dvc.yaml deps, scratch keys) is its import closure without the schema; after changing the schema's mapping of
# params.yaml onto the config classes, rerun with `dvc repro -f`.
VALIDATION_ONLY = ("dfq.pipeline.schema",)


def roots() -> list[Path]:
    """Where relative input paths resolve: the working directory, then DVC_ROOT / DFQ_ROOT."""
    return [Path.cwd(), *(Path(os.environ[v]) for v in ("DVC_ROOT", "DFQ_ROOT") if v in os.environ)]


def read_params():
    """params.yaml as a typed ``dfq.pipeline.schema.Params``, validated as a whole (one clear error naming the bad
    keys); ``.raw`` is the file as written, for what a stage records."""
    from dfq.pipeline.schema import ParamsError, check_paths, validate

    path = Path(PARAMS_FILE)
    if not path.is_file():
        raise SystemExit(f"{PARAMS_FILE} not found in {Path.cwd()} (run stages from the repo root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SystemExit(f"{PARAMS_FILE}: not valid YAML: {exc}") from None
    try:
        parsed = validate(params)
        check_paths(parsed, roots())
    except ParamsError as exc:
        raise SystemExit(str(exc)) from None
    return parsed


def setup_torch():
    """Import torch with the thread count fixed: DFQ_THREADS, default torch's count (the cores) shared by the dfq
    processes running now (dfq.threads: one thread each when two share 2 cores); freed memory kept for reuse
    (dfq.threads.keep_freed_memory; DFQ_KEEP_MEMORY=0: off)."""
    from dfq import threads as registry

    registry.keep_freed_memory()
    import torch

    registry.register()
    threads = int(os.environ.get("DFQ_THREADS", "0") or 0)
    torch.set_num_threads(threads if threads > 0 else registry.default_threads(torch.get_num_threads()))
    imports_done()
    return torch


def imports_done() -> None:
    """The garbage collector back on after start-up (stages/__init__.py turns it off while torch is imported), with
    everything imported so far frozen out of its scans."""
    gc.freeze()
    gc.enable()


def shard_process(k: int, n: int) -> subprocess.Popen:
    """This stage's own command again (``python -m stages.<name> ARGS``) as shard k of n of its work, with this
    process's thread count (``DFQ_SHARD=k/n``: dfq.generation.sharding)."""
    import torch

    env = {**os.environ, "DFQ_SHARD": f"{k}/{n}", "DFQ_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env)


def device() -> str:
    return os.environ.get("DFQ_DEVICE", "cpu")


def workers() -> int:
    return int(os.environ.get("DFQ_WORKERS", "0") or 0)


def resolve_path(path: str | os.PathLike, param: str) -> Path:
    """An input path from params: as given, else relative to DVC_ROOT (queued experiments run in a temp
    copy where ../shared does not exist), else a clear error naming the param."""
    p = Path(os.path.expandvars(str(path))).expanduser()
    candidates = [p] if p.is_absolute() else [r / p for r in roots()]
    for c in candidates:
        if c.exists():
            return c
    raise SystemExit(f"{param}={path}: not found (looked in: {', '.join(str(c) for c in candidates)})")


def provenance() -> dict:
    """What decides this stage's numbers (dfq.provenance.environment): torch build, CPU model and ISA, torch
    threads, device. Read after setup_torch, so the thread count is the one the stage ran with."""
    from dfq.provenance import environment

    return environment(device())


def scratch_key(stage: str, spec: dict, files: list) -> str:
    """The name of a resumable stage's scratch folder: a hash of ``spec``, the input ``files`` and the stage's whole
    code (``stage``'s import closure, dfq.provenance.code_files), so that changed code never resumes old work."""
    from dfq.provenance import REPO_ROOT
    from dfq.provenance import scratch_key as key

    return key(spec, [*files, *(REPO_ROOT / f for f in stage_code(stage))])


def stage_code(stage: str) -> list[str]:
    """The code files a stage's outputs depend on: its script's import closure less the validation (dvc.yaml deps)."""
    from dfq.provenance import code_files

    return code_files(stage, exclude=VALIDATION_ONLY)


def save_metrics(metrics: dict, path: str | os.PathLike) -> None:
    """A stage's metrics file, written atomically, with its provenance under the key ``env``."""
    from dfq.io import save_json

    save_json({**metrics, "env": provenance()}, path)
