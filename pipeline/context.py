"""What a stage function receives: config, artifact paths, the (lazily loaded) model, and its tracking run.

Stages log only through their context: ``ctx.log_params``/``log_metrics``/... go to the stage's own MLflow run,
``ctx.child_run(name)`` opens a nested run (one per plan candidate or benchmark row), and ``ctx.logger(run_id)``
reaches an existing run. All of it goes through an explicit ``MlflowClient`` and run ids (see
:mod:`pipeline.tracking`), never MLflow's process-global active run.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.artifacts import RunArtifacts
from pipeline.plan_runs import PlanRuns
from pipeline.settings import Settings
from pipeline.tracking import RunLogger, Tracker


@dataclass
class StageContext:
    cfg: DictConfig
    """The whole resolved config."""
    name: str
    run_dir: Path
    config_hash: str
    tracker: Tracker
    run: RunLogger
    """This stage's own MLflow run."""
    settings: Settings
    """Every config section, validated and typed (see :mod:`pipeline.settings`)."""
    force: bool = False
    _model_cache: dict = field(default_factory=dict, repr=False)

    @property
    def plan_runs(self) -> PlanRuns:
        """The plans experiment: one top-level run per plan or method (see :mod:`pipeline.plan_runs`)."""
        if "plan_runs" not in self._model_cache:
            self._model_cache["plan_runs"] = PlanRuns(self.tracker.uri, self.settings.tracking.experiment,
                                                      self.run_dir)
        return self._model_cache["plan_runs"]

    @property
    def artifacts(self) -> RunArtifacts:
        return RunArtifacts(self.run_dir)

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

    def load_model(self, dtype: str | None = None):
        """The model, tokenizer and :class:`pipeline.models.ModelInfo`, loaded once per invocation onto the run's
        device (``device=auto|cpu|cuda``; under torchrun with CUDA, this rank's current device).

        ``dtype`` (a :data:`pipeline.settings.DTYPES` name) other than ``model.dtype`` gives a converted copy, made
        once per invocation and dtype, so the stages that use the model as loaded never see it cast. Its info (and
        fingerprint) is the loaded model's: the fingerprint names the weights as loaded."""
        from pipeline.errors import UserError
        from pipeline.models import LoadedModel, load_model
        from pipeline.settings import DTYPES

        if "loaded" not in self._model_cache:
            try:
                self._model_cache["loaded"] = load_model(self.cfg.model, self.settings.run.torch_device())
            except ValueError as err:
                raise UserError(str(err)) from None
        loaded = self._model_cache["loaded"]
        if dtype is None or dtype == self.settings.model.dtype:
            return loaded
        key = f"loaded:{dtype}"
        if key not in self._model_cache:
            converted = copy.deepcopy(loaded.model).to(DTYPES[dtype])
            self._model_cache[key] = LoadedModel(converted, loaded.tokenizer, loaded.info)
        return self._model_cache[key]

    # ---- tracking -------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self.run.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.run.set_tags(tags)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.run.log_artifact(path, artifact_path=artifact_path)

    def log_figure(self, figure, name: str) -> None:
        """Log a matplotlib figure as ``<name>`` (a file name such as ``heatmap.png``) and close it."""
        self.run.log_figure(figure, name)

    @contextlib.contextmanager
    def child_run(self, name: str, tags: dict[str, str] | None = None):
        """A run nested under this stage's run, e.g. one plan candidate or one benchmark row."""
        with self.tracker.run(name, parent=self.run, tags=tags) as child:
            yield child

    def logger(self, run_id: str) -> RunLogger:
        """Log to an existing run, e.g. attach validation results to an optimize-stage candidate run."""
        return self.tracker.logger(run_id)

    def progress(self, iterable=None, **kwargs):
        """A tqdm progress bar (shown on stderr) for long loops."""
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("disable", os.environ.get("MOA_NO_PROGRESS") == "1")
        return tqdm(iterable, **kwargs)
