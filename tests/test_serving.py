"""Exported cells as MLflow models (dfq.pipeline.serving), against real MLflow, SQLite and ONNX Runtime (no mocks):
loaded with pyfunc, registered, served with `mlflow models serve`, and logged idempotently."""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import _narrow_resnet, free_port, stop_group, wait_for_http

from dfq.deploy.qdq import to_onnx
from dfq.deploy.runtime import run, session
from dfq.pipeline import serving
from dfq.pipeline.tracking import Cell, TrackingError, log_cells
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import QuantSpec, calibrate, prepare

mlflow = pytest.importorskip("mlflow")
ort = pytest.importorskip("onnxruntime")

SHAPE, CLASSES, CELL = (1, 16, 16), 10, "zeroq-s0-w8a8"


@pytest.fixture(autouse=True)
def _environment_restored(monkeypatch):
    """log_cells sets telemetry opt-outs with os.environ.setdefault: registered here, restored after each test."""
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, os.environ.get(key, "true"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A narrow ResNet calibrated at W8A8 (zeroq protocol) on 32 images, exported to ONNX QDQ; and 6 held-out
    normalised images."""
    torch.manual_seed(1)
    x = torch.randn(38, *SHAPE)
    gm = prepare(_narrow_resnet(), 8, 8, MinMaxObserver, QuantSpec("zeroq", "symmetric"))
    calibrate(gm, [x[:32]])
    path = tmp_path_factory.mktemp("export") / f"{CELL}.onnx"
    to_onnx(gm, (1, *SHAPE), "zeroq", path)
    return path, x[32:].numpy()


def _model(path, register=None, top1=90.0):
    return serving.OnnxModel(
        path=str(path),
        shape=SHAPE,
        classes=CLASSES,
        mean=(0.286,),
        std=(0.353,),
        registered_name=register,
        version_tags={"top1": top1, "onnx_top1": top1 + 0.25, "cell": CELL},
    )


def _cell(path, register=None, top1=90.0):
    return Cell(
        run_name=CELL,
        params={"source": "zeroq", "bits": "w8a8"},
        metrics={"top1": top1, "onnx_top1": top1 + 0.25},
        tags={"source": "zeroq", "seed": "0", "bits": "w8a8"},
        inputs={"quant_md5": "q", "onnx_md5": "o", **({"register": True} if register else {})},
        model=_model(path, register, top1),
    )


def _runs(uri):
    client = mlflow.tracking.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("t").experiment_id])


@pytest.fixture(scope="module")
def logged(exported, tmp_path_factory):
    """The exported model logged (and registered as t-zeroq-w8a8) under its cell's run: (uri, run_id)."""
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    kw = dict(uri=uri, experiment="t", artifact_location=(d / "art").as_uri())
    assert log_cells([_cell(exported[0], "t-zeroq-w8a8")], **kw) == {"logged": 1, "skipped": 0}
    return uri, _runs(uri)[0].info.run_id


def _ort_logits(path, x):
    """ONNX Runtime run directly (the second, independent path): default session, CPU provider."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_pyfunc_model_gives_onnx_runtime_logits(exported, logged, tmp_path):
    path, x = exported
    uri, run_id = logged
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    out = model.predict(x)["logits"]
    project = run(session(path, threads=1), torch.from_numpy(x)).numpy()  # dfq.deploy.runtime, as stages.export
    direct = _ort_logits(path, x)
    assert out.shape == (len(x), CLASSES) and out.dtype == np.float32
    assert np.abs(out - project).max() <= 1e-5 and np.abs(out - direct).max() <= 1e-5
    sig = model.metadata.signature
    (images,), (logits,) = sig.inputs.inputs, sig.outputs.inputs
    assert (images.type, images.shape, logits.type, logits.shape) == (np.float32, (-1, 1, 16, 16), np.float32, (-1, 10))
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path)))
    assert (local / "model.onnx").read_bytes() == Path(path).read_bytes()  # the DVC file as it is (same md5)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert "onnx" in info.flavors and info.flavors["onnx"]["providers"] == ["CPUExecutionProvider"]
    example = mlflow.models.Model.load(f"runs:/{run_id}/model").load_input_example()
    black = (0 - 0.286) / 0.353
    assert (
        example.shape == (2, *SHAPE) and np.allclose(example[0], black) and np.allclose(example[1], (1 - 0.286) / 0.353)
    )


def test_wrong_shape_names_the_expected_shape(logged):
    uri, run_id = logged
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"does not match expected shape \(-1, 1, 16, 16\)"):
        model.predict(np.zeros((2, 16, 16), np.float32))


def test_registered_version_and_its_tags(exported, logged, tmp_path):
    """One version per pipeline run that logged a new run, tagged with top1 and onnx_top1; a rerun adds none."""
    uri, run_id = logged
    client = mlflow.tracking.MlflowClient(uri)
    (v1,) = client.search_model_versions("name='t-zeroq-w8a8'")
    assert v1.run_id == run_id and v1.tags == {"top1": "90.0", "onnx_top1": "90.25", "cell": CELL}
    kw = dict(uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    assert log_cells([_cell(exported[0], "t-zeroq-w8a8")], **kw) == {"logged": 0, "skipped": 1}
    assert log_cells([_cell(exported[0], "t-zeroq-w8a8", top1=91.0)], **kw) == {"logged": 1, "skipped": 0}
    versions = sorted(client.search_model_versions("name='t-zeroq-w8a8'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2] and versions[1].tags["top1"] == "91.0"
    loaded = mlflow.pyfunc.load_model("models:/t-zeroq-w8a8/2")
    assert loaded.predict(exported[1])["logits"].shape == (len(exported[1]), CLASSES)


@pytest.mark.parametrize("store", ["file", "path"])
def test_register_needs_a_registry(exported, tmp_path, monkeypatch, store):
    """export.register with a file store: one error naming export.register and the URI, before anything is
    logged (the store's folder is never created)."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    where = tmp_path / "mlruns"
    uri = where.as_uri() if store == "file" else str(where)
    kw = dict(uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    with pytest.raises(TrackingError) as err:
        log_cells([_cell(exported[0], "t-zeroq-w8a8")], **kw)
    msg = str(err.value)
    assert msg.startswith("export.register: true needs an MLflow Model Registry in a database") and repr(uri) in msg
    assert not where.exists()
    assert serving.registry_problem("sqlite:////abs/mlflow.db") is None
    assert serving.registry_problem("http://127.0.0.1:5000") is None


def test_cell_model_hash_inputs_and_rerun(exported, tmp_path, monkeypatch):
    """cell_model: the ONNX md5 (and export.register) enter the run's inputs hash; a missing file logs the run
    without its model and marks the hash, so the run is logged again once the file is pulled."""
    monkeypatch.chdir(tmp_path)
    meta = {"input_spec": {"shape": list(SHAPE), "mean": [0.286], "std": [0.353]}, "num_classes": CLASSES}
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/meta.json").write_text(json.dumps(meta))
    params = SimpleNamespace(
        export=SimpleNamespace(cells=[CELL], register_=False), track=SimpleNamespace(experiment="dfq")
    )
    metrics = {"top1": 90.0, "onnx_top1": 90.25, "top5": 99.0}
    assert serving.cell_model("zeroq-s0-w4a4", params, "m", metrics) == (None, {})  # not exported
    assert serving.cell_model(CELL, params, "m", metrics) == (None, {"onnx_md5": "m", "onnx_model": "missing"})
    Path("models/export").mkdir(parents=True)
    shutil.copy(exported[0], f"models/export/{CELL}.onnx")
    model, inputs = serving.cell_model(CELL, params, "m", metrics)
    assert inputs == {"onnx_md5": "m"} and model.registered_name is None
    assert (model.path, model.shape, model.classes, model.mean) == (f"models/export/{CELL}.onnx", SHAPE, 10, (0.286,))
    assert model.version_tags == {"top1": 90.0, "onnx_top1": 90.25, "cell": CELL}
    params.export.register_ = True
    model, inputs = serving.cell_model(CELL, params, "m", metrics)
    assert inputs == {"onnx_md5": "m", "register": True} and model.registered_name == "dfq-zeroq-w8a8"

    def cell(md5):
        return Cell(CELL, {"bits": "w8a8"}, {"top1": 90.0}, {}, inputs={"onnx_md5": md5}, model=_model(model.path))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    assert log_cells([cell("m")], **kw) == {"logged": 1, "skipped": 0}
    assert log_cells([cell("m")], **kw) == {"logged": 0, "skipped": 1}  # a rerun of the track stage
    assert log_cells([cell("m2")], **kw) == {"logged": 1, "skipped": 0}  # a new ONNX file is a new run
    logged_models = mlflow.search_logged_models(experiment_ids=[_runs(uri)[0].info.experiment_id], output_format="list")
    assert sorted(m.name for m in logged_models) == ["model", "model"]


def _post(url, payload):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def served(logged, tmp_path):
    """`mlflow models serve` of the logged run's model on 127.0.0.1 (own process group, bounded wait, stopped at
    the end). Skipped only where the CLI or its HTTP server (uvicorn) is not installed."""
    uri, run_id = logged
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.is_file() or shutil.which("uvicorn", path=str(mlflow_bin.parent)) is None:
        pytest.skip(f"`mlflow models serve` cannot start here: {mlflow_bin} or uvicorn beside it is missing")
    port, log = free_port(), (tmp_path / "serve.log").open("w")
    cmd = [str(mlflow_bin), "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", proc, 120, "mlflow models serve")
        yield url
    finally:
        stop_group(proc)
        log.close()


def test_served_model_answers_onnx_runtime_logits(served, exported):
    path, x = exported
    status, body = _post(served + "/invocations", {"inputs": x[:4].tolist()})
    assert status == 200, body
    out = np.asarray(body["predictions"]["logits"], dtype=np.float32)
    assert np.abs(out - _ort_logits(path, x[:4])).max() <= 1e-5
    status, body = _post(served + "/invocations", {"inputs": x[:2, 0].tolist()})  # (2, 16, 16): no channel axis
    assert status == 400, body
    assert "Shape of input (2, 16, 16) does not match expected shape (-1, 1, 16, 16)." in body["message"]
