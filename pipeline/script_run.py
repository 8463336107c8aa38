"""What the analysis scripts under ``scripts/`` share: the pipeline's config overrides after ``--``, the run
directory they name, and its model, loaded and checked the way the stages do it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import RunArtifacts
from pipeline.models import LoadedModel, load_model
from pipeline.run import compose
from pipeline.settings import Settings, check_all


@dataclass(frozen=True)
class ScriptRun:
    cfg: object
    settings: Settings
    run_dir: Path
    artifacts: RunArtifacts
    loaded: LoadedModel


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The trailing ``-- key=value ...`` pipeline overrides (``args.overrides``)."""
    parser.add_argument("overrides", nargs="*", help="pipeline config overrides (after --), e.g. run_dir=...")


def open_run(overrides) -> ScriptRun:
    """Compose and check the config, then load the model on the configured device. Raises the settings' and the
    loader's errors (``UserError``, ``ValueError``) for the script to print as one line."""
    cfg = compose(list(overrides))
    settings = check_all(cfg)
    run_dir = Path(settings.run.run_dir)
    return ScriptRun(cfg, settings, run_dir, RunArtifacts(run_dir), load_model(cfg.model, settings.run.torch_device()))
