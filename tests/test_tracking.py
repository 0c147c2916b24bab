"""Real MLflow against a temporary SQLite database (no mocks)."""
import pytest

from dfq.tracking import HASH_TAG, Cell, TrackingError, default_tracking_uri, log_cells

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _environment_restored(monkeypatch):
    """log_cells opts out of telemetry with os.environ.setdefault; registering the keys with
    monkeypatch first restores (or removes) them after each test, so nothing leaks into later tests."""
    import os

    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, os.environ.get(key, "true"))


def cells(top1=90.0):
    return [Cell(run_name=f"zeroq-{b}", params={"source": "zeroq", "bits": b, "quantize": {"act_method": "minmax"}},
                 metrics={"top1": top1, "top5": 99.0}, tags={"source": "zeroq", "bits": b},
                 inputs={"data_md5": "abc"}) for b in ("w8a8", "w4a4")]


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
