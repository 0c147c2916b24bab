"""Issue 26, deploying after a pull: a producer tracks an exported ONNX cell with DVC (pushed to a local remote)
and logs it with dfq.pipeline.serving to a shared `mlflow server`; a teammate's fresh `git clone` + `dvc pull`
then loads the run's model with `mlflow.pyfunc.load_model` through the same server, and its logits equal ONNX
Runtime's on the pulled file. Real git, DVC, MLflow server and ONNX Runtime (no mocks); producer and consumer
each talk to MLflow from their own process, through MLFLOW_TRACKING_URI only."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import _narrow_resnet, free_port, stop_group, wait_for_http

from dfq.deploy.qdq import to_onnx
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import QuantSpec, calibrate, prepare

pytest.importorskip("mlflow")
ort = pytest.importorskip("onnxruntime")

SHAPE, CLASSES, CELL = (1, 16, 16), 10, "zeroq-s0-w8a8"
ONNX = f"models/export/{CELL}.onnx"
EXPERIMENT = "deploy-after-pull"
BIN = Path(sys.executable).parent
GIT_ID = ["-c", "user.name=dfq test", "-c", "user.email=dfq@example.invalid", "-c", "commit.gpgsign=false"]

PRODUCER = f"""
import mlflow
from dfq.pipeline import serving

mlflow.set_experiment({EXPERIMENT!r})
with mlflow.start_run(run_name={CELL!r}) as run:
    mlflow.set_tags({{"cell": {CELL!r}, "source": "zeroq", "bits": "w8a8"}})
    serving.log_onnx_model(
        serving.OnnxModel(path={ONNX!r}, shape={SHAPE!r}, classes={CLASSES}, mean=(0.286,), std=(0.353,))
    )
print(run.info.run_id)
"""

# a teammate: finds the cell's run by its name on the shared server, loads its model, predicts the saved inputs
CONSUMER = f"""
import sys
import mlflow
import numpy as np

client = mlflow.MlflowClient()
exp = client.get_experiment_by_name({EXPERIMENT!r})
(run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = '{CELL}'")
model = mlflow.pyfunc.load_model(f"runs:/{{run.info.run_id}}/model")
np.save(sys.argv[2], model.predict(np.load(sys.argv[1]))["logits"])
print(run.info.run_id, run.info.artifact_uri)
"""


def _env(**extra):
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "GIT_TERMINAL_PROMPT": "0",
        **extra,
    }


def _sh(cmd, cwd, timeout=120, **env):
    """Run ``cmd`` in ``cwd``; fail with its output if it fails; return its stdout."""
    p = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def _git(cwd, *args):
    return _sh(["git", *GIT_ID, *args], cwd)


def _dvc(cwd, *args):
    return _sh([str(BIN / "dvc"), *args], cwd)


def _export(path: Path):
    """A narrow ResNet calibrated at W8A8 (zeroq protocol) on 32 images, exported to ONNX QDQ at ``path``;
    returns 6 held-out normalised images."""
    torch.manual_seed(3)
    x = torch.randn(38, *SHAPE)
    gm = prepare(_narrow_resnet(), 8, 8, MinMaxObserver, QuantSpec("zeroq", "symmetric"))
    calibrate(gm, [x[:32]])
    path.parent.mkdir(parents=True, exist_ok=True)
    to_onnx(gm, (1, *SHAPE), "zeroq", path)
    return x[32:].numpy()


def _start_server(tmp_path: Path):
    """A shared `mlflow server` on 127.0.0.1 (SQLite at an absolute path, artifacts proxied to a folder), in
    its own process group: (process, url, log file)."""
    port, log = free_port(), (tmp_path / "server.log").open("w")
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{(tmp_path / 'server' / 'mlflow.db').resolve()}",
        "--artifacts-destination",
        str((tmp_path / "server" / "artifacts").resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    (tmp_path / "server").mkdir()
    env = _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def _stop(proc, log):
    try:
        stop_group(proc)
    finally:
        log.close()


def _ort_logits(path, x):
    """ONNX Runtime run directly on ``path`` (default session, CPU provider): the independent path."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_pyfunc_load_after_dvc_pull_into_a_fresh_clone(tmp_path):
    producer, consumer, remote = tmp_path / "producer", tmp_path / "consumer", tmp_path / "remote"

    # (1) the producer: a git + DVC repo with a local default remote and the exported cell tracked by DVC
    producer.mkdir()
    _git(producer, "init", "-q", "-b", "main")
    _dvc(producer, "init", "-q")
    _dvc(producer, "remote", "add", "-d", "shared", str(remote))
    x = _export(producer / ONNX)
    _dvc(producer, "add", ONNX)
    _git(producer, "add", "-A")
    _git(producer, "commit", "-q", "-m", f"track {CELL} with DVC")
    _dvc(producer, "push")
    recorded = yaml.safe_load((producer / f"{ONNX}.dvc").read_text())["outs"][0]["md5"]

    proc, url, log = _start_server(tmp_path)
    try:
        wait_for_http(url + "/health", proc, 90, "mlflow server")

        # (2) the producer logs the exported cell as an MLflow model with the project's serving function
        run_id = _sh([sys.executable, "-c", PRODUCER], producer, MLFLOW_TRACKING_URI=url).split()[-1]

        # (3) a teammate: a fresh clone has the .dvc file but not the model; `dvc pull` fetches it from the
        # remote (the producer's cache is gone, so it can come from nowhere else)
        shutil.rmtree(producer / ".dvc" / "cache")
        _git(tmp_path, "clone", "-q", str(producer), str(consumer))
        assert (consumer / f"{ONNX}.dvc").is_file() and not (consumer / ONNX).exists()
        _dvc(consumer, "pull")
        pulled = consumer / ONNX
        assert pulled.is_file()
        assert hashlib.md5(pulled.read_bytes()).hexdigest() == recorded
        assert _sh(["git", "status", "--porcelain"], consumer) == ""  # the pull leaves the clone clean

        np.save(tmp_path / "x.npy", x)
        out = _sh(
            [sys.executable, "-c", CONSUMER, str(tmp_path / "x.npy"), str(tmp_path / "logits.npy")],
            consumer,
            MLFLOW_TRACKING_URI=url,
        )
    finally:
        _stop(proc, log)

    found, artifact_uri = out.split()[-2:]
    assert found == run_id
    assert artifact_uri.startswith("mlflow-artifacts:")  # the model came through the shared server
    logits = np.load(tmp_path / "logits.npy")
    direct = _ort_logits(pulled, x)
    assert logits.shape == (len(x), CLASSES) and logits.dtype == np.float32
    assert np.abs(logits - direct).max() <= 1e-5
    assert np.ptp(direct, axis=0).max() > 1e-3  # the inputs give different logits: a real comparison
