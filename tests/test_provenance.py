"""dfq.provenance: what decides a number, against values read here independently (/proc/cpuinfo, torch's own
settings in a fresh process, nvidia-smi), and the metrics files of the stages carrying it under ``env``."""
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

from dfq.provenance import cpu_model, environment

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
    flags = set(re.search(r"^flags\s*:(.*)$", CPUINFO.read_text(), re.M).group(1).split()) if CPUINFO.is_file() else set()
    if flags:
        need = {"AVX2": {"avx2", "fma"}, "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}.get(isa, set())
        assert need <= flags, (isa, need - flags)


def test_cpu_model_parser_and_fallback(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n")
    assert cpu_model(info) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an ARM board: no model name
    assert cpu_model(info) == (platform.processor() or platform.machine())
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_stage_metrics_carry_the_environment_they_ran_in(tmp_path):
    """stages._common.save_metrics after setup_torch (what every metrics-writing stage does): the file's env has
    the thread count DFQ_THREADS set, this machine's CPU and torch; the numbers themselves are unchanged."""
    code = ("from stages._common import save_metrics, setup_torch; setup_torch(); "
            "save_metrics({'top1': 91.5, 'seed': 0}, 'metrics/x.json')")
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
    assert env["device"] == "cuda" and env["cuda"] == torch.version.cuda and env["cudnn"] == torch.backends.cudnn.version()
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True).stdout.splitlines()
        assert env["gpu"] == names[torch.cuda.current_device()].strip()
    assert environment("cuda:0")["gpu"] == torch.cuda.get_device_name(0)
