"""What a stage function receives: config, directories, the (lazily loaded) model, and logging helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig
from tqdm.auto import tqdm


@dataclass
class StageContext:
    cfg: DictConfig
    """The whole resolved config."""
    name: str
    run_dir: Path
    config_hash: str
    force: bool = False
    _model_cache: dict = field(default_factory=dict, repr=False)

    @property
    def stage_dir(self) -> Path:
        """``<run_dir>/<stage name>``: where this stage writes by default."""
        path = self.run_dir / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def partial_dir(self) -> Path:
        """Resume state for an unfinished run of this stage at this config hash (the runner clears stale ones)."""
        path = self.run_dir / self.name / ".partial" / self.config_hash
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load_model(self):
        """The model, tokenizer and :class:`pipeline.models.ModelInfo`, loaded once per invocation."""
        from pipeline.models import load_model

        if "loaded" not in self._model_cache:
            self._model_cache["loaded"] = load_model(self.cfg.model)
        return self._model_cache["loaded"]

    # ---- tracking -------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params({k: _short(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, figure, name: str) -> None:
        """Log a matplotlib figure as ``<name>`` (a file name such as ``heatmap.png``) and close it."""
        import matplotlib.pyplot as plt

        mlflow.log_figure(figure, name)
        plt.close(figure)

    def progress(self, iterable=None, **kwargs):
        """A tqdm progress bar (shown on stderr) for long loops."""
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("disable", os.environ.get("MOA_NO_PROGRESS") == "1")
        return tqdm(iterable, **kwargs)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _metric_key(key: str) -> str:
    """See :func:`pipeline.tracking.metric_name`."""
    from pipeline.tracking import metric_name

    return metric_name(key)
