"""Real MLflow against a temporary SQLite database (no mocks)."""

import pytest

from dfq.pipeline.tracking import HASH_TAG, Cell, TrackingError, default_tracking_uri, log_cells

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _environment_restored(monkeypatch):
    """log_cells opts out of telemetry with os.environ.setdefault; registering the keys with
    monkeypatch first restores (or removes) them after each test, so nothing leaks into later tests."""
    import os

    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, os.environ.get(key, "true"))


def cells(top1=90.0):
    return [
        Cell(
            run_name=f"zeroq-{b}",
            params={"source": "zeroq", "bits": b, "quantize": {"act_method": "minmax"}},
            metrics={"top1": top1, "top5": 99.0},
            tags={"source": "zeroq", "bits": b},
            inputs={"data_md5": "abc"},
        )
        for b in ("w8a8", "w4a4")
    ]


def runs(uri):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    return client.search_runs([exp.experiment_id])


def test_logging_is_idempotent_and_replaces_crashed_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    assert log_cells(cells(), **kw) == {"logged": 2, "skipped": 0}
    assert log_cells(cells(), **kw) == {"logged": 0, "skipped": 2}
    assert len(runs(uri)) == 2
    # a changed input is a new run
    assert log_cells(cells(top1=91.0), **kw)["logged"] == 2
    assert len(runs(uri)) == 4
    # a crash mid-run leaves an unfinished run with the hash: it is replaced, not duplicated
    c = cells(top1=50.0)[0]
    client = mlflow.tracking.MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("t").experiment_id, tags={HASH_TAG: c.input_hash()})
    assert run.info.status == "RUNNING"
    assert log_cells([c], **kw) == {"logged": 1, "skipped": 0}
    hashes = [r.data.tags[HASH_TAG] for r in runs(uri)]
    assert hashes.count(c.input_hash()) == 1
    logged = [r for r in runs(uri) if r.data.tags[HASH_TAG] == c.input_hash()][0]
    assert logged.data.metrics["top1"] == 50.0 and logged.data.params["quantize.act_method"] == "minmax"


def test_unreachable_store_says_how_to_fix(tmp_path, monkeypatch):
    uri = "http://127.0.0.1:9/"  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # undone after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(TrackingError, match="rerun"):
        log_cells(cells(), uri=uri, experiment="t", artifact_location=(tmp_path / "a").as_uri())


def test_default_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(".") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(".") == "http://127.0.0.1:5000"


def test_compare_across_experiments_and_the_experiment_kind(tmp_path):
    """cli.compare's table: mean, std and count over the per-seed runs of each DVC experiment; aggregate
    runs left out; a cell logged twice counts once (the latest)."""
    from dfq.pipeline.tracking import compare, compare_markdown, runs_page_url

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    values = {("a", 0): 70.0, ("a", 1): 72.0, ("a", 2): 74.0, ("b", 0): 75.0, ("b", 1): 77.0}

    def cell(exp, seed, top1, extra=None):
        tags = {"dvc_exp_name": exp, "source": "dsg", "bits": "w4a4", "seed": str(seed), **(extra or {})}
        return Cell(
            run_name=f"{exp}-{seed}", params={"seed": seed, "exp": exp, "v": top1}, metrics={"top1": top1}, tags=tags
        )

    log_cells([cell(e, k, v) for (e, k), v in values.items()], **kw)
    log_cells([cell("a", "mean", 99.0, {"aggregate": "true"}), cell("b", 1, 79.0)], **kw)  # b-1 logged again
    table = compare(uri, "t", "top1")
    assert table[("mean", "a")].iloc[0] == pytest.approx(72.0) and table[("std", "a")].iloc[0] == pytest.approx(2.0)
    assert table[("count", "a")].iloc[0] == 3
    assert table[("mean", "b")].iloc[0] == pytest.approx(77.0) and table[("count", "b")].iloc[0] == 2
    md = compare_markdown(table)
    assert "| dsg | w4a4 | 72.00 ± 2.00 (3) | 77.00 ± 2.83 (2) |" in md
    with pytest.raises(TrackingError, match="no run .* has a metric 'top9'"):
        compare(uri, "t", "top9")
    exp = mlflow.tracking.MlflowClient(uri).get_experiment_by_name("t")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs_page_url(uri, "t").endswith(f"/#/experiments/{exp.experiment_id}?workflowType=machine_learning")


def test_artifacts_land_under_their_folder(tmp_path):
    """A plain path goes under reports/, a (path, folder) pair under its folder (the exported ONNX model
    under model/); a path that does not exist is skipped."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "results.md").write_text("| a |\n")
    (tmp_path / "cell.onnx").write_bytes(b"onnx")
    c = Cell(
        run_name="zeroq-s0-w8a8",
        params={"source": "zeroq"},
        metrics={"top1": 90.0, "onnx_top1": 90.1},
        tags={"source": "zeroq"},
        artifacts=[
            str(tmp_path / "results.md"),
            (str(tmp_path / "cell.onnx"), "model"),
            (str(tmp_path / "missing.md"), "reports"),
        ],
    )
    log_cells([c], uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    client = mlflow.tracking.MlflowClient(uri)
    run_id = runs(uri)[0].info.run_id
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/results.md"]
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/cell.onnx"]
    local = client.download_artifacts(run_id, "model/cell.onnx", str(tmp_path / "dl"))
    assert open(local, "rb").read() == b"onnx"


def test_texts_are_logged_and_leave_other_hashes_alone(tmp_path):
    """A mixed cell's allocation table is logged from text (allocation/<cell>.md); a cell without texts
    keeps the input hash it had before texts existed, so adding the field relogs nothing."""
    import hashlib
    import json

    c = cells()[0]
    old = json.dumps({"params": c.params, "metrics": c.metrics, "inputs": c.inputs}, sort_keys=True)
    assert c.input_hash() == hashlib.sha256(old.encode()).hexdigest()
    mixed = Cell(
        run_name="zeroq-s0-mp4a4",
        params={"bits": "mp4a4"},
        metrics={"top1": 90.0},
        tags={"bits": "mp4a4"},
        texts={"allocation/zeroq-s0-mp4a4.md": "| layer | bits |\n|---|---|\n| fc | 8 |\n"},
    )
    assert mixed.input_hash() != Cell(mixed.run_name, mixed.params, mixed.metrics, mixed.tags).input_hash()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_cells([mixed], uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    client = mlflow.tracking.MlflowClient(uri)
    run_id = runs(uri)[0].info.run_id
    local = client.download_artifacts(run_id, "allocation/zeroq-s0-mp4a4.md", str(tmp_path / "dl"))
    assert open(local).read().endswith("| fc | 8 |\n")


def test_mixed_run_extras_and_cell_params(tmp_path):
    import json

    from dfq.pipeline.paths import calibrate_stage
    from dfq.pipeline.tracking import cell_quantize_params, mixed_run_extras

    alloc = {
        "budget_avg_bits": 4.0,
        "budget_bits": 40,
        "avg_bits": 3.9,
        "kl_sum": 0.0123,
        "allocatable_params": 10,
        "layers": [
            {"name": "stem.0", "params": 4, "bits": 6, "kl": 0.01, "fixed": False},
            {"name": "fc", "params": 6, "bits": 2, "kl": 0.0023, "fixed": False},
        ],
    }
    (tmp_path / "zeroq-s1-mp4a4.json").write_text(json.dumps({"seconds": 1.0, "allocation": alloc}))
    metrics, artifacts, texts = mixed_run_extras("zeroq-s1-mp4a4", tmp_path, "reports/sensitivity")
    assert metrics == {"avg_weight_bits_allocatable": 3.9, "allocation_kl_sum": 0.0123}
    assert artifacts == ["reports/sensitivity/zeroq-s1.png"]
    assert "| stem.0 | 4 | 6 | 0.01 |" in texts["allocation/zeroq-s1-mp4a4.md"]
    assert mixed_run_extras("zeroq-s1-w4a4", tmp_path) == ({}, [], {})
    q = {"bits": ["w4a4"], "mixed": {"cells": ["mp4a4"], "candidates": [2, 4, 8]}, "protocol": "zeroq"}
    assert cell_quantize_params(q, "w4a4") == {"protocol": "zeroq"}  # a new mixed cell never relogs uniform runs
    assert cell_quantize_params(q, "mp4a4") == {"protocol": "zeroq", "mixed": {"candidates": [2, 4, 8]}}
    assert calibrate_stage("zeroq", 1, "w4a4") == "calibrate@zeroq-1-w4a4"
    assert calibrate_stage("zeroq", 1, "mp3.5a4") == "calibrate_mixed@zeroq-1-mp3.5a4"


def test_validation_metrics_env_tags_and_compare_by_val_top1(tmp_path, monkeypatch, capsys):
    """A cell's run carries val_top1/val_top5 beside top1 and its metrics file's env as env.* tags (None left out);
    `python -m cli.compare --metric val_top1` ranks the experiments by the validation split."""
    from cli import compare
    from dfq.pipeline.tracking import accuracy_metrics, env_tags, fp32_metrics

    fp32 = {"top1": 92.0, "top5": 99.8, "val_top1": 95.0, "val_top5": 99.9, "env": {"threads": 1}}
    assert fp32_metrics(fp32) == {"fp32_top1": 92.0, "fp32_top5": 99.8, "fp32_val_top1": 95.0, "fp32_val_top5": 99.9}
    assert fp32_metrics({"top1": 92.0, "top5": 99.8}) == {"fp32_top1": 92.0, "fp32_top5": 99.8}
    cell = {"top1": 90.5, "top5": 99.0, "val_top1": 93.25, "val_top5": 99.5, "env": {}}
    assert accuracy_metrics(cell, fp32) == {
        "top1": 90.5,
        "top5": 99.0,
        "val_top1": 93.25,
        "val_top5": 99.5,
        "top1_drop": 1.5,
    }
    assert accuracy_metrics({"top1": 90.5, "top5": 99.0, "val_top1": float("nan")}, fp32) == {
        "top1": 90.5,
        "top5": 99.0,
        "top1_drop": 1.5,
    }  # a cell measured before the split (NaN in the table)
    env = {
        "torch": "2.14.1+cpu",
        "cuda": None,
        "cpu": "Some CPU @ 2.0GHz",
        "isa": "AVX2",
        "threads": 2,
        "device": "cpu",
    }
    tags = env_tags(env)
    assert tags == {
        "env.torch": "2.14.1+cpu",
        "env.cpu": "Some CPU @ 2.0GHz",
        "env.isa": "AVX2",
        "env.threads": "2",
        "env.device": "cpu",
    }
    assert env_tags(float("nan")) == {} and env_tags(None) == {}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_ = [
        Cell(
            run_name=f"{e}-{k}",
            params={"e": e, "k": k},
            metrics=accuracy_metrics({"top1": 80.0 + k, "top5": 99.0, "val_top1": v + k, "val_top5": 99.0}, fp32),
            tags={"dvc_exp_name": e, "source": "zeroq", "bits": "w4a4", "seed": str(k), **tags},
        )
        for e, v in (("a", 70.0), ("b", 75.0))
        for k in (0, 1)
    ]
    log_cells(runs_, uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    logged = runs(uri)
    assert all(r.data.tags["env.isa"] == "AVX2" and r.data.tags["env.threads"] == "2" for r in logged)
    assert "env.cuda" not in logged[0].data.tags
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    compare.main(["--metric", "val_top1", "--experiment", "t"])
    out = capsys.readouterr().out
    assert out.startswith("val_top1 by source, bits across dvc_exp_name")
    assert "| zeroq | w4a4 | 70.50 ± 0.71 (2) | 75.50 ± 0.71 (2) |" in out
