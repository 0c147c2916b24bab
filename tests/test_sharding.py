"""Sharded generation with torchrun (2 CPU processes, gloo) and resume after kill -9, through the real
generate stage in a scratch working directory."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dfq.fp32.models import build_model, save_checkpoint
from dfq.generation.sharding import ShardFailed, local_procs, make_set, my_batches
from dfq.provenance import scratch_key

ROOT = Path(__file__).resolve().parents[1]


def test_my_batches_cover_everything_once():
    got = sorted(i for r in range(3) for i in my_batches(10, r, 3))
    assert got == list(range(10))
    assert my_batches(10, 1, 3) == [1, 4, 7]


def test_scratch_key_changes_with_params_and_files(tmp_path):
    f = tmp_path / "m.pt"
    f.write_bytes(b"a")
    k = scratch_key({"lr": 0.5}, [f])
    assert k == scratch_key({"lr": 0.5}, [f]) and k != scratch_key({"lr": 0.1}, [f])
    f.write_bytes(b"b")
    assert k != scratch_key({"lr": 0.5}, [f])


@pytest.fixture
def workdir(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["num_images"] = 32
    params["generate"]["batch_size"] = 8
    params["generate"]["zeroq"]["iterations"] = 40
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    save_checkpoint(
        build_model("fmnist_resnet"),
        "fmnist_resnet",
        10,
        {"shape": [1, 28, 28], "mean": [0.286], "std": [0.353]},
        tmp_path / "models/fp32.pt",
    )
    for code in ("dfq", "stages"):
        shutil.copytree(ROOT / code, tmp_path / code, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run(workdir, procs=1, threads=1, **kw):
    """The generate stage for zeroq seed 0; procs None: DFQ_GEN_PROCS unset (local processes, one per thread)."""
    env = {**os.environ, "DFQ_THREADS": str(threads), "TQDM_DISABLE": "1", "DFQ_PROC_DIR": str(workdir / "procs")}
    env.pop("DFQ_GEN_PROCS", None)
    if procs is not None:
        env["DFQ_GEN_PROCS"] = str(procs)
    return subprocess.Popen(
        [sys.executable, "-m", "stages.generate", "zeroq", "0"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def batches(workdir):
    return {p.name: p.read_bytes() for p in sorted((workdir / "data/calib/zeroq-s0").glob("batch_*.pt"))}


def test_two_processes_give_byte_identical_data_and_resume_after_kill(workdir):
    p = run(workdir)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    single = batches(workdir)
    assert len(single) == 4
    shutil.rmtree(workdir / "data")

    p = run(workdir, procs=2)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert batches(workdir) == single
    shutil.rmtree(workdir / "data")

    # kill -9 after the first finished batch: no stage output, finished batches kept, rerun resumes
    p = run(workdir, start_new_session=True)
    scratch = workdir / ".dfq-scratch" / "generate"
    deadline = time.time() + 240
    while time.time() < deadline and not list(scratch.glob("*/info_00000.json")):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (workdir / "data/calib/zeroq-s0").exists()
    kept = len(list(scratch.glob("*/info_*.json")))
    assert 1 <= kept < 4
    p = run(workdir)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert f"resuming: {kept} of 4 batches" in out
    assert batches(workdir) == single
    assert not list(scratch.iterdir())  # assembled, scratch dropped


def test_local_processes_make_the_same_bytes_as_one(workdir):
    """DFQ_GEN_PROCS unset and 2 threads: two processes of one thread share the 4 batches (the parent and a child
    it starts, no torchrun); their batches equal one process's on one thread, byte for byte."""
    p = run(workdir)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    single = batches(workdir)
    shutil.rmtree(workdir / "data")
    p = run(workdir, procs=None, threads=2)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert batches(workdir) == single
    meta = yaml.safe_load((workdir / "data/calib/zeroq-s0/meta.json").read_text())
    assert meta["env"]["threads"] == 1 and meta["num_images"] == 32


def test_local_procs_rule(monkeypatch):
    monkeypatch.delenv("DFQ_SHARD", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_procs("zeroq", 4, 2, "cpu") == 2 and local_procs("dsg", 4, 16, "cpu") == 4
    assert local_procs("zeroq", 1, 2, "cpu") == 1 and local_procs("zeroq", 4, 1, "cpu") == 1
    assert local_procs("gaussian", 4, 2, "cpu") == 1 and local_procs("real", 4, 2, "cpu") == 1
    assert local_procs("zeroq", 4, 2, "cuda:0") == 1
    monkeypatch.setenv("DFQ_SHARD", "1/2")  # a child makes its own shard only
    assert local_procs("zeroq", 4, 2, "cpu") == 1


def test_a_failed_child_fails_the_set_and_keeps_the_parents_batches(tmp_path):
    """A child that exits non-zero: ShardFailed names its shard, nothing is assembled, the parent's finished batch
    stays in the scratch folder for the rerun."""
    real = torch.arange(4 * 2 * 4, dtype=torch.float32).view(4, 1, 2, 4)  # real batches: no model needed

    def spawn(k, n):
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])

    scratch, out = tmp_path / "scratch", tmp_path / "out"
    with pytest.raises(ShardFailed, match="shard 1 of 2 failed"):
        make_set("real", None, 0, [2, 2], (1, 2, 4), None, real, scratch, out, {}, procs=2, spawn=spawn)
    assert not out.exists()
    assert sorted(p.name for p in scratch.iterdir()) == ["batch_00000.pt", "info_00000.json"]
    assert torch.equal(torch.load(scratch / "batch_00000.pt", weights_only=True), real[:2])
