"""External services are checked before any work: an unreachable one stops the run with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.run import compose
from pipeline.services import check_rdb_url, check_services, check_tracking_uri

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def closed_port():
    """A loopback port bound but not listening: a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_unreachable_tracking_server_is_one_line_naming_it(closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(UserError) as err:
        check_tracking_uri(uri, timeout_s=2)
    assert uri in str(err.value) and "\n" not in str(err.value)


def test_unreachable_postgres_hides_the_password_and_names_the_host(closed_port):
    url = f"postgresql+psycopg://moa:s3cret-pw@127.0.0.1:{closed_port}/moa_optuna"
    with pytest.raises(UserError) as err:
        check_rdb_url(url, timeout_s=2)
    message = str(err.value)
    assert "s3cret-pw" not in message and "\n" not in message
    assert f"moa:***@127.0.0.1:{closed_port}/moa_optuna" in message


def test_local_stores_are_not_checked():
    for uri in ("sqlite:////nonexistent/mlflow.db", "file:///nonexistent/mlruns", "/nonexistent/mlruns"):
        check_tracking_uri(uri)
        check_rdb_url(uri)


def test_the_optuna_storage_is_checked_only_when_adapters_run(closed_port):
    storage = f"postgresql+psycopg://moa:pw@127.0.0.1:{closed_port}/moa_optuna"
    cfg = compose(["model=tiny", f"adapters.optuna.storage={storage}"])
    check_services(cfg, ["calibrate", "profile"])
    with pytest.raises(UserError, match=r"adapters\.optuna\.storage .*moa:\*\*\*@"):
        check_services(cfg, ["adapters"])


@pytest.mark.distributed
def test_reachable_postgres_passes(postgres_db):
    check_rdb_url(postgres_db)
    check_services(compose(["model=tiny", f"adapters.optuna.storage={postgres_db}"]), ["adapters"])


@pytest.mark.distributed
def test_cli_refuses_an_unreachable_tracking_server_before_any_work(tmp_path, closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    run_dir = tmp_path / "run"
    # Without the check MLflow would retry for minutes; bounded here so that a missing check fails, not hangs.
    env = {**os.environ, "MOA_NO_PROGRESS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    result = subprocess.run([sys.executable, "-m", "pipeline.run", "stage=calibrate", "model=tiny",
                             f"run_dir={run_dir}", f"tracking.uri={uri}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and uri in lines[0], result.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.iterdir())


@pytest.mark.distributed
def test_starting_a_running_postgres_again_returns_at_once(postgres_url):
    """The server must not inherit the start lock: a second start (a developer's, or a parallel test session's)
    would otherwise wait for the server to exit."""
    script = REPO / "scripts" / "postgres.sh"
    result = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(str(link.readlink()).endswith("moa-autotune-postgres.lock") for link in fd_dir.iterdir()):
                holders.append(fd_dir.parent.name)
        except OSError:
            continue
    assert not holders, f"processes still holding the start lock: {holders}"
