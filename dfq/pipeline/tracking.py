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

from dfq.cells import is_mixed
from dfq.pipeline import lineage, paths, serving
from dfq.pipeline.report import allocation_markdown

HASH_TAG = "dfq.input_hash"
# MLflow >= 3 opens an experiment without this tag on its GenAI overview (traces, token usage); with
# it the UI lands on the runs table of model-training runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


@dataclass
class Cell:
    run_name: str
    params: dict
    metrics: dict
    tags: dict
    artifacts: list[str | tuple[str, str]] = field(default_factory=list)  # path (under reports/) or (path, dir)
    inputs: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)  # artifact path in the run -> its text (written by MLflow)
    datasets: list[dict] = field(default_factory=list)  # dataset inputs (dfq.pipeline.lineage): set, FP32 model
    model: serving.OnnxModel | None = None  # an exported cell's MLflow model (its ONNX md5 is in inputs)

    def input_hash(self) -> str:
        payload = {"params": self.params, "metrics": self.metrics, "inputs": self.inputs}
        payload = {**payload, "texts": self.texts} if self.texts else payload
        payload = json.dumps({**payload, "datasets": self.datasets} if self.datasets else payload, sort_keys=True)
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


def _measured(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not None, not NaN


def fp32_metrics(fp32: dict) -> dict:
    """The FP32 model's accuracy logged with every run: fp32_top1, fp32_top5 (test set) and fp32_val_top1,
    fp32_val_top5 (validation split, when metrics/fp32.json has them)."""
    return {f"fp32_{k}": fp32[k] for k in ("top1", "top5", "val_top1", "val_top5") if _measured(fp32.get(k))}


def accuracy_metrics(cell: dict, fp32: dict) -> dict:
    """A cell's accuracy for its run: top1, top5 (test set), val_top1, val_top5 (validation split, when the
    cell was measured on one) and top1_drop (FP32 top-1 minus the cell's, test set)."""
    out = {k: cell[k] for k in ("top1", "top5", "val_top1", "val_top5") if _measured(cell.get(k))}
    return {**out, "top1_drop": fp32["top1"] - cell["top1"]}


def env_tags(env) -> dict:
    """A metrics file's ``env`` (dfq.provenance: what decided its numbers) as MLflow tags ``env.<key>``, e.g.
    env.torch, env.cpu, env.isa, env.threads, env.device (values as text, None left out); {} without one."""
    if not isinstance(env, dict):
        return {}
    return {f"env.{k}": str(v) for k, v in env.items() if v is not None}


def export_run_extras(cell: str, export_dir=paths.EXPORT_DIR, map_dir=paths.QUANT_MAP_DIR):
    """What an exported cell adds to its run: ONNX Runtime metrics, tags naming the DVC-tracked ONNX file,
    and artifacts (the quantization map). The ONNX model itself is the run's MLflow model (``Cell.model``)."""
    r = json.loads((Path(export_dir) / f"{cell}.json").read_text())
    metrics = {
        "onnx_top1": r["onnx_top1"],
        "onnx_top5": r["onnx_top5"],
        "onnx_top1_diff": r["top1_diff"],
        "ort_ms_per_image": r["ms_per_image"],
        "onnx_mb": r["onnx_bytes"] / 1e6,
        "integer_convs": r["integer_convs"],
        "float_convs": r["float_convs"],
    }
    return metrics, {"onnx_dvc_path": r["onnx_path"]}, [str(Path(map_dir) / f"{cell}.md")]


def cell_quantize_params(quantize: dict, bits: str) -> dict:
    """The quantize params that made a cell: all but the cell list; the mixed group (its candidate
    bit-widths) only for a mixed-precision cell, so adding a mixed cell never relogs the uniform ones."""
    out = {k: v for k, v in quantize.items() if k not in ("bits", "mixed")}
    return {**out, "mixed": {"candidates": quantize["mixed"]["candidates"]}} if is_mixed(bits) else out


def mixed_run_extras(cell: str, calib_dir=paths.CALIBRATE_DIR, heatmap_dir=paths.SENSITIVITY_PLOT_DIR):
    """What a mixed-precision cell (<source>-s<seed>-mp<B>a<A>) adds to its run: metrics of its allocation,
    the allocation table as a markdown artifact (allocation/<cell>.md) and the sensitivity heat map of its
    calibration set; nothing for a uniform cell."""
    if not is_mixed(cell.rsplit("-", 1)[-1]):
        return {}, [], {}
    alloc = json.loads((Path(calib_dir) / f"{cell}.json").read_text())["allocation"]
    metrics = {"avg_weight_bits_allocatable": alloc["avg_bits"], "allocation_kl_sum": alloc["kl_sum"]}
    text = f"# Allocation of {cell}\n\n" + allocation_markdown(alloc)
    return metrics, [str(Path(heatmap_dir) / f"{cell.rsplit('-', 1)[0]}.png")], {f"allocation/{cell}.md": text}


class TrackingError(RuntimeError):
    pass


def _open_experiment(client, uri: str, experiment: str, artifact_location: str) -> str:
    """The experiment's id (created with ``artifact_location`` when new, tagged for the runs-table UI); a store that
    cannot be reached is one TrackingError saying what to do."""
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location)
        for key, value in EXPERIMENT_TAGS.items():
            if not exp or exp.tags.get(key) != value:
                client.set_experiment_tag(exp_id, key, value)
        return exp_id
    except Exception as exc:  # the server is down, the DB is locked or unreadable
        raise TrackingError(
            f"cannot reach the MLflow tracking store {uri!r}: {type(exc).__name__}: {exc}. "
            "Start the server / free the database (or set MLFLOW_TRACKING_URI to a reachable store), then rerun "
            "`dvc repro`: results already logged are not logged twice."
        ) from exc


def _log_run(mlflow, client, exp_id: str, cell: Cell, h: str) -> None:
    """One cell's run: params, metrics, tags (with its input hash), artifacts, texts, dataset inputs, model."""
    with mlflow.start_run(experiment_id=exp_id, run_name=cell.run_name):
        mlflow.log_params({k: str(v) for k, v in flatten(cell.params).items()})
        mlflow.log_metrics(cell.metrics)
        mlflow.set_tags({**cell.tags, HASH_TAG: h})
        for a in cell.artifacts:
            path, where = (a, "reports") if isinstance(a, str) else a
            if Path(path).exists():
                mlflow.log_artifact(path, artifact_path=where)
        for name, text in cell.texts.items():
            mlflow.log_text(text, name)
        if cell.datasets:
            client.log_inputs(mlflow.active_run().info.run_id, datasets=lineage.entities(cell.datasets))
        if cell.model:  # ONNX flavour: runs:/<run_id>/model (and a registered version with export.register)
            serving.log_onnx_model(cell.model)


def log_cells(cells: list[Cell], *, uri: str, experiment: str, artifact_location: str) -> dict:
    """Log every cell not yet logged with the same input hash. Returns {"logged": n, "skipped": n}. MLflow's global
    tracking URI is ``uri`` only while logging, then what it was: a caller's later client (resolving a logged model,
    say) never reaches this store by surprise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    if any(c.model and c.model.registered_name for c in cells) and serving.registry_problem(uri):
        raise TrackingError(serving.registry_problem(uri))  # before anything is logged
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # set, then restore (mlflow's own helper)

    logged = skipped = 0
    with _use_tracking_uri(uri):
        client = MlflowClient(uri)
        exp_id = _open_experiment(client, uri, experiment, artifact_location)
        for cell in cells:
            h = cell.input_hash()
            existing = client.search_runs([exp_id], filter_string=f"tags.`{HASH_TAG}` = '{h}'")
            if any(r.info.status == "FINISHED" for r in existing):
                skipped += 1
                continue
            for r in existing:  # left behind by a crash: replace it
                client.delete_run(r.info.run_id)
            _log_run(mlflow, client, exp_id, cell, h)
            logged += 1
    return {"logged": logged, "skipped": skipped}


def compare(
    uri: str,
    experiment: str,
    metric: str = "top1",
    by=("source", "bits"),
    across: str = "dvc_exp_name",
    filter_string: str = "",
):
    """A table of ``metric`` across DVC experiments from MLflow: rows ``by`` (run tags), one column per
    value of the ``across`` tag, each cell the mean, std and count over the seeds' runs (aggregate runs
    left out; of runs logged twice for the same cell, the latest). Returns a pandas DataFrame with
    columns (stat, <across value>).

    Args:
        uri: MLflow tracking URI.
        experiment: MLflow experiment name; a missing one raises TrackingError.
        metric: the metric tabulated (the runs' ``metrics.<metric>``).
        by: run tags that make the rows (the index).
        across: the run tag whose values make the columns (default: the DVC experiment name).
        filter_string: MLflow search filter on the runs ("": every run).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)  # no global tracking URI left behind
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"MLflow experiment {experiment!r} not found in {uri!r}")
    runs = mlflow_search_runs(uri, exp.experiment_id, filter_string)
    col = f"metrics.{metric}"
    if runs.empty or col not in runs:
        raise TrackingError(
            f"no run of experiment {experiment!r} has a metric {metric!r}"
            + (f" (filter: {filter_string})" if filter_string else "")
        )
    tags = [f"tags.{t}" for t in (*by, across, "seed")]
    for t in tags:
        if t not in runs:
            runs[t] = None
    if "tags.aggregate" in runs:
        runs = runs[runs["tags.aggregate"] != "true"]
    runs = runs.dropna(subset=[col]).drop_duplicates(subset=tags, keep="first")
    table = runs.pivot_table(
        index=[f"tags.{t}" for t in by],
        columns=f"tags.{across}",
        values=col,
        aggfunc=["mean", "std", "count"],
        sort=False,
        dropna=False,
    )
    table.index.names = list(by)
    table.columns.names = ["stat", across]
    return table


def mlflow_search_runs(uri: str, experiment_id: str, filter_string: str = ""):
    """Every run of the experiment as mlflow.search_runs' DataFrame (newest first), asked of ``uri`` only."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        return mlflow.search_runs([experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"])


def compare_markdown(table) -> str:
    """A ``compare`` table as markdown: one column per experiment (sorted by name), mean ± std (n seeds)."""
    import pandas as pd

    exps = sorted(set(table["mean"].columns), key=str)
    names = list(table.index.names)
    lines = ["| " + " | ".join(names + exps) + " |", "|" + "---|" * (len(names) + len(exps))]
    for key, row in table.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        cells = []
        for e in exps:
            m, sd, n = row[("mean", e)], row[("std", e)], row[("count", e)]
            cells.append("" if pd.isna(m) else f"{m:.2f}" + ("" if pd.isna(sd) else f" ± {sd:.2f}") + f" ({int(n)})")
        lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    return "\n".join(lines) + "\n"


def runs_page_url(uri: str, experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI address of ``experiment``'s runs table. MLflow 3.17's UI keeps a global "GenAI" /
    "Model training" switch (browser storage, GenAI by default) that decides what an experiment page
    shows; checked in headless Chromium, the experimentKind tag alone still opened the GenAI overview,
    the ``workflowType=machine_learning`` query parameter opens the runs table."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    where = f"experiments/{exp.experiment_id}" if exp else "experiments"
    return f"{base}/#/{where}?workflowType=machine_learning"
