"""The spine: config-hash resume, atomic artifacts, interrupted runs, CLI errors, MLflow records."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

import pipeline.calibration.builder as builder
from pipeline.run import compose
from pipeline.runner import stage_hash
from pipeline.stages.registry import registered
from tests.pipeline_helpers import run_stage

FAST = ("stage=calibrate", "calibration.lengths=[768,1024]", "calibration.samples_per_length=1", "calibration.max_new_tokens=4")
REPO = Path(__file__).resolve().parents[1]


def test_hash_tracks_only_the_config_that_matters():
    stages = registered()
    base = compose(["model=tiny"])
    same = compose(["model=tiny", "tracking.experiment=other", "force=true"])
    changed = compose(["model=tiny", "calibration.samples_per_length=9"])
    assert stage_hash(base, "calibrate", stages) == stage_hash(same, "calibrate", stages)
    assert stage_hash(base, "calibrate", stages) != stage_hash(changed, "calibrate", stages)
    assert stage_hash(base, "calibrate", stages) != stage_hash(compose(["model=tiny", "model.seed=1"]), "calibrate", stages)
    downstream = [name for name, spec in stages.items() if "calibrate" in spec.requires]
    for name in downstream:  # a change upstream invalidates every stage that reads its artifacts
        assert stage_hash(base, name, stages) != stage_hash(changed, name, stages)


def test_rerun_skips_force_redoes_and_config_change_redoes(tmp_path):
    assert run_stage(tmp_path, *FAST) == {"calibrate": "ran"}
    dataset = tmp_path / "calibrate" / "calibration_768.safetensors"
    first = dataset.stat().st_mtime_ns
    assert run_stage(tmp_path, *FAST) == {"calibrate": "skipped"}
    assert dataset.stat().st_mtime_ns == first
    assert run_stage(tmp_path, *FAST, "force=true") == {"calibrate": "ran"}
    assert dataset.stat().st_mtime_ns != first
    assert run_stage(tmp_path, *FAST, "calibration.seed=99") == {"calibrate": "ran"}


def test_interrupted_run_resumes_without_redoing_or_corrupting(tmp_path, monkeypatch):
    real = builder.pack
    calls = {"n": 0}

    def pack_then_interrupt(samples, length, pad_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the second length: the first one is already on disk
            raise KeyboardInterrupt
        return real(samples, length, pad_id)

    monkeypatch.setattr("pipeline.stages.calibrate.pack", pack_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, *FAST)
    stage_dir = tmp_path / "calibrate"
    done_first = (stage_dir / "calibration_768.safetensors").stat().st_mtime_ns
    assert not (stage_dir / "calibration_1024.safetensors").exists()
    assert not (stage_dir / ".done.json").exists()
    assert not [p for p in stage_dir.iterdir() if p.name.endswith(".tmp")], "no half-written artifact may remain"

    monkeypatch.setattr("pipeline.stages.calibrate.pack", real)
    assert run_stage(tmp_path, *FAST) == {"calibrate": "ran"}
    assert (stage_dir / "calibration_768.safetensors").stat().st_mtime_ns == done_first, "finished length was redone"
    assert (stage_dir / "calibration_1024.safetensors").exists()


def test_mlflow_parent_and_nested_stage_runs_are_written(tmp_path):
    run_stage(tmp_path, *FAST)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moa-autotune"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 1
    child = children.iloc[0]
    assert child["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]
    assert child["tags.stage"] == "calibrate"
    assert child["metrics.samples:768"] == 1.0 and child["metrics.stage_seconds"] > 0
    assert parents.iloc[0]["params.version.torch"].startswith("2.")
    assert len(parents.iloc[0]["tags.git_commit"]) > 0
    artifacts = mlflow.artifacts.list_artifacts(run_id=child["run_id"], artifact_path="calibration")
    assert any(a.path.endswith("manifest.json") for a in artifacts)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOA_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("stage=calibrate", "bogus=1"), "bogus"),
        (("stage=calibrate", "model.path=/nonexistent"), "/nonexistent"),
        (("stage=nope",), "stage"),
        (("model=tiny", "calibration.lengths=[0]"), "calibration.lengths"),
        (("model=tiny", "stage=profile"), "run stage=calibrate first"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, needle):
    result = _cli(*args, f"run_dir={tmp_path}/r", cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_the_error_line_leaves_in_one_write(tmp_path, monkeypatch):
    """Ranks of a torchrun share one stderr, unbuffered: a line written in pieces interleaves with the other rank's."""
    from pipeline.run import main

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["stage=nope", f"run_dir={tmp_path}/r"]) == 2
    assert len(writes) == 1 and writes[0].startswith("error: ") and writes[0].endswith("\n")
    assert writes[0].count("\n") == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_tracking_server_receives_runs(tmp_path):
    """A real MLflow tracking server on the loopback, selected with tracking.uri."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        time.sleep(1.0)
        run_stage(tmp_path / "r", *FAST, f"tracking.uri={uri}")
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["moa-autotune"])
        assert set(runs["tags.mlflow.runName"]) == {"pipeline:calibrate", "calibrate"}
        assert not (tmp_path / "r" / "mlflow.db").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _parent_runs(run_dir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moa-autotune"])
    return runs[runs["tags.mlflow.parentRunId"].isna()]


def test_hash_includes_the_code_and_for_the_benchmark_the_device(monkeypatch):
    stages = registered()
    cfg = compose(["model=tiny"])
    before = {name: stage_hash(cfg, name, stages) for name in ("calibrate", "profile", "rules", "benchmark")}
    on_gpu = compose(["model=tiny", "device=cpu"])
    on_gpu.device = "cuda"  # as composed on a CUDA machine; this one has none, so the CLI would refuse it
    assert stage_hash(compose(["model=tiny", "device=cpu"]), "benchmark", stages) != stage_hash(on_gpu, "benchmark", stages)
    import pipeline.code_digest as code_digest

    real = code_digest._source
    monkeypatch.setattr(code_digest, "_source", lambda m: real(m) + (b"# edited" if m == "pipeline.calibration.tasks" else b""))
    code_digest.source_digest.cache_clear()
    try:
        after = {name: stage_hash(cfg, name, stages) for name in before}
    finally:
        code_digest.source_digest.cache_clear()
    assert after["calibrate"] != before["calibrate"], "a change to code the stage imports must redo it"
    assert after["profile"] != before["profile"], "and every stage downstream of it"
    assert after["benchmark"] == before["benchmark"], "but not an unrelated stage"


def test_noop_rerun_adds_no_parent_run_and_prints_why(tmp_path, capsys):
    run_stage(tmp_path, *FAST)
    assert len(_parent_runs(tmp_path)) == 1
    assert run_stage(tmp_path, *FAST) == {"calibrate": "skipped"}
    assert "nothing ran" in capsys.readouterr().out
    assert len(_parent_runs(tmp_path)) == 1


def test_failed_forced_rerun_keeps_the_marker_and_a_rewritten_input_redoes_the_reader(tmp_path, monkeypatch):
    profile = ("stage=profile", *FAST[1:])
    run_stage(tmp_path, *FAST)
    run_stage(tmp_path, *profile)
    marker = tmp_path / "calibrate" / ".done.json"
    recorded = marker.read_text()

    def fail(*args, **kwargs):
        raise RuntimeError("boom before any artifact is touched")

    monkeypatch.setattr("pipeline.stages.calibrate.build_samples", fail)
    with pytest.raises(RuntimeError):
        run_stage(tmp_path, *FAST, "force=true")
    assert marker.read_text() == recorded, "the marker may only be replaced, never dropped first"
    monkeypatch.undo()
    assert run_stage(tmp_path, *FAST) == {"calibrate": "skipped"}
    assert run_stage(tmp_path, *profile) == {"profile": "skipped"}

    # A forced rerun that produces different calibration data rewrites profile's input: profile must be redone.
    real = builder.build_samples
    monkeypatch.setattr("pipeline.stages.calibrate.build_samples", lambda *a, **k: real(*a, **{**k, "seed": 4321}))
    assert run_stage(tmp_path, *FAST, "force=true") == {"calibrate": "ran"}
    assert run_stage(tmp_path, *profile) == {"profile": "ran"}


def test_a_half_rewritten_output_is_not_trusted(tmp_path):
    run_stage(tmp_path, *FAST)
    (tmp_path / "calibrate" / "samples_1024.jsonl").unlink()  # as if a rerun had stopped half-way
    assert run_stage(tmp_path, *FAST) == {"calibrate": "ran"}
    assert (tmp_path / "calibrate" / "samples_1024.jsonl").is_file()


def test_artifacts_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import pipeline.io

        importlib.reload(pipeline.io)
        pipeline.io.write_json(tmp_path / "x.json", {"a": 1})
        assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
        importlib.reload(pipeline.io)


def test_stage_artifacts_are_readable_by_others(tmp_path):
    result = subprocess.run(["bash", "-c", f"umask 022 && {sys.executable} -m pipeline.run model=tiny run_dir={tmp_path} "
                             + " ".join(FAST)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MOA_NO_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr
    for path in (tmp_path / "calibrate").iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o044 == 0o044, f"{path} is not readable by group and others"


def test_two_threads_log_into_two_runs(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "threads", tmp_path)

    def work(name: str) -> str:
        with tracker.run(name) as run:
            for step in range(20):
                run.log_metrics({"value": step * (1 if name == "a" else 10)}, step=step)
            run.log_params({"who": name})
            return run.run_id

    with ThreadPoolExecutor(2) as pool:
        ids = dict(zip("ab", pool.map(work, "ab"), strict=True))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        assert run.data.params == {"who": name} and run.info.status == "FINISHED"
        history = client.get_metric_history(run_id, "value")
        scale = 1 if name == "a" else 10
        assert sorted((m.step, m.value) for m in history) == [(s, s * scale) for s in range(20)]


def test_logging_code_is_not_result_code(monkeypatch):
    """Editing how runs are logged redoes nothing; editing model loading redoes every stage that runs the model;
    editing a library redoes only the stages that use it."""
    import pipeline.code_digest as code_digest

    stages = registered()
    cfg = compose(["model=tiny"])
    before = {name: stage_hash(cfg, name, stages) for name in ("calibrate", "benchmark", "adapters")}
    real = code_digest._source
    for module, changes in (("pipeline.tracking", set()), ("pipeline.models", {"calibrate", "adapters"}),
                            # the adapter library redoes the adapter search only, though settings import from it
                            ("pipeline.adapters.experts", {"adapters"}),
                            ("pipeline.settings", {"calibrate", "adapters"})):
        monkeypatch.setattr(code_digest, "_source", lambda m, edited=module: real(m) + (b"#" if m == edited else b""))
        code_digest.source_digest.cache_clear()
        try:
            after = {name: stage_hash(cfg, name, stages) for name in before}
        finally:
            code_digest.source_digest.cache_clear()
        assert {name for name in before if after[name] != before[name]} == changes, module
