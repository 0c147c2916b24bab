"""End to end: the real `dvc repro` in a temporary git clone of the project on tiny params.

Checks the metrics files, the MLflow runs (real SQLite database), and DVC's granularity: which stages
rerun after one param changes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs the Debian package dataset-fashion-mnist")


def sh(cmd, cwd, env=None):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout + r.stderr


def ran(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("clone")
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT).split("\n")
    for f in files:
        keep = not f.startswith(("metrics/", "reports/")) or f.endswith(".gitkeep")  # folders the track stage reads
        if f and f != "dvc.lock" and keep and (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    tiny = {
        "data.num_images": 8,
        "data.real_pool": 64,
        "data.val_images": 200,
        "train.epochs": 1,
        "train.max_images": 2000,
        "generate.sources": ["zeroq", "real"],
        "generate.batch_size": 8,
        "generate.zeroq.iterations": 5,
        "quantize.bits": ["w8a8", "w2a2"],
        "evaluate.batch_size": 2000,
        "export.cells": ["zeroq-s0-w8a8"],
        "quantize.mixed.cells": [],
    }  # test_mixed_precision_cells adds one
    for k, v in tiny.items():
        set_param(repo, k, v)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"],
    ):
        sh(cmd, repo)
    return repo


@pytest.fixture(scope="module")
def reproduced(repo, env):
    """The output of the first `dvc repro` of the tiny pipeline: every test starts from a reproduced clone, so each
    passes when selected alone (`pytest -k NAME`); in file order the first test asserts on this run."""
    return sh(["dvc", "repro"], repo, env)


# The params the first test leaves (brecq protocol, qdrop rounding, one source, seed and cell): the later tests
# start from them; settle() sets them and reproduces (a no-op when the first test ran just before).
SETTLED = {
    "generate.seeds": [0],
    "generate.sources": ["zeroq"],
    "generate.zeroq.iterations": 6,
    "quantize.bits": ["w8a8"],
    "quantize.act_method": "percentile",
    "quantize.protocol": "brecq",
    "quantize.rounding": "qdrop",
    "quantize.reconstruction.iterations": 3,
    "quantize.mixed.cells": [],
    "finetune.sources": [],
}


def settle(repo, env):
    for k, v in SETTLED.items():
        set_param(repo, k, v)
    sh(["dvc", "repro"], repo, env)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}",
        DVC_NO_ANALYTICS="1",
        TQDM_DISABLE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    # only this file's stages count (dfq.threads): check_env's thread count does not depend on what else runs, and
    # under xdist the stages keep both threads once the other worker has run out of test files (a few minutes)
    e["DFQ_PROC_DIR"] = str(tmp_path_factory.mktemp("procs"))
    return e


def mlflow_client(repo):
    import mlflow

    return mlflow.tracking.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def mlflow_download(repo, uri, dst):
    """An MLflow artifact URI downloaded from the repo's store (the URI resolved against that store only)."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}"):
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))


def mlflow_runs(repo):
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("dfq")
    return client.search_runs([exp.experiment_id]) if exp else []


def table_row(results_md, source):
    """The cells of ``source``'s row in the first table of results.md."""
    for line in results_md.splitlines():
        if line.startswith(f"| {source} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row for {source} in results.md")


CELLS = [f"{s}-{k}-{b}" for s in ("zeroq", "real") for k in (0,) for b in ("w8a8", "w2a2")]


def test_repro_metrics_tracking_and_granularity(repo, env, reproduced):
    out = reproduced
    assert ran(out) == {
        "data",
        "fp32",
        "generate@zeroq-0",
        "generate@real-0",
        "diversity@zeroq-0",
        "diversity@real-0",
        "sensitivity@zeroq-0",
        "sensitivity@real-0",
        *(f"{st}@{c}" for st in ("calibrate", "evaluate") for c in CELLS),
        "export@zeroq-s0-w8a8",
        "report",
        "track",
    }
    exported = json.loads((repo / "metrics/export/zeroq-s0-w8a8.json").read_text())
    assert (repo / "models/export/zeroq-s0-w8a8.onnx").is_file()
    assert abs(exported["onnx_top1"] - exported["fakequant_top1"]) <= 0.2, exported
    # symmetric int8 weights (the default): every conv but the stem (it reads the FP32 image) runs integer
    assert exported["weight_scheme"] == "symmetric" and exported["integer_convs"] == 8, exported
    assert exported["float_convs"] == 1, exported
    fp32 = json.loads((repo / "metrics/fp32.json").read_text())
    assert set(fp32) == {"top1", "top5", "val_top1", "val_top5", "env"} and 30 < fp32["top1"] <= 100
    assert 30 < fp32["val_top1"] <= 100 and fp32["val_top1"] != fp32["top1"]  # 200 validation images, not the test set
    assert json.loads((repo / "data/prepared/meta.json").read_text())["val_images"] == 200
    assert len(torch_load(repo / "data/prepared/val/val.pt")["labels"]) == 200
    check_env(fp32["env"], env)
    cells = {}
    for s in ("zeroq", "real"):
        for b in ("w8a8", "w2a2"):
            cells[s, b] = json.loads((repo / f"metrics/eval/{s}-s0-{b}.json").read_text())
            assert (cells[s, b]["source"], cells[s, b]["seed"], cells[s, b]["bits"]) == (s, 0, b)
            assert 0 <= cells[s, b]["val_top1"] <= cells[s, b]["val_top5"] <= 100
            check_env(cells[s, b]["env"], env)
            for kind in ("calibrate", "diversity"):  # every metrics file says what decided it
                check_env(
                    json.loads(
                        (repo / f"metrics/{kind}/{s}-s0{'-' + b if kind == 'calibrate' else ''}.json").read_text()
                    )["env"],
                    env,
                )
        # a quantized result is judged: 8 bits stay within 3 points of FP32, 2 bits fall far below it
        # (measured on this tiny profile: 8-bit within ~0.3 points, 2-bit 20-50 points below)
        assert abs(cells[s, "w8a8"]["top1"] - fp32["top1"]) < 3, (s, cells[s, "w8a8"], fp32)
        assert cells[s, "w2a2"]["top1"] < fp32["top1"] - 10, (s, cells[s, "w2a2"], fp32)
        # every source gets the same number of calibration images
        meta = json.loads((repo / f"data/calib/{s}-s0/meta.json").read_text())
        assert meta["num_images"] == 8 and meta["seed"] == 0
        check_env(meta["env"], env)  # what decided the generated pixels
    assert cells["zeroq", "w2a2"]["top1"] != cells["real", "w2a2"]["top1"]  # different inputs, different cells
    # results.md shows exactly the metrics files' numbers (one seed: no std)
    results = (repo / "reports/results.md").read_text()
    for s in ("zeroq", "real"):
        row = table_row(results, s)
        assert row[1] == "1" and row[2].startswith(f"{fp32['top1']:.2f}")
        assert row[3] == f"{cells[s, 'w8a8']['top1']:.2f} ({cells[s, 'w8a8']['top5']:.2f})"
        assert row[4] == f"{cells[s, 'w2a2']['top1']:.2f} ({cells[s, 'w2a2']['top5']:.2f})"
    assert "## Validation split" in results and "200 validation images" in results
    val_row = table_row(results.split("## Validation split")[1], "zeroq")
    assert val_row[2] == f"{fp32['val_top1']:.2f} ({fp32['val_top5']:.2f})"
    assert val_row[3] == f"{cells['zeroq', 'w8a8']['val_top1']:.2f} ({cells['zeroq', 'w8a8']['val_top5']:.2f})"
    div = json.loads((repo / "metrics/diversity/zeroq-s0.json").read_text())
    assert len(div["bn_spread"]) == 9 and -1 <= div["feature_cosine"] <= 1
    assert (repo / "reports/accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((repo / "data/calib/zeroq-s0/meta.json").read_text())
    assert meta["method"] == "zeroq" and meta["batches"][0]["loss_end"] < meta["batches"][0]["loss_start"]
    assert "zeroq-s0-w8a8.json" in sh(["dvc", "metrics", "show"], repo, env)

    runs = mlflow_runs(repo)
    assert len(runs) == 4 + 4  # one per (source, seed, bits) and one aggregate per (source, bits)
    per_seed = {r.data.tags["source"] + "-" + r.data.tags["bits"]: r for r in runs if r.data.tags["seed"] == "0"}
    assert set(per_seed) == {"zeroq-w8a8", "zeroq-w2a2", "real-w8a8", "real-w2a2"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    tags = per_seed["zeroq-w8a8"].data.tags
    assert tags["synthetic_data_md5"] == lock["stages"]["generate@zeroq-0"]["outs"][0]["md5"]
    assert tags["git_commit"] == sh(["git", "rev-parse", "HEAD"], repo).strip()
    for (s, b), c in cells.items():
        assert per_seed[f"{s}-{b}"].data.metrics["top1"] == pytest.approx(c["top1"])
        assert per_seed[f"{s}-{b}"].data.metrics["val_top1"] == pytest.approx(c["val_top1"])
        assert per_seed[f"{s}-{b}"].data.metrics["fp32_val_top1"] == pytest.approx(fp32["val_top1"])
        # the run says what decided its numbers: its evaluation's environment as env.* tags
        assert {
            k: per_seed[f"{s}-{b}"].data.tags[f"env.{k}"] for k in ("torch", "cpu", "isa", "threads", "device")
        } == {k: str(c["env"][k]) for k in ("torch", "cpu", "isa", "threads", "device")}
    ranked = sh([sys.executable, "-m", "cli.compare", "--metric", "val_top1"], repo, env)
    assert f"| zeroq | w8a8 | {cells['zeroq', 'w8a8']['val_top1']:.2f} (1) |" in ranked, ranked
    # the exported cell's run carries its ONNX Runtime metrics, its quant map and the ONNX model itself
    ex = per_seed["zeroq-w8a8"]
    assert ex.data.metrics["onnx_top1"] == pytest.approx(exported["onnx_top1"])
    assert ex.data.metrics["integer_convs"] == 8 and ex.data.tags["onnx_dvc_path"] == "models/export/zeroq-s0-w8a8.onnx"
    client = mlflow_client(repo)
    # the ONNX model as an MLflow model of the run (ONNX flavour), byte-identical to the DVC-tracked file
    models = client.search_logged_models([ex.info.experiment_id], filter_string=f"source_run_id = '{ex.info.run_id}'")
    assert [m.name for m in models] == ["model"]
    stored = Path(mlflow_download(repo, f"models:/{models[0].model_id}", repo / "dl")) / "model.onnx"
    assert stored.read_bytes() == (repo / "models/export/zeroq-s0-w8a8.onnx").read_bytes()
    assert "reports/zeroq-s0-w8a8.md" in [f.path for f in client.list_artifacts(ex.info.run_id, "reports")]
    assert "onnx_top1" not in per_seed["real-w8a8"].data.metrics  # not exported
    agg = [r for r in runs if r.data.tags.get("aggregate") == "true"]
    assert len(agg) == 4 and all(r.data.metrics["seeds"] == 1 for r in agg)
    import mlflow

    exp = mlflow.tracking.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_experiment_by_name("dfq")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # nothing changed: nothing runs, and forcing the track stage logs no duplicate
    assert ran(sh(["dvc", "repro"], repo, env)) == set()
    assert "8 already logged" in sh(["dvc", "repro", "-f", "-s", "track"], repo, env)
    assert len(mlflow_runs(repo)) == 8

    # MLflow unreachable: the track stage fails with advice, outputs stay, and the rerun logs once
    down = {
        **env,
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    }
    r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=repo, env=down, capture_output=True, text=True)
    assert r.returncode != 0 and "cannot reach the MLflow tracking store" in r.stderr and "rerun" in r.stderr
    assert (repo / "metrics/eval/zeroq-s0-w8a8.json").is_file() and (repo / "reports/results.md").is_file()
    sh([sys.executable, "-m", "stages.track"], repo, env)
    assert len(mlflow_runs(repo)) == 8

    # a second seed adds its own sets and cells; seed 0's stages do not rerun
    set_param(repo, "generate.seeds", [0, 1])
    new = [f"{s}-1-{b}" for s in ("zeroq", "real") for b in ("w8a8", "w2a2")]
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        "generate@zeroq-1",
        "generate@real-1",
        "diversity@zeroq-1",
        "diversity@real-1",
        "sensitivity@zeroq-1",
        "sensitivity@real-1",
        *(f"{st}@{c}" for st in ("calibrate", "evaluate") for c in new),
        "report",
        "track",
    }
    for s in ("zeroq", "real"):  # each seed is its own calibration set
        b0 = torch_load(repo / f"data/calib/{s}-s0/batch_00000.pt")
        assert not torch_equal(b0, torch_load(repo / f"data/calib/{s}-s1/batch_00000.pt"))
    results = (repo / "reports/results.md").read_text()
    w2 = [json.loads((repo / f"metrics/eval/zeroq-s{k}-w2a2.json").read_text())["top1"] for k in (0, 1)]
    mean, std = sum(w2) / 2, abs(w2[0] - w2[1]) / 2**0.5
    assert table_row(results, "zeroq")[4].startswith(f"{mean:.2f} ± {std:.2f}")
    assert len(mlflow_runs(repo)) == 8 + 4 + 4  # 4 new per-seed runs, 4 new aggregates (their inputs changed)

    # a quantization param reruns calibrate, evaluate, report and track only (not the sensitivity stages)
    set_param(repo, "generate.seeds", [0])
    set_param(repo, "quantize.act_method", "percentile")
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        *(f"{st}@{c}" for st in ("calibrate", "evaluate") for c in CELLS),
        "export@zeroq-s0-w8a8",
        "report",
        "track",
    }
    assert json.loads((repo / "metrics/eval/zeroq-s0-w8a8.json").read_text())["act_method"] == "percentile"

    # reconstruction reads the cached synthetic tensors: switching protocol and rounding never regenerates
    # (the protocol sets which layers are allocatable and the weight grid: the sensitivity stage reruns)
    set_param(repo, "quantize.bits", ["w8a8"])
    set_param(repo, "generate.sources", ["zeroq"])
    set_param(repo, "quantize.protocol", "brecq")
    set_param(repo, "quantize.rounding", "qdrop")
    set_param(repo, "quantize.reconstruction.iterations", 3)
    out = sh(["dvc", "repro"], repo, env)
    assert ran(out) == {
        "sensitivity@zeroq-0",
        "calibrate@zeroq-0-w8a8",
        "evaluate@zeroq-0-w8a8",
        "export@zeroq-s0-w8a8",
        "report",
        "track",
    }
    assert "qdrop reconstruction on 8 images" in out
    cell = json.loads((repo / "metrics/eval/zeroq-s0-w8a8.json").read_text())
    assert cell["protocol"] == "brecq" and cell["rounding"] == "qdrop"
    assert abs(cell["top1"] - fp32["top1"]) < 3
    assert json.loads((repo / "metrics/calibrate/zeroq-s0-w8a8.json").read_text())["seconds"] > 0
    assert "rounding `qdrop`" in (repo / "reports/results.md").read_text()
    latest = max(mlflow_runs(repo), key=lambda r: r.info.start_time)
    assert latest.data.params["quantize.rounding"] == "qdrop"
    assert "edges" not in cell  # the protocol's own first/second/last-layer bits: not recorded

    # Genie-M: its bit rule (first layer's input raw) is in the calibrate and evaluate metrics, not only the
    # checkpoint; back to qdrop, the qdrop cell comes back from the run-cache
    set_param(repo, "quantize.rounding", "genie")
    assert {"calibrate@zeroq-0-w8a8", "evaluate@zeroq-0-w8a8"} <= ran(sh(["dvc", "repro"], repo, env))
    for kind in ("calibrate", "eval"):
        cell = json.loads((repo / f"metrics/{kind}/zeroq-s0-w8a8.json").read_text())
        assert (cell["rounding"], cell["edges"]) == ("genie", "genie")
    set_param(repo, "quantize.rounding", "qdrop")
    sh(["dvc", "repro"], repo, env)
    assert "edges" not in json.loads((repo / "metrics/eval/zeroq-s0-w8a8.json").read_text())

    # determinism: regenerating in a new process gives byte-identical synthetic tensors
    def batch_bytes():
        return {p.name: p.read_bytes() for p in sorted((repo / "data/calib/zeroq-s0").glob("batch_*.pt"))}

    before = batch_bytes()
    sh(["dvc", "repro", "-f", "-s", "generate@zeroq-0"], repo, env)
    assert batch_bytes() == before and before

    # a zeroq param reruns zeroq's generation and what follows, not data or fp32
    set_param(repo, "generate.zeroq.iterations", 6)
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        "generate@zeroq-0",
        "diversity@zeroq-0",
        "sensitivity@zeroq-0",
        "calibrate@zeroq-0-w8a8",
        "evaluate@zeroq-0-w8a8",
        "export@zeroq-s0-w8a8",
        "report",
        "track",
    }


def test_mixed_precision_cells(repo, env, reproduced):
    """A mixed cell (brecq protocol, qdrop rounding: SETTLED, the state the first test leaves) adds its
    calibrate_mixed and evaluate_mixed stages and reruns no uniform stage nor relogs a uniform run; its candidates
    rerun the sensitivity stage and the mixed cells only."""
    settle(repo, env)
    before = len(mlflow_runs(repo))
    set_param(repo, "quantize.mixed.cells", ["mp5a8"])
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        "calibrate_mixed@zeroq-0-mp5a8",
        "evaluate_mixed@zeroq-0-mp5a8",
        "report",
        "track",
    }
    sens = json.loads((repo / "metrics/sensitivity/zeroq-s0.json").read_text())
    assert [r["name"] for r in sens["layers"] if r["fixed_bits"] == 8] == ["stem.0", "fc"]  # brecq: first, last
    alloc = json.loads((repo / "metrics/calibrate/zeroq-s0-mp5a8.json").read_text())["allocation"]
    free = [r for r in alloc["layers"] if not r["fixed"]]
    assert alloc["avg_bits"] <= 5 and sum(r["params"] * r["bits"] for r in free) <= 5 * alloc["allocatable_params"]
    assert {r["bits"] for r in free} <= {2, 3, 4, 6, 8} and all(r["bits"] == 8 for r in alloc["layers"] if r["fixed"])
    cell = json.loads((repo / "metrics/eval/zeroq-s0-mp5a8.json").read_text())
    uniform = json.loads((repo / "metrics/eval/zeroq-s0-w8a8.json").read_text())
    assert cell["bits"] == "mp5a8" and cell["protocol"] == "brecq" and cell["weight_mb"] < uniform["weight_mb"]
    total = sum(r["params"] * r["bits"] for r in alloc["layers"])
    assert cell["weight_mb"] == pytest.approx(total / 8e6)  # evaluate rebuilt the allocated per-layer grid
    results = (repo / "reports/results.md").read_text()
    assert "| MP5A8 |" in results and "## Mixed-precision allocations" in results
    assert table_row(results, "zeroq")[-1] == f"{cell['top1']:.2f} ({cell['top5']:.2f})"
    assert (repo / "reports/size_vs_top1.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "reports/sensitivity/zeroq-s0.png").read_bytes()[:4] == b"\x89PNG"
    runs = mlflow_runs(repo)
    assert len(runs) == before + 2  # the mixed cell's run and its aggregate; no uniform run relogged
    mixed = next(r for r in runs if r.data.tags["bits"] == "mp5a8" and r.data.tags["seed"] == "0")
    assert mixed.data.metrics["weight_mb"] == pytest.approx(cell["weight_mb"])
    assert mixed.data.params["quantize.mixed.candidates"] == "[2, 3, 4, 6, 8]"
    arts = [f.path for f in mlflow_client(repo).list_artifacts(mixed.info.run_id, "allocation")]
    assert arts == ["allocation/zeroq-s0-mp5a8.md"]

    set_param(repo, "quantize.mixed.candidates", [2, 4, 8])
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        "sensitivity@zeroq-0",
        "calibrate_mixed@zeroq-0-mp5a8",
        "evaluate_mixed@zeroq-0-mp5a8",
        "report",
        "track",
    }
    alloc = json.loads((repo / "metrics/calibrate/zeroq-s0-mp5a8.json").read_text())["allocation"]
    assert {r["bits"] for r in alloc["layers"]} <= {2, 4, 8}
    set_param(repo, "quantize.mixed.cells", [])  # the tests below count the runs of uniform cells only
    assert ran(sh(["dvc", "repro"], repo, env)) == {"report", "track"}


def test_finetune_cells(repo, env, reproduced):
    """Fine-tuning a cell adds its set's extra images, its finetune and evaluate_finetune stages (nothing upstream
    reruns), a results section and MLflow runs; a training param reruns the fine-tuning only; a fine-tuning killed
    mid-run resumes from its last epoch and ends with the weights of an uninterrupted run."""
    settle(repo, env)
    before = len(mlflow_runs(repo))
    fp32 = json.loads((repo / "metrics/fp32.json").read_text())
    set_param(repo, "finetune.sources", ["zeroq"])
    set_param(repo, "finetune.bits", ["w8a8"])
    set_param(repo, "finetune.num_images", 24)
    set_param(repo, "finetune.train.epochs", 2)
    set_param(repo, "finetune.train.batch_size", 8)
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        "generate_finetune@zeroq-0",
        "finetune@zeroq-0-w8a8",
        "evaluate_finetune@zeroq-0-w8a8",
        "report",
        "track",
    }
    extra = sorted(p.name for p in (repo / "data/finetune/zeroq-s0").glob("batch_*.pt"))
    assert extra == ["batch_00001.pt", "batch_00002.pt"]  # the calibration set's batch 0, continued
    assert not torch_equal(
        torch_load(repo / "data/calib/zeroq-s0/batch_00000.pt"),
        torch_load(repo / "data/finetune/zeroq-s0/batch_00001.pt"),
    )
    ft = json.loads((repo / "metrics/finetune/zeroq-s0-w8a8-ft.json").read_text())
    assert ft["images"] == 24 and len(ft["loss_per_epoch"]) == 2 and ft["steps"] == 6 and ft["finetune_from"] == "qdrop"
    cell = json.loads((repo / "metrics/eval/zeroq-s0-w8a8-ft.json").read_text())
    assert cell["bits"] == "w8a8-ft" and cell["rounding"] == "finetune" and abs(cell["top1"] - fp32["top1"]) < 3
    results = (repo / "reports/results.md").read_text()
    assert "## Data-free fine-tuning" in results and "| W8A8-FT |" in results
    assert table_row(results, "zeroq")[-1] == f"{cell['top1']:.2f} ({cell['top5']:.2f})"
    runs = mlflow_runs(repo)
    assert len(runs) == before + 2  # the fine-tuned cell's run and its aggregate
    tuned = next(r for r in runs if r.data.tags["bits"] == "w8a8-ft" and r.data.tags["seed"] == "0")
    assert tuned.data.tags["finetune"] == "true" and tuned.data.params["finetune.train.epochs"] == "2"
    assert tuned.data.metrics["top1"] == pytest.approx(cell["top1"])

    set_param(repo, "finetune.train.epochs", 60)
    assert ran(sh(["dvc", "repro"], repo, env)) == {
        "finetune@zeroq-0-w8a8",
        "evaluate_finetune@zeroq-0-w8a8",
        "report",
        "track",
    }
    whole = torch_load(repo / "models/quant/zeroq-s0-w8a8-ft.pt")["state_dict"]
    # kill the stage (SIGKILL, its whole process group) once its first epoch checkpoint exists, then rerun it
    cmd = [sys.executable, "-m", "stages.finetune", "zeroq-s0", "w8a8"]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while not list((repo / ".dfq-scratch/finetune").glob("*/state.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the fine-tuning ended before its first checkpoint was seen"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = sh(cmd, repo, env)
    assert "resuming from" in out
    resumed = json.loads((repo / "metrics/finetune/zeroq-s0-w8a8-ft.json").read_text())["resumed_from_epoch"]
    assert 1 <= resumed < 60
    again = torch_load(repo / "models/quant/zeroq-s0-w8a8-ft.pt")["state_dict"]
    assert whole.keys() == again.keys() and all(torch_equal(whole[k], again[k]) for k in whole)
    assert not list((repo / ".dfq-scratch/finetune").glob("*/state.pt"))  # the scratch is dropped when done
    set_param(repo, "finetune.sources", [])  # the tests below count the runs of uniform cells only
    assert ran(sh(["dvc", "repro"], repo, env)) == {"report", "track"}


_THREADS: dict = {}  # the thread count the stages ran with, read once per session


def check_env(got, env, _threads=_THREADS):
    """A metrics file's env against values read here: torch's version, /proc/cpuinfo's model name, the thread
    count the stages ran with (DFQ_THREADS, else torch's default in a fresh process), the device."""
    import torch

    if "n" not in _threads:  # once per session
        _threads["n"] = int(env.get("DFQ_THREADS") or 0) or int(
            sh([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], ROOT, env).strip()
        )
    assert got["torch"] == torch.__version__ and got["threads"] == _threads["n"], got
    assert got["device"] == env.get("DFQ_DEVICE", "cpu") and got["isa"], got
    model = re.search(r"^model name\s*:\s*(.+?)\s*$", Path("/proc/cpuinfo").read_text(), re.M)
    if model:
        assert got["cpu"] == model.group(1), got


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)


def torch_equal(a, b):
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def test_share_through_the_default_remote(repo, env, reproduced, tmp_path):
    """dvc push --run-cache from one clone; a fresh clone pulls and reproduces without generating."""
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], repo)
    sh(["dvc", "push", "--run-cache"], repo, env)
    remote = (repo / ".dvc" / "../../dfq-dvc-remote").resolve()
    assert any(remote.rglob("*")), "nothing was pushed to the default local remote"
    clone = tmp_path / "second"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    # the clone's default remote resolves beside the clone: point it at the producer's remote
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], clone, env)
    out = sh(["dvc", "repro", "--pull"], clone, env)
    assert not ran(out) & {"data", "fp32", "generate@zeroq-0", "calibrate@zeroq-0-w8a8", "evaluate@zeroq-0-w8a8"}, out
    assert len(list((clone / "data/calib/zeroq-s0").glob("batch_*.pt"))) == 1


def test_queued_sweep_logs_every_experiment_to_one_database(repo, env, reproduced):
    """`dvc exp run --queue` over a grid + `dvc queue start -j 2`: experiments run in temp copies and
    all log to the main repo's SQLite database (absolute path from DVC_ROOT)."""
    before = len(mlflow_runs(repo))
    sh(["mlflow", "db", "upgrade", f"sqlite:///{repo / 'mlflow.db'}"], repo, env)  # create before workers
    sh(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-S",
            "generate.dsg.eps=0.5,0.9",
            "-S",
            "generate.sources=[dsg]",
            "-S",
            "generate.seeds=[0]",
            "-S",
            "generate.dsg.iterations=5",
            "-S",
            "export.cells=[]",
        ],
        repo,
        env,
    )
    sh(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    runs = mlflow_runs(repo)
    assert len(runs) == before + 2 * 2  # per experiment: one per-seed run and one aggregate (one seed, one bits)
    names = {r.data.tags["dvc_exp_name"] for r in runs[: len(runs) - before]}
    assert len(names) == 2 and "workspace" not in names
    shown = sh(["dvc", "exp", "show", "--no-pager", "--md"], repo, {**env, "COLUMNS": "400"})
    assert all(n in shown for n in names)


@pytest.fixture
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1, started here and stopped by its pid."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, proc, 60, "moto_server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_share_through_an_s3_remote(repo, env, reproduced, tmp_path, s3_server):
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3env = {**env, **creds}
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, **{k.lower(): v for k, v in creds.items() if "KEY" in k}, region_name="us-east-1"
    )
    s3.create_bucket(Bucket="dfq-cache")

    def use_s3(where):
        sh(["dvc", "remote", "add", "--local", "-f", "team", "s3://dfq-cache/dfq"], where, s3env)
        sh(["dvc", "remote", "modify", "--local", "team", "endpointurl", s3_server], where, s3env)
        sh(["dvc", "remote", "default", "--local", "team"], where, s3env)

    sh(["git", "add", "-A"], repo)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode:
        sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], repo)
    use_s3(repo)
    sh(["dvc", "push", "--run-cache"], repo, s3env)
    assert s3.list_objects_v2(Bucket="dfq-cache").get("KeyCount", 0) > 0
    clone = tmp_path / "s3clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    use_s3(clone)
    out = sh(["dvc", "repro", "--pull"], clone, s3env)
    assert not ran(out) & {"data", "fp32", "generate@zeroq-0", "calibrate@zeroq-0-w8a8", "evaluate@zeroq-0-w8a8"}, out
    assert list((clone / "data/calib/zeroq-s0").glob("batch_*.pt"))
