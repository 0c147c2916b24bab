"""dfq.pipeline.lineage: dataset inputs named and digested as DVC knows them, logged on MLflow runs; and a teammate's
runs rebuilt from a clean clone (metrics and dvc.lock from git) by the track stage, idempotently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from dfq.pipeline import lineage
from dfq.pipeline.tracking import Cell, log_cells

ROOT = Path(__file__).resolve().parents[1]
LOCK = {
    "stages": {
        "generate@zeroq-0": {"outs": [{"path": "data/calib/zeroq-s0", "md5": "0123abcd.dir"}]},
        "fp32": {"outs": [{"path": "models/fp32.pt", "md5": "feedbeef"}]},
    }
}
RAW = {
    "data": {"num_images": 256},
    "model": {"arch": "fmnist_resnet", "weights": None},
    "generate": {"batch_size": 64, "zeroq": {"iterations": 500}, "mine": {"method": "dsg", "eps": 0.5}},
}


def test_dvc_remote_is_the_default_remote_with_local_overrides(tmp_path):
    (tmp_path / ".dvc").mkdir()
    assert lineage.dvc_remote(tmp_path) is None
    (tmp_path / ".dvc/config").write_text("[core]\n    remote = shared\n['remote \"shared\"']\n    url = /mnt/dvc\n")
    assert lineage.dvc_remote(tmp_path) == {"name": "shared", "url": "/mnt/dvc"}
    (tmp_path / ".dvc/config.local").write_text("['remote \"shared\"']\n    url = s3://bucket/dfq\n")
    assert lineage.dvc_remote(tmp_path) == {"name": "shared", "url": "s3://bucket/dfq"}


def test_set_and_model_inputs_carry_dvc_md5_path_remote_and_profile():
    remote = {"name": "shared", "url": "/mnt/dvc"}
    s = lineage.set_input("zeroq", 0, RAW, LOCK, remote, (1, 28, 28))
    assert s == {
        "name": "zeroq-s0",
        "digest": "0123abcd",
        "context": "calibration",
        "source": {"dvc_path": "data/calib/zeroq-s0", "dvc_stage": "generate@zeroq-0", "dvc_remote": remote},
        "profile": {
            "images": 256,
            "batch_size": 64,
            "method": "zeroq",
            "params": {"iterations": 500},
            "shape": [1, 28, 28],
        },
    }
    other = lineage.set_input("mine", 1, RAW, LOCK, None)  # a group running another method; not in dvc.lock yet
    assert other["digest"] == "unknown" and other["profile"]["method"] == "dsg" and "dvc_remote" not in other["source"]
    m = lineage.model_input(RAW, LOCK, None)
    assert m["name"] == "fp32" and m["digest"] == "feedbeef" and m["profile"]["weights"] == "trained by the fp32 stage"


def test_runs_log_their_sets_as_dataset_inputs(tmp_path):
    """Two cells on the same set show the same digest; a cell on another set another; the source and profile are
    the JSON of the input; relogging the same cells logs nothing new."""
    a = lineage.set_input("zeroq", 0, RAW, LOCK, None, (1, 28, 28))
    b = {**a, "name": "zeroq-s1", "digest": "99999999"}
    model = lineage.model_input(RAW, LOCK, None)
    cells = [
        Cell(run_name=n, params={"bits": n}, metrics={"top1": 1.0}, tags={"bits": n}, datasets=[d, model])
        for n, d in (("w8a8", a), ("w4a4", a), ("w4a4-s1", b))
    ]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(uri=uri, experiment="t", artifact_location=(tmp_path / "art").as_uri())
    assert log_cells(cells, **kw) == {"logged": 3, "skipped": 0}
    assert log_cells(cells, **kw) == {"logged": 0, "skipped": 3}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])}
    got = {
        n: [(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in r.inputs.dataset_inputs]
        for n, r in runs.items()
    }
    assert got["w8a8"] == got["w4a4"] == [("zeroq-s0", "0123abcd", "calibration"), ("fp32", "feedbeef", "model")]
    assert got["w4a4-s1"][0] == ("zeroq-s1", "99999999", "calibration")
    ds = runs["w8a8"].inputs.dataset_inputs[0].dataset
    assert ds.source_type == "dvc" and json.loads(ds.source)["dvc_path"] == "data/calib/zeroq-s0"
    assert json.loads(ds.profile) == a["profile"]


def test_a_teammate_rebuilds_the_runs_from_a_clean_clone(tmp_path):
    """Without what `dvc pull` brings, a clone has params.yaml, dvc.lock and the metrics in git: `make track`'s command
    logs every cell's run and every mean's with the set digests of dvc.lock, without any stage; again: nothing."""
    clone = tmp_path / "clone"  # what a clone has in git, without the code (the stage runs this checkout's)
    tracked = subprocess.run(
        ["git", "ls-files", "params.yaml", "dvc.lock", "dvc.yaml", "metrics", ".dvc/config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in tracked:
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        blob = subprocess.run(["git", "show", f"HEAD:{f}"], cwd=ROOT, capture_output=True, check=True).stdout
        (clone / f).write_bytes(blob)  # as committed: what a clone holds
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("DVC_ROOT", None)
    cmd = [sys.executable, "-m", "stages.track"]
    first = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    params = yaml.safe_load((clone / "params.yaml").read_text())
    cells = len(params["generate"]["sources"]) * len(params["generate"]["seeds"])
    cells *= len(params["quantize"]["bits"]) + len(params["quantize"]["mixed"]["cells"])
    means = cells // len(params["generate"]["seeds"])
    assert f"MLflow: {cells + means} runs logged, 0 already logged" in first.stdout
    again = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
    assert f"MLflow: 0 runs logged, {cells + means} already logged" in again.stdout, again.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(params["track"]["experiment"])
    run = client.search_runs([exp.experiment_id], filter_string="tags.source = 'zeroq' and tags.seed = '0'")[0]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    want = lineage.lock_md5(lock, "generate@zeroq-0", "data/calib/zeroq-s0").removesuffix(".dir")
    assert [i.dataset.digest for i in run.inputs.dataset_inputs][0] == want != "unknown"
