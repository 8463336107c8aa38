"""Stage registry: each stage declares what it needs, which config affects it, and what it writes.

A stage is a function ``fn(ctx: StageContext) -> dict | None`` registered with :func:`stage`. The runner
(:mod:`pipeline.runner`) orders stages, skips those whose outputs exist for the same config hash, opens one
nested MLflow run per stage, and records a completion marker ``<run_dir>/<name>/.done.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

STAGE_ORDER = ("calibrate", "profile", "rules", "optimize", "validate", "evaluate", "benchmark", "adapters")


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable
    requires: tuple[str, ...] = ()
    """Stages whose artifacts this one reads; their config hashes feed into this stage's hash."""
    config_keys: tuple[str, ...] = ()
    """Top-level config sections that change this stage's result (``model`` is always included)."""
    outputs: tuple[str, ...] = ()
    """Paths relative to ``run_dir`` (files, or folders ending in ``/``) that the stage writes. They must exist
    for the stage to count as done, and their content digest is recorded in its completion marker."""
    uses_model: bool = True
    device_bound: bool = True
    """Whether the result depends on the device it was computed on (then the device is part of the hash)."""
    requires_when: Callable | None = None
    """``fn(cfg) -> stage names``: inputs that only some configs read (adapters reads validate's plan only when
    ``adapters.plan=selected``). They count like ``requires`` for that config."""
    requires_when_hint: str = ""
    """How to run without the config-dependent inputs, shown when they are missing."""
    worker_when: Callable | None = None
    """``fn(cfg) -> bool``: this invocation only adds work to a store shared with other invocations (an Optuna
    study's worker). The runner then runs the stage without its lock, input check or completion marker."""
    hash_excludes: tuple[str, ...] = ()
    """Dotted config keys of ``config_keys`` sections left out of the stage's hash (a worker switch)."""
    module: str = ""
    """The module defining the stage: its source (and its project imports) is part of the hash."""
    doc: str = field(default="")

    def inputs(self, cfg) -> tuple[str, ...]:
        """The stages whose artifacts this stage reads under ``cfg``."""
        return self.requires + (tuple(self.requires_when(cfg)) if self.requires_when else ())


_REGISTRY: dict[str, Stage] = {}


def stage(name: str, *, requires=(), config_keys=(), outputs=(), uses_model: bool = True,
          device_bound: bool | None = None, requires_when: Callable | None = None, requires_when_hint: str = "",
          worker_when: Callable | None = None, hash_excludes: tuple[str, ...] = ()):
    """Decorator registering ``fn`` as the implementation of stage ``name``."""
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage name {name!r}")

    def wrap(fn):
        _REGISTRY[name] = Stage(
            name=name,
            fn=fn,
            requires=tuple(requires),
            requires_when=requires_when,
            requires_when_hint=requires_when_hint,
            worker_when=worker_when,
            hash_excludes=tuple(hash_excludes),
            config_keys=tuple(config_keys),
            outputs=tuple(outputs),
            uses_model=uses_model,
            device_bound=uses_model if device_bound is None else device_bound,
            module=fn.__module__,
            doc=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        )
        return fn

    return wrap


def registered() -> dict[str, Stage]:
    """All implemented stages, importing the stage modules on first use."""
    from pipeline.stages import load_all

    load_all()
    return dict(_REGISTRY)
