"""DVC's own view of the results, without MLflow (docs/dvc-plots.md), on a tiny DVC repository in a temporary folder:
git and `dvc init`, one stage that copies a prepared reports/cells.csv (written by report.cells_csv) and one cell's
metrics/eval JSON, this project's top-level `plots:` definition and its template .dvc/plots/top1_vs_bits.json; a
baseline commit and one experiment (`dvc exp run -S variant=b`, every top-1 one point higher). Checked through the
JSON that `dvc plots diff`, `dvc exp show` and `dvc metrics diff` print (the HTML of `dvc plots show` loads its chart
library from a CDN). No training: a few seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dfq.pipeline import paths, report

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "top1_vs_bits.json"
TOP1 = {"zeroq": {"w8a8": 90.0, "w4a4": 80.0, "mp4a4": 84.0}, "dsg": {"w8a8": 91.0, "w4a4": 83.0, "mp4a4": 85.0}}
CELL = "zeroq-s0-w4a4"  # the cell whose metrics/eval file the stage declares


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"dvc {' '.join(args)}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def cells(shift: float) -> pd.DataFrame:
    """Two sources x seeds 0, 1 x (w8a8, w4a4, mp4a4); seed 1 one point above seed 0 (mean +0.5), all + ``shift``."""
    rows = [
        {"source": s, "seed": k, "bits": b, "top1": t + k + shift, "top5": 99.0}
        for s, per_bits in TOP1.items()
        for b, t in per_bits.items()
        for k in (0, 1)
    ]
    return pd.DataFrame(rows)


def project_dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvcplots")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    dvc(repo, "init", "-q")
    (repo / ".dvc" / "plots").mkdir()
    (repo / ".dvc" / "plots" / TEMPLATE.name).write_text(TEMPLATE.read_text())
    for variant, shift in (("a", 0.0), ("b", 1.0)):
        (repo / "src" / variant).mkdir(parents=True)
        (repo / "src" / variant / "cells.csv").write_text(report.cells_csv(cells(shift)))
        (repo / "src" / variant / f"{CELL}.json").write_text(json.dumps({"top1": TOP1["zeroq"]["w4a4"] + shift}))
    table, metrics = paths.CELLS_TABLE.as_posix(), paths.eval_metrics(CELL).as_posix()
    stage = {
        "cmd": f"mkdir -p reports metrics/eval && cp src/${{variant}}/cells.csv {table} && "
        f"cp src/${{variant}}/{CELL}.json {metrics}",
        "deps": ["src"],
        "params": ["variant"],
        "outs": [{table: {"cache": False}}],  # as the project's report stage declares it
        "metrics": [{metrics: {"cache": False}}],  # as the project's evaluate stages declare theirs
    }
    spec = {"stages": {"report": stage}, "plots": project_dvc_yaml()["plots"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (repo / "params.yaml").write_text("variant: a\n")
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "baseline")
    dvc(repo, "exp", "run", "-q", "-S", "variant=b", "-n", "better")
    return repo


def test_the_project_declares_the_table_and_its_plot():
    """dvc.yaml: reports/cells.csv an uncached out of the report stage (not a stage plot: DVC would draw it a second
    time with its default template), drawn by the top-level plot top1_vs_bits with the project's template."""
    spec = project_dvc_yaml()
    assert {paths.CELLS_TABLE.as_posix(): {"cache": False}} in spec["stages"]["report"]["outs"]
    (plot,) = [p["top1_vs_bits"] for p in spec["plots"] if "top1_vs_bits" in p]
    assert plot["y"] == {paths.CELLS_TABLE.as_posix(): "top1_mean"} and plot["x"] == "weight_bits"
    assert (TEMPLATE.parent / f"{plot['template']}.json") == TEMPLATE and TEMPLATE.is_file()
    assert set(plot["x"].split()) | {"top1_mean", "source", "seed", "kind", "top1_std"} <= set(report.CELLS_COLUMNS)


def test_plots_diff_draws_mean_top1_vs_bits_per_source_and_experiment(repo):
    out = json.loads(dvc(repo, "plots", "diff", "HEAD", "better", "--json"))
    assert not out.get("errors")
    assert list(out["data"]) == ["top1_vs_bits"]  # one plot: the table is not drawn a second time as an output plot
    (plot,) = out["data"]["top1_vs_bits"]
    assert plot["type"] == "vega" and plot["revisions"] == ["HEAD", "better"]
    content = plot["content"]
    assert content["encoding"]["color"]["field"] == "source"  # one line per source ...
    line = content["layer"][0]
    assert line["mark"]["type"] == "line" and line["encoding"]["strokeDash"]["field"] == "rev"  # ... and experiment
    assert {"filter": "datum.seed === 'mean'"} in content["transform"]  # the mean rows only
    assert {"filter": "datum.kind === 'uniform'"} in line["transform"]  # mixed cells: points, not on the line
    assert "toNumber(datum['weight_bits'])" in json.dumps(content["transform"])  # x and y filled from dvc.yaml
    means = {
        (d["rev"], d["source"], d["bits"]): (float(d["weight_bits"]), float(d["top1_mean"]), d["top1_std"])
        for d in content["data"]["values"]
        if d["seed"] == "mean"
    }
    assert means[("HEAD", "zeroq", "w4a4")] == (4.0, 80.5, "0.7071")
    assert means[("better", "zeroq", "w4a4")] == (4.0, 81.5, "0.7071")
    assert means[("HEAD", "dsg", "w8a8")] == (8.0, 91.5, "0.7071")
    assert means[("better", "dsg", "mp4a4")] == (4.0, 86.5, "0.7071")
    assert len(means) == 2 * 2 * 3  # revisions x sources x bits


def test_plots_show_draws_the_workspace(repo):
    out = json.loads(dvc(repo, "plots", "show", "--json"))
    assert list(out["data"]) == ["top1_vs_bits"] and out["data"]["top1_vs_bits"][0]["revisions"] == ["workspace"]


def test_exp_show_and_metrics_diff_list_top1_per_cell(repo):
    """`dvc exp show` lists each metrics/eval/<cell>.json's top1 per commit and experiment; `dvc metrics diff`
    compares them."""
    metrics = paths.eval_metrics(CELL).as_posix()
    (base,) = [r for r in json.loads(dvc(repo, "exp", "show", "--json")) if r["rev"] != "workspace"]
    assert base["data"]["metrics"][metrics]["data"]["top1"] == 80.0
    ((exp,),) = [e["revs"] for e in base["experiments"]]
    assert exp["name"] == "better" and exp["data"]["metrics"][metrics]["data"]["top1"] == 81.0
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD", "better", "--json"))
    assert diff[metrics]["top1"] == {"old": 80.0, "new": 81.0, "diff": 1.0}
