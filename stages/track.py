"""Stage track (no outputs, so DVC never skips it through its run-cache): one MLflow run per (source, seed, bits)
cell with its test and validation accuracy (top1, val_top1), tagged with its seed and with what decided its numbers
(env.* tags from its evaluation metrics: torch build, CPU, ISA, threads, device); an exported cell adds its ONNX
Runtime metrics, its quant map and its ONNX model. Plus one aggregate run per (source, bits): mean, std over seeds."""
import json
import os
import subprocess
from pathlib import Path

import yaml

from stages._common import load_params, read_params

ARTIFACTS = ["reports/results.md", "reports/accuracy_vs_bits.png", "reports/size_vs_top1.png", "reports/bn_spread.png",
             "reports/samples.png"]


def main() -> None:
    data_p, model_p, train_p, gen_p, quant_p, track_p, ft_p = load_params("data", "model", "train", "generate", "quantize",
                                                                         "track", "finetune")
    from dfq.pipeline import report, tracking
    from dfq.pipeline.tracking import lock_md5

    root = Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    fp32 = json.loads(Path("metrics/fp32.json").read_text())
    cells = report.pipeline_cells(gen_p["sources"], gen_p["seeds"], quant_p["bits"] + quant_p["mixed"]["cells"], ft_p)
    common = {"git_commit": commit or "unknown", "dvc_stage": os.environ.get("DVC_STAGE", "track"),
              "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
              "fp32_model_md5": lock_md5(lock, "fp32", "models/fp32.pt")}
    base = tracking.fp32_metrics(fp32)
    runs, exported = [], set((read_params().get("export") or {}).get("cells", []))
    for m in cells.to_dict("records"):
        s, k, b = m["source"], m["seed"], m["bits"]
        name = f"{s}-s{k}"
        div = json.loads((Path("metrics/diversity") / f"{name}.json").read_text())
        data_md5 = lock_md5(lock, f"generate@{s}-{k}", f"data/calib/{name}")
        ex_m, ex_t, ex_a = tracking.export_run_extras(f"{name}-{b}") if f"{name}-{b}" in exported else ({}, {}, [])
        mx_m, mx_a, mx_t = tracking.mixed_run_extras(f"{name}-{b}")  # mixed precision: allocation, heat map
        env = tracking.env_tags(m.get("env"))  # hashed with the inputs: another environment logs a new run
        params = {"source": s, "seed": k, "bits": b, "data": data_p, "model": model_p,
                  "train": {} if model_p.get("weights") else train_p,
                  "generate": {"batch_size": gen_p["batch_size"], s: gen_p[s]},
                  "quantize": tracking.cell_quantize_params(quant_p, b),
                  **({"finetune": {"num_images": ft_p["num_images"], "train": ft_p["train"]}} if b.endswith("-ft") else {})}
        runs.append(tracking.Cell(
            run_name=f"{name}-{b}", params=params,
            metrics={**base, **tracking.accuracy_metrics(m, fp32), "bn_spread_mean": div["bn_spread_mean"],
                     "feature_cosine": div["feature_cosine"],
                     **({"calibration_seconds": m["calibration_seconds"]} if m["calibration_seconds"] else {}),
                     **{f"bn_spread_layer_{i}": v for i, v in enumerate(div["bn_spread"])}, **ex_m, **mx_m,
                     **({"weight_mb": m["weight_mb"]} if m.get("weight_mb", -1) >= 0 else {})},
            tags={**common, "source": s, "seed": str(k), "bits": b, "synthetic_data_md5": data_md5, **ex_t, **env,
                  **({"finetune": "true"} if b.endswith("-ft") else {})},
            artifacts=ARTIFACTS + ex_a + mx_a, texts=mx_t,
            inputs={"data_md5": data_md5, "env": env, "quant_md5": lock_md5(lock, tracking.calibrate_stage(s, k, b),
                                                                             f"models/quant/{name}-{b}.pt")}))
    for a in report.aggregate(cells).to_dict("records"):
        s, b = a["source"], a["bits"]
        params = {"source": s, "seeds": gen_p["seeds"], "bits": b, "model": model_p, "generate": {s: gen_p[s]},
                  "quantize": tracking.cell_quantize_params(quant_p, b)}
        runs.append(tracking.Cell(
            run_name=f"{s}-{b}-mean", params=params,
            metrics={**base, **{k: v for k, v in a.items() if k not in ("source", "bits") and v == v}},
            tags={**common, "source": s, "seed": "mean", "bits": b, "aggregate": "true"}))
    uri = tracking.default_tracking_uri(root)
    print(f"logging {len(runs)} runs to {uri} (experiment {track_p['experiment']!r})", flush=True)
    try:
        result = tracking.log_cells(runs, uri=uri, experiment=track_p["experiment"],
                                    artifact_location=(root / "mlartifacts").as_uri())
    except tracking.TrackingError as exc:
        raise SystemExit(str(exc)) from None
    print(f"MLflow: {result['logged']} runs logged, {result['skipped']} already logged (same inputs)")


if __name__ == "__main__":
    main()
