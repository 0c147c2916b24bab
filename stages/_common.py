"""What every stage shares: its params group, environment settings and path resolution.

Device, thread count and worker count are environment (DFQ_DEVICE, DFQ_THREADS, DFQ_WORKERS), never
params, so that a hardware change never invalidates DVC's cache.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"


def load_params(*groups: str) -> dict | list:
    """The named top-level groups of params.yaml (one group -> its dict)."""
    path = Path(PARAMS_FILE)
    if not path.is_file():
        raise SystemExit(f"{PARAMS_FILE} not found in {Path.cwd()} (run stages from the repo root)")
    params = yaml.safe_load(path.read_text()) or {}
    missing = [g for g in groups if g not in params]
    if missing:
        raise SystemExit(f"{PARAMS_FILE}: missing group(s) {', '.join(missing)}")
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
    candidates = [p] if p.is_absolute() else [p, *(Path(os.environ[v]) / p for v in ("DVC_ROOT", "DFQ_ROOT") if v in os.environ)]
    for c in candidates:
        if c.exists():
            return c
    raise SystemExit(f"{param}={path}: not found (looked in: {', '.join(str(c) for c in candidates)})")
