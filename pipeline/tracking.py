"""MLflow tracking through an explicit client and run ids.

The default store is SQLite under ``run_dir`` (``sqlite:///<run_dir>/mlflow.db``, artifacts under
``<run_dir>/mlartifacts``); ``tracking.uri`` points at any tracking server instead. Nothing here uses MLflow's
fluent API (``mlflow.start_run`` and its process-global active run): every call names its run, so stages,
benchmark rows and parallel trials can log from several threads at once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGES = ("moa-autotune", "torch", "transformers", "mlflow", "pulp", "highspy", "optuna", "triton", "hydra-core")
MAX_PARAM_CHARS = 6000
BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def metric_name(key: str) -> str:
    """MLflow-safe metric name. ``kv_density@N`` is stored as ``kv_density:N``, since MLflow 3 rejects ``@``;
    any other character MLflow rejects becomes ``_``."""
    key = key.replace("@", ":")
    return "".join(ch if ch.isalnum() or ch in "_-./ :" else "_" for ch in key)


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve()}/mlflow.db"


class RunLogger:
    """Logs to one MLflow run, named by its id."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, _short(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        entries = [Metric(metric_name(k), float(v), stamp, step or 0) for k, v in metrics.items()]
        for start in range(0, len(entries), BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start:start + BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_figure(self, figure, name: str) -> None:
        """Log a matplotlib figure as ``<name>`` (a file name such as ``heatmap.png``) and close it."""
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, name)
        plt.close(figure)


class Tracker:
    """One experiment in one tracking store; opens runs and child runs by id."""

    def __init__(self, uri: str, experiment: str, run_dir: Path):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri
        # Several processes on one run directory (Optuna workers) would race to create the SQLite schema and the
        # experiment: the first to take the lock does it, the others find it made.
        with _sqlite_init_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
            else:
                location = (run_dir.resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
                # The UI opens a "custom model development" experiment on its runs table rather than GenAI traces.
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location,
                    tags={"mlflow.experimentKind": "custom_model_development"})

    @classmethod
    def from_cfg(cls, tracking_cfg, run_dir: Path) -> Tracker:
        uri = str(tracking_cfg.uri) if tracking_cfg.get("uri") else default_uri(run_dir)
        return cls(uri, str(tracking_cfg.experiment), run_dir)

    def logger(self, run_id: str) -> RunLogger:
        """A logger for an existing run (for example a plan candidate annotated by a later stage)."""
        return RunLogger(self.client, run_id)

    @contextlib.contextmanager
    def run(self, name: str, *, parent: RunLogger | None = None, tags: dict[str, str] | None = None
            ) -> Iterator[RunLogger]:
        """A new run (a child of ``parent`` if given), ended FINISHED, FAILED or KILLED by how the block exits."""
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        created = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        logger = RunLogger(self.client, created.info.run_id)
        status = "FAILED"
        try:
            yield logger
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(logger.run_id, status=status)


def _sqlite_init_lock(uri: str):
    """A file lock beside a ``sqlite:///`` store (a no-op for any other store)."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///") + ".init.lock")


def git_commit() -> str:
    """The commit of the checkout this package runs from, or ``unknown`` outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "absent"
    return versions


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
