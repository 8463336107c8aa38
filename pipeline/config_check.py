"""Value checks on the composed config, so that a bad value fails up front with one line naming the key."""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.errors import UserError
from pipeline.stages.registry import STAGE_ORDER


def _choice(cfg: DictConfig, key: str, allowed) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise UserError(f"{key}: bad value {value!r} (expected one of {', '.join(map(str, allowed))})")


def _int(cfg: DictConfig, key: str, minimum: int) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}: bad value {value!r} (expected an integer >= {minimum})")


def _int_list(cfg: DictConfig, key: str, minimum: int) -> None:
    value = _get(cfg, key)
    try:
        items = list(value)
    except TypeError:
        raise UserError(f"{key}: bad value {value!r} (expected a list of integers, e.g. [512,1024])") from None
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in items):
        raise UserError(f"{key}: bad value {value!r} (expected a non-empty list of integers >= {minimum})")


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for the first bad value found."""
    from pipeline.calibration.tasks import TASKS

    _choice(cfg, "stage", (*STAGE_ORDER, "all"))
    _choice(cfg, "device", ("auto", "cpu", "cuda"))
    if not isinstance(cfg.force, bool):
        raise UserError(f"force: bad value {cfg.force!r} (expected true or false)")
    _int(cfg, "seed", 0)
    if cfg.model.get("path"):
        from pathlib import Path

        if not Path(str(cfg.model.path)).is_dir():
            raise UserError(f"model.path: {cfg.model.path} is not a readable directory")
    else:
        _choice(cfg, "model.source", ("smollm2_gguf", "tiny"))
    _choice(cfg, "model.dtype", ("float32", "float16", "bfloat16", "float64"))
    _choice(cfg, "sparse.granularity", ("kv_head", "head"))
    _int(cfg, "sparse.sink", 0)
    _int(cfg, "sparse.min_span", 1)
    _int(cfg, "sparse.block_size", 1)
    _int_list(cfg, "calibration.lengths", 16)
    _int(cfg, "calibration.samples_per_length", 1)
    _int(cfg, "calibration.max_new_tokens", 1)
    unknown = [t for t in cfg.calibration.tasks if t not in TASKS]
    if unknown or not cfg.calibration.tasks:
        raise UserError(f"calibration.tasks: unknown task {unknown[0] if unknown else '(empty list)'!r} (expected some of {', '.join(TASKS)})")
