"""Server mode: a real `mlflow server` on 127.0.0.1 backed by SQLite; the pipeline's logging goes
through MLFLOW_TRACKING_URI=http://... and stays idempotent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, stop_group, wait_for_http

from dfq.pipeline.tracking import Cell, log_cells

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'srv.db'}",
            "--default-artifact-root",
            (tmp_path / "art").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc, 120, "mlflow server")
        yield url
    finally:
        stop_group(proc)


def test_logging_through_a_server_is_idempotent(server, tmp_path):
    cells = [
        Cell(
            run_name=f"dsg-{b}", params={"bits": b}, metrics={"top1": 80.0}, tags={"bits": b}, inputs={"data_md5": "x"}
        )
        for b in ("w4a4", "w6a6")
    ]
    kw = dict(uri=server, experiment="srv", artifact_location=(tmp_path / "art").as_uri())
    assert log_cells(cells, **kw) == {"logged": 2, "skipped": 0}
    assert log_cells(cells, **kw) == {"logged": 0, "skipped": 2}
    client = mlflow.tracking.MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("srv").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["dsg-w4a4", "dsg-w6a6"]
