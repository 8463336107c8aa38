"""The elastic rule grid: read a grid file, generate its (alpha, beta) product, filter and validate it.

A rule is valid at length ``N`` when its unclamped span ``alpha + beta * N`` lies in ``[min_raw_span, N]``, so the
clamp to ``[min_span, N]`` in :func:`kernels.pattern.span_at` only ever raises short spans to ``min_span``.
Generated rules that fail at some planned length are dropped; explicitly listed rules that fail are an error.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

PACKAGED_PREFIX = "search_spaces/"
GRID_KEYS = {"sink", "min_span", "alpha", "beta", "rules", "filter"}


@dataclass(frozen=True)
class Rule:
    alpha: float
    beta: float


def resolve_grid_path(path: str):
    """``path`` as given if that file exists; else ``search_spaces/<name>`` is the grid shipped in the installed
    ``search_spaces`` package (so a non-editable install finds the default grid from any directory)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if path.startswith(PACKAGED_PREFIX):
        packaged = importlib.resources.files("search_spaces").joinpath(path[len(PACKAGED_PREFIX):])
        if packaged.is_file():
            return packaged
    raise ValueError(f"rules.grid: grid file {path} not found")


def load_grid(path: str, lengths, *, sink: int, min_span: int, block_size: int) -> list[Rule]:
    """The valid rules of grid file ``path`` for profile ``lengths``, generated rules first, in grid order."""
    source = resolve_grid_path(path)
    try:
        spec = yaml.safe_load(source.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"rules.grid: {source} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"rules.grid: {source} must be a mapping with alpha, beta and filter keys")
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise ValueError(f"rules.grid: {source} has unknown key(s) {', '.join(unknown)}")
    for key, actual in (("sink", sink), ("min_span", min_span)):
        if spec.get(key) is not None and spec[key] != actual:
            raise ValueError(f"rules.grid: {source} is for {key}={spec[key]}, but sparse.{key}={actual}")
    lengths = sorted(int(n) for n in lengths)
    floor = _number(spec.get("filter", {}).get("min_raw_span", 1), f"{source}: filter.min_raw_span")
    generated = [r for r in _product(spec, source, lengths[-1], block_size) if _valid(r, lengths, floor)]
    explicit = [_explicit(item, source) for item in spec.get("rules") or []]
    for rule in explicit:
        if not _valid(rule, lengths, floor):
            raise ValueError(
                f"rules.grid: rule (alpha={rule.alpha}, beta={rule.beta}) in {source} is invalid: its span "
                f"alpha + beta*N leaves [{floor:g}, N] at profile length(s) {_failing(rule, lengths, floor)}"
            )
    rules = list(dict.fromkeys(generated + explicit))
    if not rules:
        raise ValueError(f"rules.grid: {source} yields no valid rule for profile lengths {lengths}")
    return rules


def _product(spec: dict, source: Path, longest: int, block_size: int) -> list[Rule]:
    alpha = spec.get("alpha") or {}
    start = _number(alpha.get("start", 0), f"{source}: alpha.start")
    stop = longest if alpha.get("stop") is None else _number(alpha["stop"], f"{source}: alpha.stop")
    step = _number(alpha.get("step_blocks", 1), f"{source}: alpha.step_blocks") * block_size
    if step <= 0:
        raise ValueError(f"rules.grid: {source}: alpha.step_blocks must be positive")
    alphas = np.arange(start, stop + step / 2, step) if stop >= start else np.array([])
    betas = [_number(b, f"{source}: beta") for b in spec.get("beta") or []]
    return [Rule(float(a), float(b)) for b in betas for a in alphas]


def _explicit(item, source: Path) -> Rule:
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise ValueError(f"rules.grid: {source}: rule {item!r} must be a pair [alpha, beta]")
    return Rule(_number(item[0], f"{source}: rule alpha"), _number(item[1], f"{source}: rule beta"))


def _valid(rule: Rule, lengths, floor: float) -> bool:
    return not _failing(rule, lengths, floor)


def _failing(rule: Rule, lengths, floor: float) -> list[int]:
    return [n for n in lengths if not floor <= rule.alpha + rule.beta * n <= n]


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"rules.grid: {what} must be a finite number, got {value!r}")
    return float(value)
