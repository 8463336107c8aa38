"""``torchrun -m pipeline.run stage=profile``: 2 gloo ranks equal one process; a killed job fails fast and resumes;
every other stage is refused under torchrun.

The oracle is the same stage run in one process on a copy of the same calibration. Every process uses one torch
thread, so the per-sample influence is computed identically and only the float64 summation order differs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (768, 3072)  # 3072: about 0.3 s a sample on a slow core, so a rank can be killed between two of them
CONFIG = ("model=tiny", "calibration.samples_per_length=6", f"calibration.lengths=[{','.join(map(str, LENGTHS))}]")
ENV = {**os.environ, "MOA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
RTOL = 2.5e-7  # two float32 ulps: float64 sums in another order may round differently when cast


def pipeline_cmd(run_dir: Path, *args: str, ranks: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "pipeline.run", *CONFIG, f"run_dir={run_dir}", *args]


def run(run_dir: Path, *args: str, ranks: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline_cmd(run_dir, *args, ranks=ranks), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def with_calibration(oracle: Path, run_dir: Path) -> Path:
    """A fresh run directory holding only the oracle's calibration (artifacts and marker)."""
    shutil.copytree(oracle / "calibrate", run_dir / "calibrate", ignore=shutil.ignore_patterns(".lock*"))
    return run_dir


def influence(run_dir: Path, n: int) -> torch.Tensor:
    return load_file(run_dir / "profile" / f"influence_{n}.safetensors")["influence"]


def profile_files(run_dir: Path) -> set[str]:
    """Every file under ``profile/``, hidden ones (partials, the marker) included, lock files aside."""
    return {str(p.relative_to(run_dir)) for p in (run_dir / "profile").rglob("*")
            if p.is_file() and not p.name.startswith(".lock")}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Path:
    """Calibrated and profiled in one process."""
    run_dir = tmp_path_factory.mktemp("oracle")
    for stage in ("calibrate", "profile"):
        result = run(run_dir, f"stage={stage}")
        assert result.returncode == 0, result.stderr
    return run_dir


def assert_same_influence(run_dir: Path, oracle: Path) -> None:
    for n in LENGTHS:
        torch.testing.assert_close(influence(run_dir, n), influence(oracle, n), rtol=RTOL, atol=0)


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_only_rank_0_writes(oracle, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = with_calibration(oracle, tmp_path / "r")
    result = run(run_dir, "stage=profile", ranks=2)
    assert result.returncode == 0, result.stderr
    assert_same_influence(run_dir, oracle)
    with safe_open(str(run_dir / "profile" / "influence_3072.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["world_size"] == "2" and meta["samples"] == "6" and meta["skipped_samples"] == "0"
    assert profile_files(run_dir) == profile_files(oracle)  # no rank-1 file, and the partial files are gone
    assert result.stdout.count("[profile] running") == 1 and result.stdout.count("MLflow parent run") == 1

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name for r in runs) == ["pipeline:profile", "profile"]
    assert {r.info.status for r in runs} == {"FINISHED"}

    again = run(run_dir, "stage=profile", ranks=2)  # every rank takes rank 0's "up to date" decision
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout and "[profile] running" not in again.stdout


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "pipeline.run" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def launch(run_dir: Path, *args: str) -> subprocess.Popen:
    """torchrun with 2 ranks in its own session; returns once rank 1 has checkpointed its first 3072 sample."""
    launcher = subprocess.Popen(pipeline_cmd(run_dir, "stage=profile", *args, ranks=2), cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not list((run_dir / "profile" / ".partial").glob("*/partial_3072.rank1of2.safetensors")):
        if launcher.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint of rank 1 appeared:\n{launcher.communicate()[0]}")
        time.sleep(0.01)
    return launcher


@pytest.mark.slow
def test_killed_rank_fails_the_job_quickly_and_a_rerun_resumes(oracle, tmp_path):
    run_dir = with_calibration(oracle, tmp_path / "r")
    partial = run_dir / "profile" / ".partial"
    launcher = launch(run_dir, "profile.checkpoint_every=1")
    try:
        victim = _rank_process(psutil.Process(launcher.pid), 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output, _ = launcher.communicate(timeout=60)
        failed_after = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0, output
    assert failed_after < 30, f"torchrun took {failed_after:.0f} s to fail after a rank died"
    assert not (run_dir / "profile" / ".done.json").exists()
    assert not (run_dir / "profile" / "influence_3072.safetensors").exists()
    assert (run_dir / "profile" / "influence_768.safetensors").exists()  # finished before the kill: kept
    with safe_open(str(next(partial.glob("*/partial_3072.rank1of2.safetensors"))), framework="pt") as f:
        done_by_rank_1 = int(f.metadata()["used"])
    assert done_by_rank_1 >= 1

    result = run(run_dir, "stage=profile", "profile.checkpoint_every=1", ranks=2)
    assert result.returncode == 0, result.stderr
    assert f"resuming from partial_3072.rank1of2.safetensors: {done_by_rank_1} samples done" in result.stdout
    assert_same_influence(run_dir, oracle)
    assert profile_files(run_dir) == profile_files(oracle)


HUNG_TIMEOUT_S = 15


@pytest.mark.slow
def test_hung_rank_fails_the_others_at_the_collective_timeout(oracle, tmp_path):
    """A rank that stops answering (not dead, so torchrun sees nothing) fails rank 0 once its collective times
    out, with one clear line instead of a hang."""
    run_dir = with_calibration(oracle, tmp_path / "r")
    # Long enough that ranks running at different speeds on a loaded machine never trip it; short for a test.
    launcher = launch(run_dir, f"profile.collective_timeout_s={HUNG_TIMEOUT_S}")
    try:
        ranks = [_rank_process(psutil.Process(launcher.pid), r) for r in (0, 1)]
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        ranks[0].wait(timeout=60)
        waited = time.monotonic() - stopped
        ranks[1].kill()  # a stopped process would sit out torchrun's SIGTERM grace period
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert waited < HUNG_TIMEOUT_S + 20, f"rank 0 waited {waited:.0f} s for a hung rank"  # last samples, timeout
    assert "error: rank 0: all_reduce failed waiting for the other ranks" in output


def test_other_stages_are_refused_under_torchrun(tmp_path):
    result = run(tmp_path / "r", "stage=all", ranks=2, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # torchrun stops the other rank as soon as one exits with an error, so the second rank may never print its own
    assert errors[:1] == ["error: only stage=profile runs under torchrun; run the other stages in one process"]
    assert set(errors) == set(errors[:1]) and len(errors) <= 2
    assert f'File "{REPO / "pipeline"}' not in result.stderr  # no traceback from the pipeline itself
    assert not (tmp_path / "r" / "mlflow.db").exists()
