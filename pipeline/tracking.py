"""MLflow set-up: a SQLite store under ``run_dir`` by default, or any tracking server via ``tracking.uri``."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
from pathlib import Path

import mlflow

PACKAGES = ("moa-autotune", "torch", "transformers", "mlflow", "pulp", "highspy", "optuna", "triton", "hydra-core")


def metric_name(key: str) -> str:
    """MLflow-safe metric name. DESIGN.md's ``kv_density@N`` is stored as ``kv_density:N``, since MLflow 3
    rejects ``@``; any other character MLflow rejects becomes ``_``."""
    key = key.replace("@", ":")
    return "".join(ch if ch.isalnum() or ch in "_-./ :" else "_" for ch in key)


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve()}/mlflow.db"


def setup(tracking_cfg, run_dir: Path) -> str:
    """Point MLflow at the configured store and select (or create) the experiment. Returns the tracking URI."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    uri = str(tracking_cfg.uri) if tracking_cfg.get("uri") else default_uri(run_dir)
    mlflow.set_tracking_uri(uri)
    name = str(tracking_cfg.experiment)
    if mlflow.get_experiment_by_name(name) is None:
        artifact_location = None
        if uri.startswith("sqlite:"):
            artifact_location = (run_dir.resolve() / "mlartifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=artifact_location)
    mlflow.set_experiment(name)
    return uri


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
