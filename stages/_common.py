"""What every stage shares: its params group, environment settings and path resolution.

Device, thread count and worker count are environment (DFQ_DEVICE, DFQ_THREADS, DFQ_WORKERS), never
params, so that a hardware change never invalidates DVC's cache.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"


def roots() -> list[Path]:
    """Where relative input paths resolve: the working directory, then DVC_ROOT / DFQ_ROOT."""
    return [Path.cwd(), *(Path(os.environ[v]) for v in ("DVC_ROOT", "DFQ_ROOT") if v in os.environ)]


def read_params() -> dict:
    """params.yaml, validated as a whole against dfq.schema (one clear error naming the bad keys)."""
    from dfq.schema import ParamsError, check_paths, validate

    path = Path(PARAMS_FILE)
    if not path.is_file():
        raise SystemExit(f"{PARAMS_FILE} not found in {Path.cwd()} (run stages from the repo root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SystemExit(f"{PARAMS_FILE}: not valid YAML: {exc}") from None
    try:
        check_paths(validate(params), roots())
    except ParamsError as exc:
        raise SystemExit(str(exc)) from None
    return params


def load_params(*groups: str) -> dict | list:
    """The named top-level groups of the validated params.yaml (one group -> its dict)."""
    params = read_params()
    return params[groups[0]] if len(groups) == 1 else [params[g] for g in groups]


def setup_torch():
    """Import torch with the thread count fixed (DFQ_THREADS, default: all cores)."""
    import torch

    threads = int(os.environ.get("DFQ_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return torch


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
