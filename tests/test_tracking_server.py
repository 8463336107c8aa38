"""The pipeline against a real MLflow tracking server on PostgreSQL, read back through the server's REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.services import check_tracking_uri

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
FAST = ("stage=calibrate", "calibration.lengths=[768,1024]", "calibration.samples_per_length=1",
        "calibration.max_new_tokens=4")


def _api(uri: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET (or POST ``body`` to) ``<uri>/api/2.0/mlflow/<endpoint>``: the decoded JSON answer."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _download(uri: str, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"run_uuid": run_id, "path": path})
    with urllib.request.urlopen(f"{uri}/get-artifact?{query}", timeout=30) as response:
        return response.read()


def test_a_stage_run_is_recorded_on_the_server_with_its_artifacts(mlflow_server, tmp_path):
    check_tracking_uri(mlflow_server)
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline.run", "model=tiny", f"run_dir={run_dir}", *FAST,
                             f"tracking.uri={mlflow_server}"],
                            cwd=REPO, env={**os.environ, "MOA_NO_PROGRESS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    experiment = _api(mlflow_server, "experiments/get-by-name", experiment_name="moa-autotune")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), "artifacts must go through the server"
    runs = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    by_name = {run["info"]["run_name"]: run for run in runs}
    assert set(by_name) == {"pipeline:calibrate", "calibrate"}
    parent, stage = by_name["pipeline:calibrate"], by_name["calibrate"]
    assert all(run["info"]["status"] == "FINISHED" for run in runs)

    tags = {tag["key"]: tag["value"] for tag in stage["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == parent["info"]["run_id"] and tags["stage"] == "calibrate"
    params = {param["key"]: param["value"] for param in stage["data"]["params"]}
    assert json.loads(params["calibration"])["lengths"] == [768, 1024]
    metrics = {metric["key"]: metric["value"] for metric in stage["data"]["metrics"]}
    assert metrics["samples:768"] == 1.0 and metrics["samples:1024"] == 1.0 and metrics["stage_seconds"] > 0
    parent_params = {param["key"]: param["value"] for param in parent["data"]["params"]}
    assert parent_params["version.torch"].startswith("2.")

    run_id = stage["info"]["run_id"]
    listed = _api(mlflow_server, "artifacts/list", run_id=run_id, path="calibration")["files"]
    assert "calibration/manifest.json" in {entry["path"] for entry in listed}
    manifest = _download(mlflow_server, run_id, "calibration/manifest.json")
    assert manifest == (run_dir / "calibrate" / "manifest.json").read_bytes()
    stored = tmp_path / "mlartifacts-server" / experiment["experiment_id"] / run_id / "artifacts"
    assert (stored / "calibration" / "manifest.json").read_bytes() == manifest, "uploaded into the server's store"
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "mlartifacts").exists()
