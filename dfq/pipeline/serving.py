"""Exported cells as MLflow models: each ONNX file of export.cells logged under its cell's run in MLflow's ONNX
flavour (``name="model"``), with a signature (float32 images (-1, C, H, W) in, float32 logits (-1, classes) out)
and an input example, so ``mlflow.pyfunc.load_model(f"runs:/{run_id}/model")`` and ``mlflow models serve`` run it;
with export.register, each logged model is also a version of ``<experiment>-<source>-<bits>`` in the Model
Registry, tagged with the cell's fake-quant and ONNX Runtime top-1.

The flavour's ONNX Runtime session is configured as ``dfq.deploy.runtime.session`` (every graph optimization on,
the CPU provider), so the served logits are those the export stage measured (onnx_top1). mlflow, onnx and
onnxruntime are imported inside the functions that need them (importing mlflow costs seconds).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dfq.cells import parse_cell
from dfq.pipeline import paths
from dfq.pipeline.schema import Params

MODEL_NAME = "model"  # the model's name in its run: runs:/<run_id>/model
# as dfq.deploy.runtime.session: ORT_ENABLE_ALL (99), so QDQ groups fuse into the same integer kernels
SESSION_OPTIONS = {"graph_optimization_level": 99}
PROVIDERS = ["CPUExecutionProvider"]  # the provider onnx_top1 was measured with
EXAMPLE_MAX_VALUES = 32768  # input example: two images up to this many values each, else one


@dataclass
class OnnxModel:
    """An exported cell's ONNX file as its run logs it (``log_onnx_model``)."""

    path: str  # the DVC-tracked ONNX file (models/export/<cell>.onnx)
    shape: tuple[int, ...]  # one input image, (C, H, W)
    classes: int
    mean: tuple[float, ...] = ()  # per-channel normalisation of the input (the input example's)
    std: tuple[float, ...] = ()
    registered_name: str | None = None  # Model Registry name (export.register), else not registered
    version_tags: dict = field(default_factory=dict)  # tags of the registered version


def registered_name(experiment: str, cell: str) -> str:
    """The Model Registry name of an exported cell: ``<experiment>-<source>-<bits>`` (every seed a version)."""
    source, _, bits = parse_cell(cell)
    return f"{experiment}-{source}-{bits}"


def registry_uri(tracking_uri: str) -> str:
    """The Model Registry MLflow uses with ``tracking_uri``: MLFLOW_REGISTRY_URI if set, else the tracking URI."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def registry_problem(tracking_uri: str) -> str | None:
    """Why export.register cannot register with ``tracking_uri`` (a message), or None when it can: not with a
    file store (``file:`` URI or a plain path): MLflow 3.17's file registry is in maintenance mode and refuses to
    open unless MLFLOW_ALLOW_FILE_STORE=true."""
    uri = registry_uri(tracking_uri)
    scheme = urlparse(uri).scheme
    if scheme not in ("", "file") and len(scheme) > 1:  # a one-letter scheme is a Windows drive: a path
        return None
    return (
        f"export.register: true needs an MLflow Model Registry in a database, but the registry URI {uri!r} is a "
        "file store (MLflow 3.17 keeps its file registry in maintenance mode and refuses it): set "
        "MLFLOW_TRACKING_URI to a database (sqlite:////ABSOLUTE/PATH/mlflow.db, the default when it is unset) or "
        "to an MLflow server (http://HOST:PORT), or set export.register: false"
    )


def signature(shape, classes: int):
    """The models' MLflow signature: float32 images (-1, C, H, W) in, float32 logits (-1, classes) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = TensorSpec(np.dtype(np.float32), (-1, *map(int, shape)))
    logits = TensorSpec(np.dtype(np.float32), (-1, int(classes)))
    return ModelSignature(inputs=Schema([images]), outputs=Schema([logits]))


def input_example(shape, mean=(), std=()):
    """A black and a white image, normalised as the model's inputs are ((x - mean) / std per channel); only
    the black one when an image has more than EXAMPLE_MAX_VALUES values (the example is stored as JSON)."""
    import numpy as np

    c = int(shape[0])
    mean = np.asarray(mean or [0.0] * c, dtype=np.float32).reshape(c, 1, 1)
    std = np.asarray(std or [1.0] * c, dtype=np.float32).reshape(c, 1, 1)
    levels = [0.0, 1.0] if int(np.prod(shape)) <= EXAMPLE_MAX_VALUES else [0.0]
    images = [(np.full(tuple(shape), v, dtype=np.float32) - mean) / std for v in levels]
    return np.stack(images).astype(np.float32)


def pip_requirements() -> list[str]:
    """The served model's environment: onnx and onnxruntime pinned to the versions that logged it (given, so
    MLflow does not load the model in a subprocess to infer them; MLflow adds itself)."""
    import onnx
    import onnxruntime

    return [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


def log_onnx_model(model: OnnxModel):
    """Log ``model`` under the active run as ``runs:/<run_id>/model`` (ONNX flavour, signature, input example) and,
    when it has a registered name, register it and tag the new version. Returns MLflow's ModelInfo."""
    import mlflow
    import onnx

    proto = onnx.load(model.path)
    info = mlflow.onnx.log_model(
        proto,
        name=MODEL_NAME,
        signature=signature(model.shape, model.classes),
        input_example=input_example(model.shape, model.mean, model.std),
        pip_requirements=pip_requirements(),
        onnx_execution_providers=PROVIDERS,
        onnx_session_options=SESSION_OPTIONS,
        save_as_external_data=proto.ByteSize() > 2**31 - 2**26,  # only past protobuf's 2 GB limit
        registered_model_name=model.registered_name,
    )
    if model.registered_name and info.registered_model_version is not None:
        client = mlflow.tracking.MlflowClient()
        for key, value in model.version_tags.items():
            client.set_model_version_tag(model.registered_name, str(info.registered_model_version), key, str(value))
    return info


def cell_model(cell: str, params: Params, onnx_md5: str, metrics: dict) -> tuple[OnnxModel | None, dict]:
    """An exported cell's model for its run, and what it adds to the run's inputs hash: the ONNX file's DVC md5
    (so a new ONNX file is a new run), whether it is registered (so turning export.register on logs and
    registers new runs) and, when the file is absent (not pulled), that its model is missing (the run is
    logged without it, and again with it once the file is there). (None, {}) for a cell not exported.

    Args:
        cell: ``<source>-s<seed>-<bits>``.
        params: the pipeline's params (export.cells, export.register, track.experiment).
        onnx_md5: the ONNX file's md5 in dvc.lock (outs of export@<cell>).
        metrics: the run's metrics; top1 and onnx_top1 tag the registered version.
    """
    if cell not in params.export.cells:
        return None, {}
    path = paths.onnx_model(cell)
    register = params.export.register_
    inputs = {"onnx_md5": onnx_md5, **({"register": True} if register else {})}
    if not path.is_file():
        print(f"{cell}: {path} not found (dvc pull {path}): its run is logged without its MLflow model")
        return None, {**inputs, "onnx_model": "missing"}
    spec = json.loads(Path(paths.PREPARED_META).read_text())
    inp = spec["input_spec"]
    tags = {k: metrics[k] for k in ("top1", "onnx_top1") if k in metrics}
    model = OnnxModel(
        path=str(path),
        shape=tuple(inp["shape"]),
        classes=int(spec["num_classes"]),
        mean=tuple(inp.get("mean", ())),
        std=tuple(inp.get("std", ())),
        registered_name=registered_name(params.track.experiment, cell) if register else None,
        version_tags={**tags, "cell": cell},
    )
    return model, inputs
