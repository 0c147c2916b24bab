"""dfq.provenance: what decides a number, against values read here independently (/proc/cpuinfo, torch's own
settings in a fresh process, nvidia-smi), and the metrics files of the stages carrying it under ``env``; the code
that decides it (code_files: a module's import closure), on a hand-made package and on this repository."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfq.provenance import code_files, cpu_model, environment

ROOT = Path(__file__).resolve().parents[1]
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_model() -> str | None:
    """The first 'model name' of /proc/cpuinfo, parsed with a regex (not the module's parser)."""
    m = re.search(r"^model name\s*:\s*(.+?)\s*$", CPUINFO.read_text(), re.M) if CPUINFO.is_file() else None
    return m.group(1) if m else None


def run_python(code: str, cwd=None, **env) -> str:
    """Run ``code`` in a fresh Python (this repo importable) with ``env`` added to the environment."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_environment_names_the_build_cpu_isa_and_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = environment()
        torch.set_num_threads(2)
        two = environment("cpu")
    finally:
        torch.set_num_threads(before)
    assert one["threads"] == 1 and two["threads"] == 2  # read when called, not at import
    assert one["torch"] == torch.__version__ and one["torch_git"] == torch.version.git_version
    assert one["cuda"] == torch.version.cuda and one["device"] == "cpu" and "gpu" not in one
    assert one["python"] == platform.python_version() and one["machine"] == platform.machine()
    if cpuinfo_model():
        assert one["cpu"] == cpuinfo_model()
    assert json.loads(json.dumps(one)) == one  # a metrics file holds it as it is


def test_isa_is_what_torch_dispatches_to():
    """The ISA follows torch's CPU dispatch: ATEN_CPU_CAPABILITY=default forces the plain kernels (DEFAULT); the
    capability reported without it is one the CPU's flags allow."""
    code = "from dfq.provenance import environment; print(environment()['isa'])"
    assert run_python(code, ATEN_CPU_CAPABILITY="default").strip() == "DEFAULT"
    isa = run_python(code).strip()
    flags = (
        set(re.search(r"^flags\s*:(.*)$", CPUINFO.read_text(), re.M).group(1).split()) if CPUINFO.is_file() else set()
    )
    if flags:
        need = {"AVX2": {"avx2", "fma"}, "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}.get(isa, set())
        assert need <= flags, (isa, need - flags)


def test_cpu_model_parser_and_fallback(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
    )
    assert cpu_model(info) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an ARM board: no model name
    assert cpu_model(info) == (platform.processor() or platform.machine())
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_stage_metrics_carry_the_environment_they_ran_in(tmp_path):
    """stages._common.save_metrics after setup_torch (what every metrics-writing stage does): the file's env has
    the thread count DFQ_THREADS set, this machine's CPU and torch; the numbers themselves are unchanged."""
    code = (
        "from stages._common import save_metrics, setup_torch; setup_torch(); "
        "save_metrics({'top1': 91.5, 'seed': 0}, 'metrics/x.json')"
    )
    for threads in (1, 3):
        run_python(code, tmp_path, DFQ_THREADS=str(threads), DFQ_DEVICE="cpu")
        m = json.loads((tmp_path / "metrics/x.json").read_text())
        assert {k: v for k, v in m.items() if k != "env"} == {"top1": 91.5, "seed": 0}
        env = m["env"]
        assert env["threads"] == threads and env["device"] == "cpu" and env["torch"] == torch.__version__
        if cpuinfo_model():
            assert env["cpu"] == cpuinfo_model()
        fresh = run_python("import torch; print(torch.backends.cpu.get_cpu_capability())")
        assert env["isa"] == fresh.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_environment_names_the_gpu():
    env = environment("cuda")
    assert (
        env["device"] == "cuda" and env["cuda"] == torch.version.cuda and env["cudnn"] == torch.backends.cudnn.version()
    )
    if shutil.which("nvidia-smi"):
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.splitlines()
        assert env["gpu"] == names[torch.cuda.current_device()].strip()
    assert environment("cuda:0")["gpu"] == torch.cuda.get_device_name(0)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


HAND_MADE = {
    "app/__init__.py": "",
    "app/main.py": (
        "import os\nimport torch\nfrom pkg import util\n"
        "def run():\n    from pkg.sub import deep\n    import pkg.lazy as lazy\n    return deep, lazy\n"
    ),
    "pkg/__init__.py": "from .core import X\n",  # relative, in a package __init__
    "pkg/core.py": "import numpy\nX = 1\n",
    "pkg/util.py": "from pkg import helpers, X\nfrom pkg.core import X as Y\n",  # helpers: a submodule; X: a name
    "pkg/helpers.py": "import app.main\n",  # a cycle back to the start
    "pkg/lazy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import typed\n",
    "pkg/typed.py": "",
    "pkg/sub/__init__.py": "",
    "pkg/sub/deep.py": "from ..core import X\nfrom . import sibling\nfrom .star import *\n",
    "pkg/sub/sibling.py": "",
    "pkg/sub/star.py": "import json\n",
    "pkg/unused.py": "import pkg.core\n",  # imported by nobody
    "notes.txt": "import pkg.unused\n",
}


def test_code_files_follows_every_import_of_a_hand_made_package(tmp_path):
    """Module and function level imports, relative ones, ``from package import submodule`` (not a name), the
    packages' __init__.py on the way, a cycle; torch, numpy, os, json end the walk; unused files stay out."""
    write_tree(tmp_path, HAND_MADE)
    assert code_files("app.main", root=tmp_path) == [
        "app/__init__.py",
        "app/main.py",
        "pkg/__init__.py",
        "pkg/core.py",
        "pkg/helpers.py",
        "pkg/lazy.py",
        "pkg/sub/__init__.py",
        "pkg/sub/deep.py",
        "pkg/sub/sibling.py",
        "pkg/sub/star.py",
        "pkg/typed.py",
        "pkg/util.py",
    ]
    assert code_files("pkg.core", root=tmp_path) == ["pkg/__init__.py", "pkg/core.py"]  # the package runs first
    assert code_files("pkg.sub.sibling", "pkg.typed", root=tmp_path) == [
        "pkg/__init__.py",
        "pkg/core.py",
        "pkg/sub/__init__.py",
        "pkg/sub/sibling.py",
        "pkg/typed.py",
    ]
    assert code_files("pkg", root=tmp_path) == ["pkg/__init__.py", "pkg/core.py"]


def test_code_files_rejects_a_module_that_is_not_there(tmp_path):
    write_tree(tmp_path, HAND_MADE)
    with pytest.raises(ValueError, match="pkg.nope"):
        code_files("pkg.nope", root=tmp_path)
    with pytest.raises(ValueError, match="torch"):
        code_files("torch", root=tmp_path)


def test_code_files_of_the_generate_stage():
    """What generate's scratch key hashes and its dvc.yaml deps name: the generators and the fx tracing helper they
    use; quantization code only through the params schema (stages._common validates params.yaml as a whole), never
    through the generation package."""
    files = code_files("stages.generate")
    assert {"stages/generate.py", "stages/_common.py", "dfq/generation/generators.py", "dfq/tracing.py"} <= set(files)
    assert files == sorted(files) and all((ROOT / f).is_file() for f in files)
    quant = [f for f in files if f.startswith("dfq/quant/")]
    assert set(quant) <= set(code_files("dfq.pipeline.schema")), quant
    generation = [f"dfq.generation.{p.stem}" for p in (ROOT / "dfq/generation").glob("*.py")]
    assert not [f for f in code_files(*generation) if f.startswith(("dfq/quant/", "dfq/fp32/"))]
