"""What decides a number: the software and hardware a stage ran on, recorded beside its metrics.

The same code, params and data give bit-identical results only on the same torch build, CPU instruction
set and thread count (the kernels' reduction order depends on them; a GPU changes it again). Every metrics
file carries ``environment()`` under the key ``env`` and the MLflow runs carry it as ``env.*`` tags, so a
reader can tell whether two numbers were measured under the same conditions. Bottom layer: torch and the
standard library only.
"""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name ('model name' in /proc/cpuinfo on x86 Linux; else platform.processor(), else
    the machine type)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: str = "cpu") -> dict:
    """The torch build (version, git commit, CUDA version or None), CPU model, the ISA torch's CPU kernels
    dispatch to (e.g. AVX2, AVX512), torch's intra-op thread count now, the device and, on CUDA, the GPU's
    name; the Python version and the machine type. Call it after the thread count is set (stages: after
    setup_torch), on the device the numbers were computed on."""
    import torch

    env = {"torch": torch.__version__, "torch_git": torch.version.git_version, "cuda": torch.version.cuda,
           "cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "device": str(device), "python": platform.python_version(), "machine": platform.machine()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cudnn"] = torch.backends.cudnn.version()
    return env
