"""MLflow tracking: one run per (source, bits) cell, logged idempotently.

Each run carries ``dfq.input_hash``, a hash of everything that produced its result (params, the md5s
of the model and data it used, its metrics). A cell whose hash is already in a FINISHED run is not
logged again; runs left unfinished by a crash are deleted and logged anew. So reruns and crashes
never duplicate runs. mlflow is imported here only (importing it costs seconds).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

HASH_TAG = "dfq.input_hash"


@dataclass
class Cell:
    run_name: str
    params: dict
    metrics: dict
    tags: dict
    artifacts: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    def input_hash(self) -> str:
        payload = json.dumps({"params": self.params, "metrics": self.metrics, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def default_tracking_uri(repo_root: str | os.PathLike) -> str:
    """MLFLOW_TRACKING_URI if set, else SQLite at the ABSOLUTE path <repo_root>/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class TrackingError(RuntimeError):
    pass


def log_cells(cells: list[Cell], *, uri: str, experiment: str, artifact_location: str) -> dict:
    """Log every cell not yet logged with the same input hash. Returns {"logged": n, "skipped": n}."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location)
    except Exception as exc:  # the server is down, the DB is locked or unreadable
        raise TrackingError(
            f"cannot reach the MLflow tracking store {uri!r}: {type(exc).__name__}: {exc}. "
            "Start the server / free the database (or set MLFLOW_TRACKING_URI to a reachable store), then rerun "
            "`dvc repro`: results already logged are not logged twice."
        ) from exc
    logged = skipped = 0
    for cell in cells:
        h = cell.input_hash()
        existing = client.search_runs([exp_id], filter_string=f"tags.`{HASH_TAG}` = '{h}'")
        if any(r.info.status == "FINISHED" for r in existing):
            skipped += 1
            continue
        for r in existing:  # left behind by a crash: replace it
            client.delete_run(r.info.run_id)
        with mlflow.start_run(experiment_id=exp_id, run_name=cell.run_name):
            mlflow.log_params({k: str(v) for k, v in flatten(cell.params).items()})
            mlflow.log_metrics(cell.metrics)
            mlflow.set_tags({**cell.tags, HASH_TAG: h})
            for a in cell.artifacts:
                if Path(a).exists():
                    mlflow.log_artifact(a, artifact_path="reports")
        logged += 1
    return {"logged": logged, "skipped": skipped}
