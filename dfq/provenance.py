"""What decides a number: the software and hardware a stage ran on, recorded beside its metrics.

The same code, params and data give bit-identical results only on the same torch build, CPU instruction
set and thread count (the kernels' reduction order depends on them; a GPU changes it again). Every metrics
file carries ``environment()`` under the key ``env`` and the MLflow runs carry it as ``env.*`` tags, so a
reader can tell whether two numbers were measured under the same conditions.

The code that decides a number is recorded too: ``code_files`` lists the repository's source files a module runs,
found from the import statements, for what a stage's resumable scratch key hashes and what its dvc.yaml deps must
name. Bottom layer: torch and the standard library only.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


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

    env = {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def code_files(*modules: str, root: Path | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """The sorted ``root``-relative paths (``/``-separated) of the .py files that importing ``modules`` can run:
    each module's own file, the ``__init__.py`` of every package on its way, and the same for every module of the
    repository it imports, transitively.

    ``modules`` are dotted names (``"stages.generate"``, ``"dfq.quant.prepare"``); ``root`` is the directory they
    resolve under (default: this repository). The imports are read statically with ``ast``, wherever they stand
    (module level, in a function, under ``if``), so a stage's function-level ``from dfq... import`` counts;
    ``from package import name`` follows ``package.name`` when it is a module. Names that resolve to no file under
    ``root`` (torch, third-party, the standard library, a class imported from a module) end the walk there. Not
    seen: modules named at run time (``importlib.import_module``). A module given that resolves to no file raises
    ``ValueError``. Modules named in ``exclude`` are neither walked into nor listed (unless given in ``modules``).
    """
    root = Path(root) if root is not None else REPO_ROOT
    todo, seen = [], set()
    for name in modules:
        if _module_file(name, root) is None:
            raise ValueError(f"{name}: no module file under {root}")
        todo.append(name)
    while todo:
        name = todo.pop()
        if name in seen or (name in exclude and name not in modules):
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # packages on the way run first
        todo.extend(_repo_imports(name, root))
    files = {_module_file(name, root) for name in seen}
    return sorted(f.relative_to(root).as_posix() for f in files if f is not None)


def _module_file(name: str, root: Path) -> Path | None:
    """The file of the dotted module ``name`` under ``root`` (``a/b.py`` or ``a/b/__init__.py``), or None."""
    base = root.joinpath(*name.split("."))
    for f in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _repo_imports(name: str, root: Path) -> set[str]:
    """The modules under ``root`` that module ``name``'s import statements name (anywhere in the file)."""
    path = _module_file(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {m for m in found if m and _module_file(m, root) is not None}


def file_md5(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scratch_key(spec: dict, files: list[str | os.PathLike]) -> str:
    """Hash of a JSON-able description plus the contents of ``files`` (model, code): the name of a resumable
    stage's scratch folder, so that work made with other inputs or other code is never resumed."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for f in files:
        h.update(f"{Path(f).name}:{file_md5(f)}".encode())
    return h.hexdigest()[:16]
