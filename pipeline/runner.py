"""Runs the requested stages in order, with resume, completion markers and one MLflow run per stage.

A stage is up to date when its completion marker ``<run_dir>/<stage>/.done.json`` records

- the stage's current **config hash**: the model, the stage's config sections, the seed, the device where the
  result depends on it, the code (package version, torch/transformers versions and a digest of the stage's
  source and its project imports), and the hashes of the stages it reads;
- a **digest of its outputs** equal to what is on disk now, so a half-rewritten output is never trusted;
- the **output digests of its inputs** equal to theirs now, so a stage whose inputs were rewritten is redone.

A marker is only ever replaced by a newer one, never deleted first: a stage that fails before touching its
outputs leaves the previous result valid. The parent MLflow run is opened only when some stage actually runs,
so a no-op rerun adds nothing to MLflow.

Under ``torchrun`` (``WORLD_SIZE`` > 1) only ``stage=profile`` runs, its ranks sharing the samples (see
:mod:`pipeline.stages.profile`). Rank 0 takes the skip-or-run decision for every rank, holds the stage lock, clears
stale resume state, and alone opens MLflow runs, prints and writes the marker, after a barrier that every rank
reaches when done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import distributed, io
from pipeline.artifacts import ArtifactError
from pipeline.code_digest import source_digest
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.locks import stage_lock
from pipeline.services import check_services
from pipeline.settings import check_all
from pipeline.stages.registry import STAGE_ORDER, Stage, registered
from pipeline.tracking import Tracker, git_commit, package_versions

MARKER = ".done.json"
MODEL_KEYS_IGNORED_IN_HASH = ("cache_dir",)
CODE_PACKAGES = ("moa-autotune", "torch", "transformers")


def stages_for(selection: str) -> list[str]:
    if selection == "all":
        return list(STAGE_ORDER)
    if selection not in STAGE_ORDER:
        raise UserError(f"stage: unknown value {selection!r} (expected one of {', '.join(STAGE_ORDER)}, all)")
    return [selection]


def resolved_device(cfg: DictConfig) -> str:
    """``cpu``, or ``cuda:<device name>`` where the config asks for (or ``auto`` finds) CUDA."""
    import torch

    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cuda"


def code_version(spec: Stage) -> dict[str, str]:
    """The versions and source digest that make stage ``spec``'s code."""
    versions = {}
    for name in CODE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    modules = [spec.module] + (["pipeline.models"] if spec.uses_model else [])
    return {**versions, "source": "+".join(source_digest(m) for m in modules if m)}


def stage_hash(cfg: DictConfig, name: str, stages: dict[str, Stage]) -> str:
    """Hash of everything that changes stage ``name``'s result (see the module docstring)."""
    spec = stages[name]
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in MODEL_KEYS_IGNORED_IN_HASH}
    payload = {
        "stage": name,
        "model": model,
        "seed": cfg.seed,
        "device": resolved_device(cfg) if spec.device_bound else None,
        "code": code_version(spec),
        "sections": _sections(cfg, spec),
        "inputs": {req: stage_hash(cfg, req, stages) for req in spec.inputs(cfg) if req in stages},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sections(cfg: DictConfig, spec: Stage) -> dict:
    """The stage's config sections, less its ``hash_excludes`` keys."""
    sections = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in spec.config_keys}
    for dotted in spec.hash_excludes:
        *parents, leaf = dotted.split(".")
        node = sections
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return sections


def outputs_digest(run_dir: Path, spec: Stage) -> str | None:
    """SHA-256 over the stage's output files (folders recursively, hidden names skipped); None if one is missing."""
    digest = hashlib.sha256()
    for out in spec.outputs:
        path = run_dir / out
        if not path.exists():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(run_dir)
            if any(part.startswith(".") for part in relative.parts):
                continue
            digest.update(str(relative).encode() + b"\0")
            with file.open("rb") as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def read_marker(run_dir: Path, name: str) -> dict | None:
    marker = run_dir / name / MARKER
    if not marker.is_file():
        return None
    try:
        return io.read_json(marker)
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path, spec: Stage, config_hash: str, stages: dict[str, Stage] | None = None) -> bool:
    """Whether the marker vouches for this config hash, the outputs on disk, and the inputs as they are now."""
    marker = read_marker(run_dir, spec.name)
    if marker is None or marker.get("config_hash") != config_hash:
        return False
    current = outputs_digest(run_dir, spec)
    if current is None or marker.get("outputs_digest") != current:
        return False
    for req, recorded in (marker.get("inputs") or {}).items():
        if recorded is None:  # made without that input's marker (a hand-made fixture): nothing to compare
            continue
        upstream = read_marker(run_dir, req)
        if upstream is None or upstream.get("outputs_digest") != recorded:
            return False
    return True


def write_marker(run_dir: Path, spec: Stage, config_hash: str, stages: dict[str, Stage], *,
                 requires: tuple[str, ...] | None = None, **extra) -> None:
    """Atomically replace stage ``spec``'s completion marker with one vouching for its outputs as they are now
    and for the inputs it read (``requires``: ``spec.requires`` unless given)."""
    requires = spec.requires if requires is None else requires
    inputs = {req: (read_marker(run_dir, req) or {}).get("outputs_digest") for req in requires if req in stages}
    io.write_json(run_dir / spec.name / MARKER, {
        "stage": spec.name, "config_hash": config_hash, "outputs_digest": outputs_digest(run_dir, spec),
        "inputs": inputs, **extra,
    })


def _clear_stale_partials(run_dir: Path, spec: Stage, config_hash: str, force: bool) -> None:
    """Drop resume state from other config hashes (or all of it when forced)."""
    partial_root = run_dir / spec.name / ".partial"
    if partial_root.is_dir():
        for entry in partial_root.iterdir():
            if force or entry.name != config_hash:
                shutil.rmtree(entry, ignore_errors=True)


class _Session:
    """One ``pipeline.run`` invocation: the tracker and the parent run, opened on first use."""

    def __init__(self, cfg: DictConfig, run_dir: Path, stack: contextlib.ExitStack):
        self.cfg, self.run_dir, self.stack = cfg, run_dir, stack
        self.settings = check_all(cfg)
        self.tracker: Tracker | None = None
        self.parent = None
        self.model_cache: dict = {}

    def parent_run(self):
        if self.parent is None and not distributed.is_primary():
            self.tracker, self.parent = distributed.NullTracker(), distributed.NullRunLogger()
        if self.parent is None:
            self.tracker = Tracker.from_cfg(self.cfg.tracking, self.run_dir)
            self.parent = self.stack.enter_context(self.tracker.run(
                f"pipeline:{self.cfg.stage}",
                tags={"git_commit": git_commit(), "stage_selection": str(self.cfg.stage), "model": str(self.cfg.model.name)},
            ))
            self.parent.log_params(package_versions())
            self.parent.log_dict(OmegaConf.to_container(self.cfg, resolve=True), "config.json")
        return self.parent


def run_pipeline(cfg: DictConfig) -> dict[str, str]:
    """Run ``cfg.stage`` (one stage or ``all``). Returns ``{stage: ran|skipped|unavailable}``."""
    selection = stages_for(str(cfg.stage))
    if distributed.world_size() > 1 and selection != ["profile"]:
        raise UserError("only stage=profile runs under torchrun; run the other stages in one process")
    stages = registered()
    check_services(cfg, selection)  # a tracking server or database that is down stops the run before any work
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        session = _Session(cfg, run_dir, stack)
        stack.enter_context(distributed.process_group(resolved_device(cfg) != "cpu",
                                                      session.settings.profile.collective_timeout_s))
        for name in selection:
            if name not in stages:
                print(f"[{name}] not yet available in this version: skipped", flush=True)
                outcome[name] = "unavailable"
                continue
            outcome[name] = _run_stage(cfg, stages, name, session)
        if not distributed.is_primary():  # rank 0 reports for the torchrun job
            return outcome
        if session.parent is not None:
            session.parent.set_tags({"outcome": json.dumps(outcome)})
            if session.model_cache.get("loaded") is not None:
                session.parent.log_dict(session.model_cache["loaded"].info.as_dict(), "model_info.json")
            print(f"MLflow parent run {session.parent.run_id} ({session.tracker.uri})", flush=True)
        else:
            print("every selected stage is up to date: nothing ran, nothing was logged", flush=True)
    if str(cfg.stage) == "all":
        from pipeline.report import final_summary

        print(final_summary(cfg, run_dir), flush=True)
    return outcome


def _run_stage(cfg: DictConfig, stages: dict[str, Stage], name: str, session: _Session) -> str:
    spec, run_dir = stages[name], session.run_dir
    config_hash = stage_hash(cfg, name, stages)
    if spec.worker_when is not None and spec.worker_when(cfg):
        print(f"[{name}] worker (config {config_hash}): adds to the shared store only; the stage's own run "
              f"writes the results", flush=True)
        _execute(cfg, spec, config_hash, session, run_name=f"{name} (worker)", tags={"worker": "true"})
        return "worker"
    for req in spec.inputs(cfg):
        if req in stages and not is_done(run_dir, stages[req], stage_hash(cfg, req, stages)):
            hint = f", or {spec.requires_when_hint}" if req not in spec.requires and spec.requires_when_hint else ""
            raise UserError(f"stage {name} needs the artifacts of stage {req} for this config: run stage={req} first"
                            f"{hint}")
    force = bool(cfg.force)
    say = print if distributed.is_primary() else (lambda *args, **kwargs: None)
    if distributed.broadcast(not force and is_done(run_dir, spec, config_hash)):  # rank 0 decides for all ranks
        say(f"[{name}] up to date (config {config_hash}): skipped; use force=true to redo", flush=True)
        return "skipped"
    lock = stage_lock(run_dir, name, wait=session.settings.run.lock_wait) if distributed.is_primary() \
        else contextlib.nullcontext()
    with lock:
        # finished by the invocation this one waited for
        if distributed.broadcast(not force and is_done(run_dir, spec, config_hash)):
            say(f"[{name}] up to date (config {config_hash}), finished elsewhere: skipped", flush=True)
            return "skipped"
        if distributed.is_primary():
            _clear_stale_partials(run_dir, spec, config_hash, force)
        distributed.barrier()  # no rank writes resume state before the stale state is gone
        say(f"[{name}] running (config {config_hash})", flush=True)
        summary, seconds, run_id = _execute(cfg, spec, config_hash, session, run_name=name, tags={})
        loaded = session.model_cache.get("loaded")
        info = loaded.info.as_dict() if loaded is not None else None
        distributed.barrier()  # every rank finished: only then does rank 0 vouch for the outputs
        if distributed.is_primary():
            write_marker(run_dir, spec, config_hash, stages, requires=spec.inputs(cfg), seconds=round(seconds, 3),
                         model=info, summary=summary, mlflow_run_id=run_id)
    say(f"[{name}] done in {seconds:.1f} s", flush=True)
    return "ran"


def _execute(cfg: DictConfig, spec: Stage, config_hash: str, session: _Session, *, run_name: str,
             tags: dict[str, str]) -> tuple[dict, float, str]:
    """Run stage ``spec`` in its own MLflow run; returns its summary, wall seconds and run id."""
    parent = session.parent_run()
    tags = {"stage": spec.name, "config_hash": config_hash, **tags}
    with session.tracker.run(run_name, parent=parent, tags=tags) as run:
        run.log_params({key: json.dumps(OmegaConf.to_container(cfg[key], resolve=True)) for key in spec.config_keys})
        ctx = StageContext(cfg=cfg, name=spec.name, run_dir=session.run_dir, config_hash=config_hash,
                           tracker=session.tracker, run=run, settings=session.settings, force=bool(cfg.force),
                           _model_cache=session.model_cache)
        started = time.perf_counter()
        try:
            summary = spec.fn(ctx) or {}
        except ArtifactError as err:
            raise UserError(str(err)) from None
        seconds = time.perf_counter() - started
        run.log_metrics({"stage_seconds": seconds})
        loaded = session.model_cache.get("loaded")
        if loaded is not None:
            run.set_tags({"model_fingerprint": loaded.info.as_dict()["fingerprint"]})
    return summary, seconds, run.run_id
