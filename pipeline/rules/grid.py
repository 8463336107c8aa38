"""The elastic rule grid: read a grid file, generate its (alpha, beta) product, filter and validate it.

A rule is valid at length ``N`` when its unclamped span ``alpha + beta * N`` is at least ``min_raw_span`` and, for
``beta <= 1``, at most ``N``: the clamp to ``[min_span, N]`` in :func:`kernels.pattern.span_at` then only raises
short spans to ``min_span``. A *switch* rule (``beta > 1``) may exceed ``N``: it is narrow at short lengths and
full from ``N = -alpha / (beta - 1)`` on, the shape a per-length full-or-streaming split gives a head, as one
elastic rule. A switch rule must be narrower than full at the shortest profile length (else it is the full rule).
Generated rules that fail at some planned length are dropped; explicitly listed rules that fail are an error.

``alpha.start: null`` (the packaged grid's) starts each slope's alphas at :func:`lowest_alpha`, where the rule keeps
only the clamp's floor ``min(min_span, N)`` at the shortest profile length ``N``: a head can then cost the least
there and still widen with ``N``, which a budget near the sink plus ``min_span`` at the shortest length (25% at 512
tokens with a 64-token sink and span) requires of every head.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from kernels.pattern import span_at

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
    generated = [r for r in _product(spec, source, lengths, min_span, block_size)
                 if _valid(r, lengths, floor, min_span)]
    explicit = [_explicit(item, source) for item in spec.get("rules") or []]
    for rule in explicit:
        if not _valid(rule, lengths, floor, min_span):
            raise ValueError(
                f"rules.grid: rule (alpha={rule.alpha}, beta={rule.beta}) in {source} is invalid: its span "
                f"alpha + beta*N leaves [{floor:g}, N] at profile length(s) {_failing(rule, lengths, floor, min_span)}"
            )
    rules = list(dict.fromkeys(generated + explicit))
    if not rules:
        raise ValueError(f"rules.grid: {source} yields no valid rule for profile lengths {lengths}")
    return rules


def lowest_alpha(beta: float, shortest: int, min_span: int, step: float) -> float:
    """The start of slope ``beta``'s alphas: the largest multiple of ``step`` at or below ``least - beta *
    shortest``, where the rule keeps ``least = min(min_span, shortest)`` tokens (the clamp's floor) at the
    ``shortest`` profile length."""
    least = min(min_span, shortest)
    return math.floor((least - beta * shortest) / step) * step


def _product(spec: dict, source: Path, lengths: list[int], min_span: int, block_size: int) -> list[Rule]:
    alpha = spec.get("alpha") or {}
    step = _number(alpha.get("step_blocks", 1), f"{source}: alpha.step_blocks") * block_size
    if step <= 0:
        raise ValueError(f"rules.grid: {source}: alpha.step_blocks must be positive")
    fixed = None if alpha.get("start") is None else _number(alpha["start"], f"{source}: alpha.start")
    stop = lengths[-1] if alpha.get("stop") is None else _number(alpha["stop"], f"{source}: alpha.stop")
    betas = [_number(b, f"{source}: beta") for b in spec.get("beta") or []]
    rules = []
    for beta in betas:
        start = lowest_alpha(beta, lengths[0], min_span, step) if fixed is None else fixed
        rules += [Rule(float(a), beta) for a in np.arange(start, stop + step / 2, step)] if stop >= start else []
    return rules


def _explicit(item, source: Path) -> Rule:
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise ValueError(f"rules.grid: {source}: rule {item!r} must be a pair [alpha, beta]")
    return Rule(_number(item[0], f"{source}: rule alpha"), _number(item[1], f"{source}: rule beta"))


def _valid(rule: Rule, lengths, floor: float, min_span: int) -> bool:
    return not _failing(rule, lengths, floor, min_span)


def _failing(rule: Rule, lengths, floor: float, min_span: int) -> list[int]:
    """The lengths where ``rule`` is invalid; a switch rule (``beta > 1``) fails where it is already full at the
    shortest length, after the clamp (so at no length when that is at most ``min_span``)."""
    if rule.beta > 1:
        shortest = lengths[0]
        narrow = span_at(rule.alpha, rule.beta, shortest, min_span) < shortest
        return [] if rule.alpha + rule.beta * shortest >= floor and narrow else [shortest]
    return [n for n in lengths if not floor <= rule.alpha + rule.beta * n <= n]


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"rules.grid: {what} must be a finite number, got {value!r}")
    return float(value)
