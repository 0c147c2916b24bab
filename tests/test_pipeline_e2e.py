"""End to end: the real `dvc repro` in a temporary git clone of the project on tiny params.

Checks the metrics files, the MLflow runs (real SQLite database), and DVC's granularity: which stages
rerun after one param changes.
"""
import json
import os
import re
import shutil
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
        if f and f != "dvc.lock" and not f.startswith(("metrics/", "reports/")) and (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    tiny = {"data.num_images": 8, "train.epochs": 1, "train.max_images": 2000, "generate.sources": ["zeroq"],
            "generate.batch_size": 8, "generate.zeroq.iterations": 5, "quantize.bits": ["w8a8"],
            "evaluate.batch_size": 2000}
    for k, v in tiny.items():
        set_param(repo, k, v)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        sh(cmd, repo)
    return repo


@pytest.fixture(scope="module")
def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}", DVC_NO_ANALYTICS="1", TQDM_DISABLE="1",
             MLFLOW_DISABLE_TELEMETRY="true")
    return e


def mlflow_runs(repo):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dfq")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_repro_metrics_tracking_and_granularity(repo, env):
    out = sh(["dvc", "repro"], repo, env)
    assert ran(out) == {"data", "fp32", "generate@zeroq", "diversity@zeroq", "calibrate@zeroq-w8a8",
                        "evaluate@zeroq-w8a8", "report", "track"}
    fp32 = json.loads((repo / "metrics/fp32.json").read_text())
    cell = json.loads((repo / "metrics/eval/zeroq-w8a8.json").read_text())
    assert set(fp32) == {"top1", "top5"} and 10 < fp32["top1"] <= 100
    assert cell["source"] == "zeroq" and cell["bits"] == "w8a8" and 0 <= cell["top1"] <= 100
    assert "| zeroq |" in (repo / "reports/results.md").read_text()
    div = json.loads((repo / "metrics/diversity/zeroq.json").read_text())
    assert len(div["bn_spread"]) == 9 and -1 <= div["feature_cosine"] <= 1
    assert (repo / "reports/accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((repo / "data/calib/zeroq/meta.json").read_text())
    assert meta["method"] == "zeroq" and meta["batches"][0]["loss_end"] < meta["batches"][0]["loss_start"]
    assert "zeroq-w8a8.json" in sh(["dvc", "metrics", "show"], repo, env)

    runs = mlflow_runs(repo)
    assert len(runs) == 1
    tags = runs[0].data.tags
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert tags["synthetic_data_md5"] == lock["stages"]["generate@zeroq"]["outs"][0]["md5"]
    assert tags["git_commit"] == sh(["git", "rev-parse", "HEAD"], repo).strip()
    assert runs[0].data.metrics["top1"] == pytest.approx(cell["top1"])

    # nothing changed: nothing runs, and forcing the track stage logs no duplicate
    assert ran(sh(["dvc", "repro"], repo, env)) == set()
    assert "1 already logged" in sh(["dvc", "repro", "-f", "-s", "track"], repo, env)
    assert len(mlflow_runs(repo)) == 1

    # MLflow unreachable: the track stage fails with advice, outputs stay, and the rerun logs once
    down = {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=repo, env=down, capture_output=True, text=True)
    assert r.returncode != 0 and "cannot reach the MLflow tracking store" in r.stderr and "rerun" in r.stderr
    assert (repo / "metrics/eval/zeroq-w8a8.json").is_file() and (repo / "reports/results.md").is_file()
    sh([sys.executable, "-m", "stages.track"], repo, env)
    assert len(mlflow_runs(repo)) == 1

    # a quantization param reruns calibrate, evaluate, report and track only
    set_param(repo, "quantize.act_method", "percentile")
    assert ran(sh(["dvc", "repro"], repo, env)) == {"calibrate@zeroq-w8a8", "evaluate@zeroq-w8a8", "report", "track"}
    assert len(mlflow_runs(repo)) == 2

    # reconstruction reads the cached synthetic tensors: switching protocol and rounding never regenerates
    set_param(repo, "quantize.protocol", "brecq")
    set_param(repo, "quantize.rounding", "qdrop")
    set_param(repo, "quantize.reconstruction.iterations", 3)
    out = sh(["dvc", "repro"], repo, env)
    assert ran(out) == {"calibrate@zeroq-w8a8", "evaluate@zeroq-w8a8", "report", "track"}
    assert "qdrop reconstruction on 8 images" in out
    cell = json.loads((repo / "metrics/eval/zeroq-w8a8.json").read_text())
    assert cell["protocol"] == "brecq" and cell["rounding"] == "qdrop"
    assert json.loads((repo / "metrics/calibrate/zeroq-w8a8.json").read_text())["seconds"] > 0
    assert "rounding `qdrop`" in (repo / "reports/results.md").read_text()
    runs = mlflow_runs(repo)
    assert len(runs) == 3
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.data.params["quantize.rounding"] == "qdrop" and latest.data.metrics["calibration_seconds"] > 0

    # determinism: regenerating in a new process gives byte-identical synthetic tensors
    def batch_bytes():
        return {p.name: p.read_bytes() for p in sorted((repo / "data/calib/zeroq").glob("batch_*.pt"))}

    before = batch_bytes()
    sh(["dvc", "repro", "-f", "-s", "generate@zeroq"], repo, env)
    assert batch_bytes() == before and before

    # a zeroq param reruns zeroq's generation and what follows, not data or fp32
    set_param(repo, "generate.zeroq.iterations", 6)
    assert ran(sh(["dvc", "repro"], repo, env)) == {"generate@zeroq", "diversity@zeroq", "calibrate@zeroq-w8a8",
                                                     "evaluate@zeroq-w8a8", "report", "track"}
    assert len(mlflow_runs(repo)) == 4


def test_share_through_the_default_remote(repo, env, tmp_path):
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
    assert not ran(out) & {"data", "fp32", "generate@zeroq", "calibrate@zeroq-w8a8", "evaluate@zeroq-w8a8"}, out
    assert len(list((clone / "data/calib/zeroq").glob("batch_*.pt"))) == 1


def test_queued_sweep_logs_every_experiment_to_one_database(repo, env):
    """`dvc exp run --queue` over a grid + `dvc queue start -j 2`: experiments run in temp copies and
    all log to the main repo's SQLite database (absolute path from DVC_ROOT)."""
    before = len(mlflow_runs(repo))
    sh(["mlflow", "db", "upgrade", f"sqlite:///{repo / 'mlflow.db'}"], repo, env)  # create before workers
    sh(["dvc", "exp", "run", "--queue", "-S", "generate.dsg.eps=0.5,0.9", "-S", "generate.sources=[dsg]",
        "-S", "generate.dsg.iterations=5", "-S", "generate.dsg.batch_multiple=1"], repo, env)
    sh(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    runs = mlflow_runs(repo)
    assert len(runs) == before + 2
    names = {r.data.tags["dvc_exp_name"] for r in runs[: len(runs) - before]}
    assert len(names) == 2 and "workspace" not in names
    shown = sh(["dvc", "exp", "show", "--no-pager", "--md"], repo, {**env, "COLUMNS": "400"})
    assert all(n in shown for n in names)


@pytest.fixture
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1, started here and stopped by its pid."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, proc, 60, "moto_server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_share_through_an_s3_remote(repo, env, tmp_path, s3_server):
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3env = {**env, **creds}
    s3 = boto3.client("s3", endpoint_url=s3_server, **{k.lower(): v for k, v in creds.items() if "KEY" in k},
                      region_name="us-east-1")
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
    assert not ran(out) & {"data", "fp32", "generate@zeroq", "calibrate@zeroq-w8a8", "evaluate@zeroq-w8a8"}, out
    assert list((clone / "data/calib/zeroq").glob("batch_*.pt"))
