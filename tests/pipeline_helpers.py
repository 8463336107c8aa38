"""Helpers for tests that drive the pipeline in-process."""

from __future__ import annotations

from pathlib import Path

from pipeline.run import compose
from pipeline.runner import run_pipeline


def run_stage(run_dir: Path, *overrides: str) -> dict[str, str]:
    """Run the pipeline in-process with ``model=tiny`` under ``run_dir``; returns the per-stage outcome."""
    cfg = compose(["model=tiny", f"run_dir={run_dir}", *overrides])
    return run_pipeline(cfg)
