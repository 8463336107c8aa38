"""Runs the requested stages in order, with config-hash resume and one nested MLflow run per stage."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from pipeline import io, tracking
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.stages.registry import STAGE_ORDER, Stage, registered

MARKER = ".done.json"
MODEL_KEYS_IGNORED_IN_HASH = ("cache_dir",)


def stages_for(selection: str) -> list[str]:
    if selection == "all":
        return list(STAGE_ORDER)
    if selection not in STAGE_ORDER:
        raise UserError(f"stage: unknown value {selection!r} (expected one of {', '.join(STAGE_ORDER)}, all)")
    return [selection]


def stage_hash(cfg: DictConfig, name: str, stages: dict[str, Stage]) -> str:
    """Hash of everything that changes stage ``name``'s result: model, its config sections, its inputs' hashes."""
    spec = stages[name]
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in MODEL_KEYS_IGNORED_IN_HASH}
    payload = {
        "stage": name,
        "model": model,
        "seed": cfg.seed,
        "sections": {key: OmegaConf.to_container(cfg[key], resolve=True) for key in spec.config_keys},
        "inputs": {req: stage_hash(cfg, req, stages) for req in spec.requires if req in stages},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def is_done(run_dir: Path, spec: Stage, config_hash: str) -> bool:
    marker = run_dir / spec.name / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = io.read_json(marker).get("config_hash")
    except (OSError, ValueError):
        return False
    return recorded == config_hash and all((run_dir / out).exists() for out in spec.outputs)


def _reset(run_dir: Path, spec: Stage, config_hash: str, force: bool) -> None:
    """Drop the completion marker, and resume state from other config hashes (or all of it when forced)."""
    (run_dir / spec.name / MARKER).unlink(missing_ok=True)
    partial_root = run_dir / spec.name / ".partial"
    if partial_root.is_dir():
        for entry in partial_root.iterdir():
            if force or entry.name != config_hash:
                shutil.rmtree(entry, ignore_errors=True)


def run_pipeline(cfg: DictConfig) -> dict[str, str]:
    """Run ``cfg.stage`` (one stage or ``all``). Returns ``{stage: ran|skipped|unavailable}``."""
    selection = stages_for(str(cfg.stage))
    stages = registered()
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup(cfg.tracking, run_dir)
    outcome: dict[str, str] = {}
    model_cache: dict = {}
    with mlflow.start_run(run_name=f"pipeline:{cfg.stage}") as parent:
        mlflow.set_tags({"git_commit": tracking.git_commit(), "stage_selection": str(cfg.stage), "model": str(cfg.model.name)})
        mlflow.log_params(tracking.package_versions())
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True), "config.json")
        for name in selection:
            if name not in stages:
                print(f"[{name}] not yet available in this version: skipped", flush=True)
                outcome[name] = "unavailable"
                continue
            outcome[name] = _run_stage(cfg, stages, name, run_dir, model_cache)
        mlflow.set_tag("outcome", json.dumps(outcome))
        if model_cache.get("loaded") is not None:
            mlflow.log_dict(model_cache["loaded"].info.as_dict(), "model_info.json")
        print(f"MLflow parent run {parent.info.run_id} ({mlflow.get_tracking_uri()})", flush=True)
    return outcome


def _run_stage(cfg: DictConfig, stages: dict[str, Stage], name: str, run_dir: Path, model_cache: dict) -> str:
    spec = stages[name]
    config_hash = stage_hash(cfg, name, stages)
    for req in spec.requires:
        if req in stages and not is_done(run_dir, stages[req], stage_hash(cfg, req, stages)):
            raise UserError(f"stage {name} needs the artifacts of stage {req} for this config: run stage={req} first")
    force = bool(cfg.force)
    if not force and is_done(run_dir, spec, config_hash):
        print(f"[{name}] up to date (config {config_hash}): skipped; use force=true to redo", flush=True)
        return "skipped"
    _reset(run_dir, spec, config_hash, force)
    print(f"[{name}] running (config {config_hash})", flush=True)
    ctx = StageContext(cfg=cfg, name=name, run_dir=run_dir, config_hash=config_hash, force=force, _model_cache=model_cache)
    with mlflow.start_run(run_name=name, nested=True):
        mlflow.set_tags({"stage": name, "config_hash": config_hash})
        mlflow.log_params({f"{key}": json.dumps(OmegaConf.to_container(cfg[key], resolve=True)) for key in spec.config_keys})
        started = time.perf_counter()
        summary = spec.fn(ctx) or {}
        seconds = time.perf_counter() - started
        mlflow.log_metric("stage_seconds", seconds)
        info = model_cache["loaded"].info.as_dict() if model_cache.get("loaded") is not None else None
        if info:
            mlflow.set_tag("model_fingerprint", info["fingerprint"])
        io.write_json(
            run_dir / name / MARKER,
            {"stage": name, "config_hash": config_hash, "seconds": round(seconds, 3), "model": info, "summary": summary},
        )
    print(f"[{name}] done in {seconds:.1f} s", flush=True)
    return "ran"
