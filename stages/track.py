"""Stage track (no outputs, so DVC never skips it through its run-cache): one MLflow run per (source, seed, bits)
cell with its test and validation accuracy (top1, val_top1), tagged with its seed and with what decided its numbers
(env.* tags from its evaluation metrics: torch build, CPU, ISA, threads, device); an exported cell adds its ONNX
Runtime metrics, its quant map and its ONNX model. Plus one aggregate run per (source, bits): mean, std over seeds
(dfq.pipeline.runs)."""

import os
import subprocess
from pathlib import Path

import yaml

from dfq.pipeline import paths
from stages._common import imports_done, read_params


def main() -> None:
    params = read_params()
    import mlflow  # noqa: F401  (what log_cells uses, imported with the collector still off: stages/__init__.py)

    from dfq.pipeline import runs, tracking
    from dfq.pipeline.lineage import lock_md5

    imports_done()

    root = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = {
        "git_commit": commit or "unknown",
        "dvc_stage": os.environ.get("DVC_STAGE", "track"),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "fp32_model_md5": lock_md5(lock, "fp32", str(paths.FP32)),
    }
    cells = runs.pipeline_runs(params, lock, common)
    uri = tracking.default_tracking_uri(root)
    print(f"logging {len(cells)} runs to {uri} (experiment {params.track.experiment!r})", flush=True)
    try:
        result = tracking.log_cells(
            cells, uri=uri, experiment=params.track.experiment, artifact_location=(root / "mlartifacts").as_uri()
        )
    except tracking.TrackingError as exc:
        raise SystemExit(str(exc)) from None
    print(f"MLflow: {result['logged']} runs logged, {result['skipped']} already logged (same inputs)")


if __name__ == "__main__":
    main()
