"""The MLflow runs of one pipeline: one per (source, seed, bits) cell and one per (source, bits) mean over seeds.

Each run's params are params.yaml's groups as written (``Params.raw``), limited to what made the cell, so an
unchanged cell never relogs; its inputs (the cached set's and the checkpoint's DVC md5, the environment) decide
whether it is new (``tracking.log_cells``).
"""

from __future__ import annotations

import json

from dfq.cells import cell_name, is_finetuned, set_name
from dfq.pipeline import lineage, paths, report, serving, tracking
from dfq.pipeline.lineage import lock_md5
from dfq.pipeline.schema import Params
from dfq.pipeline.tracking import Cell

ARTIFACTS = [str(paths.RESULTS), *map(str, paths.PLOTS.values())]


def _logged_params(raw: dict, s: str, k: int, b: str) -> dict:
    """The params that made cell (s, k, b), as written in params.yaml."""
    model, gen, ft = raw["model"], raw["generate"], raw["finetune"]
    return {
        "source": s,
        "seed": k,
        "bits": b,
        "data": raw["data"],
        "model": model,
        "train": {} if model.get("weights") else raw["train"],
        "generate": {"batch_size": gen["batch_size"], s: gen[s]},
        "quantize": tracking.cell_quantize_params(raw["quantize"], b),
        **({"finetune": {"num_images": ft["num_images"], "train": ft["train"]}} if is_finetuned(b) else {}),
    }


def cell_run(m: dict, params: Params, lock: dict, common: dict, fp32: dict) -> Cell:
    """The run of one cell.

    Args:
        m: the cell's row of ``report.pipeline_cells`` (its evaluation metrics, source, seed, bits).
        params: the pipeline's params (``raw``: what the run logs as its params).
        lock: dvc.lock, read for the DVC md5 of the cell's calibration set and checkpoint.
        common: tags every run of this pipeline carries (commit, DVC stage and experiment, FP32 md5).
        fp32: the FP32 metrics (metrics/fp32.json), logged beside the cell's.
    """
    s, k, b = m["source"], m["seed"], m["bits"]
    name, cell = set_name(s, k), cell_name(s, b, k)
    div = json.loads(paths.diversity_metrics(name).read_text())
    data_md5 = lock_md5(lock, paths.generate_stage(s, k), str(paths.calib_set(name)))
    ex_m, ex_t, ex_a = tracking.export_run_extras(cell) if cell in params.export.cells else ({}, {}, [])
    mx_m, mx_a, mx_t = tracking.mixed_run_extras(cell)  # mixed precision: allocation, heat map
    env = tracking.env_tags(m.get("env"))  # hashed with the inputs: another environment logs a new run
    metrics = {
        **tracking.fp32_metrics(fp32),
        **tracking.accuracy_metrics(m, fp32),
        "bn_spread_mean": div["bn_spread_mean"],
        "feature_cosine": div["feature_cosine"],
        **({"calibration_seconds": m["calibration_seconds"]} if m["calibration_seconds"] else {}),
        **{f"bn_spread_layer_{i}": v for i, v in enumerate(div["bn_spread"])},
        **ex_m,
        **mx_m,
        **({"weight_mb": m["weight_mb"]} if m.get("weight_mb", -1) >= 0 else {}),
    }
    tags = {
        **common,
        "source": s,
        "seed": str(k),
        "bits": b,
        "synthetic_data_md5": data_md5,
        **ex_t,
        **env,
        **({"finetune": "true"} if is_finetuned(b) else {}),
    }
    quant_md5 = lock_md5(lock, paths.calibrate_stage(s, k, b), str(paths.quant_checkpoint(cell)))
    onnx_md5 = lock_md5(lock, f"export@{cell}", str(paths.onnx_model(cell)))  # exported cells: the MLflow model
    model, model_inputs = serving.cell_model(cell, params, onnx_md5, metrics)
    return Cell(
        run_name=cell,
        params=_logged_params(params.raw, s, k, b),
        metrics=metrics,
        tags=tags,
        artifacts=ARTIFACTS + ex_a + mx_a,
        texts=mx_t,
        inputs={"data_md5": data_md5, "env": env, "quant_md5": quant_md5, **model_inputs},
        model=model,
    )


def mean_run(a: dict, params: Params, common: dict, fp32: dict) -> Cell:
    """The run of one (source, bits) aggregate row ``a`` (``report.aggregate``): mean and std over seeds."""
    s, b, raw = a["source"], a["bits"], params.raw
    logged = {
        "source": s,
        "seeds": raw["generate"]["seeds"],
        "bits": b,
        "model": raw["model"],
        "generate": {s: raw["generate"][s]},
        "quantize": tracking.cell_quantize_params(raw["quantize"], b),
    }
    return Cell(
        run_name=f"{s}-{b}-mean",
        params=logged,
        metrics={
            **tracking.fp32_metrics(fp32),
            **{k: v for k, v in a.items() if k not in ("source", "bits") and v == v},
        },
        tags={**common, "source": s, "seed": "mean", "bits": b, "aggregate": "true"},
    )


def pipeline_runs(params: Params, lock: dict, common: dict) -> list[Cell]:
    """Every cell's run, then every (source, bits) mean's, from the metrics files of a finished pipeline. A cell's
    run logs its calibration set and the FP32 model as dataset inputs (``lineage``)."""
    fp32 = json.loads(paths.FP32_METRICS.read_text())
    g, ft = params.generate, params.finetune
    cells = report.pipeline_cells(g.sources, g.seeds, params.quantize.cells, ft.sources, ft.bits)
    meta = json.loads(paths.PREPARED_META.read_text()) if paths.PREPARED_META.is_file() else None  # pulled or made
    remote, shape = lineage.dvc_remote(), meta["input_spec"]["shape"] if meta else None
    model = lineage.model_input(params.raw, lock, remote, meta)
    runs = []
    for m in cells.to_dict("records"):
        run = cell_run(m, params, lock, common, fp32)
        run.datasets = [lineage.set_input(m["source"], m["seed"], params.raw, lock, remote, shape), model]
        runs.append(run)
    return runs + [mean_run(a, params, common, fp32) for a in report.aggregate(cells).to_dict("records")]
