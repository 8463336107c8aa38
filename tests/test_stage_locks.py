"""Concurrent invocations on one run directory: one lock per stage, a clear refusal or a wait, no half artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.locks import stage_lock

REPO = Path(__file__).resolve().parents[1]
CALIBRATE = ("stage=calibrate", "model=tiny", "calibration.lengths=[768]", "calibration.samples_per_length=2")


def _cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "MOA_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", f"run_dir={run_dir}", *overrides], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_held_stage_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    with stage_lock(tmp_path, "calibrate", wait=False):
        process = _cli(tmp_path, *CALIBRATE)
        out, err = process.communicate(timeout=300)
    assert process.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "stage calibrate is running elsewhere" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert "lock_wait=true" in lines[0]
    assert sorted(p.name for p in (tmp_path / "calibrate").iterdir()) == [".lock", ".lock.owner"]
    assert not (tmp_path / "mlflow.db").exists()


def test_with_lock_wait_the_second_invocation_waits_then_runs(tmp_path):
    with stage_lock(tmp_path, "calibrate", wait=False):
        process = _cli(tmp_path, *CALIBRATE, "lock_wait=true")
        first_line = process.stdout.readline()  # printed just before it blocks on the lock
        assert "[calibrate] waiting: the stage is running elsewhere" in first_line, process.stderr.read()
        time.sleep(1.0)
        assert process.poll() is None  # still waiting
        assert not (tmp_path / "calibrate" / ".done.json").exists()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "[calibrate] done in" in out
    assert (tmp_path / "calibrate" / ".done.json").is_file()


def test_two_concurrent_invocations_run_the_stage_once(tmp_path):
    first, second = (_cli(tmp_path, *CALIBRATE, "lock_wait=true") for _ in range(2))
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    ran = [out for out, _ in outputs if "[calibrate] done in" in out]
    assert len(ran) == 1, outputs
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("moa-autotune")
    stage_runs = client.search_runs([experiment.experiment_id], "tags.stage = 'calibrate'")
    assert len(stage_runs) == 1


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.locks import stage_lock\n"
         "with stage_lock(Path(sys.argv[1]), 'profile', wait=False):\n    print('held', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"stage profile is running elsewhere on .*pid {holder.pid}"):
        with stage_lock(tmp_path, "profile", wait=False):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with stage_lock(tmp_path, "profile", wait=False):  # the kernel dropped the dead holder's lock
        pass
