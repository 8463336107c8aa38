"""The adapter-composition search space (``search_spaces/adapters.yaml``) and how an Optuna trial samples it.

The YAML names, per expert type the search may include, the choices of its size and targets; the adapted layer
ranges as fractions of the depth; the router's kind, width and threshold cap; and the learning rate. A trial
samples, define-by-run:

- ``experts``: a non-empty subset of the listed types, as one categorical (``"lora+parallel"``), so that the
  sampler sees the presence of each type jointly;
- per present type, ``<type>_size`` and ``<type>_targets`` (only where the YAML gives more than one choice);
- ``layers``, ``router``, ``router_hidden``, ``threshold_cap`` (sparse routers only) and ``lr``.

:func:`load_space` checks the file and raises a one-line ``ValueError`` for anything it cannot use.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from pipeline.adapters.composition import (
    EXPERT_KINDS,
    IA3_TARGETS,
    LORA_TARGETS,
    Composition,
    ExpertSpec,
    RouterSpec,
)

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "adapters.yaml"
SEARCHED_ROUTERS = ("soft", "sparse")
TARGETS = {"lora": LORA_TARGETS, "ia3": IA3_TARGETS}


@dataclass(frozen=True)
class NumberRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class ExpertChoices:
    sizes: tuple[int, ...]
    targets: tuple[tuple[str, ...], ...]
    alpha_ratio: float = 2.0


@dataclass(frozen=True)
class SearchSpace:
    experts: dict[str, ExpertChoices]
    layers: tuple[tuple[float, float], ...]
    router_kinds: tuple[str, ...]
    router_hidden: tuple[int, ...]
    threshold_cap: NumberRange
    lr: NumberRange
    start: tuple[dict[str, Any], ...] = ()
    """Trials enqueued before any sampling (Optuna's ``enqueue_trial``), as the parameters :func:`suggest` asks
    for: known-good compositions the search starts from."""

    @property
    def expert_subsets(self) -> tuple[str, ...]:
        """Every non-empty subset of the expert types, as ``"a+b"`` labels in a fixed order."""
        kinds = list(self.experts)
        return tuple("+".join(c) for r in range(1, len(kinds) + 1) for c in itertools.combinations(kinds, r))


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read and check a search-space YAML (``None``: the packaged one)."""
    path = Path(path) if path else DEFAULT_SPACE
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"search space {path}: cannot read it ({str(err).splitlines()[0]})") from None
    where = f"search space {path}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with experts, layers, router and lr")
    unknown = set(raw) - {"experts", "layers", "router", "lr", "start"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected experts, layers, router, lr, start)")
    router = _mapping(raw.get("router"), f"{where}: router")
    space = SearchSpace(
        experts=_experts(raw.get("experts"), where),
        layers=_layers(raw.get("layers"), where),
        router_kinds=_choices(router.get("kind"), f"{where}: router.kind", lambda k: k in SEARCHED_ROUTERS,
                              f"names from {', '.join(SEARCHED_ROUTERS)}"),
        router_hidden=_choices(router.get("hidden"), f"{where}: router.hidden", _is_count(0), "integers >= 0"),
        threshold_cap=_range(router.get("threshold_cap"), f"{where}: router.threshold_cap",
                             lambda x: 0 < x <= 1, "in (0, 1]"),
        lr=_range(raw.get("lr"), f"{where}: lr", lambda x: 0 < x < 1, "in (0, 1)"),
    )
    return dataclasses.replace(space, start=_start(raw.get("start"), space, where))


def _start(raw: Any, space: SearchSpace, where: str) -> tuple[dict[str, Any], ...]:
    """The ``start`` trials, each checked by running :func:`suggest` on it as a fixed trial: every parameter it
    asks for must be given, within its choices, and nothing else."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        raise ValueError(f"{where}: start must be a list of mappings of trial parameters")
    for i, params in enumerate(raw):
        trial = optuna.trial.FixedTrial(params)
        try:
            suggest(trial, space, num_layers=1)
        except ValueError as err:
            raise ValueError(f"{where}: start[{i}]: {err}") from None
        extra = set(params) - set(trial.params)
        if extra:
            raise ValueError(f"{where}: start[{i}]: parameters {sorted(extra)} are not asked for by this "
                             f"composition (it asks for {sorted(trial.params)})")
    return tuple(raw)


def suggest(trial, space: SearchSpace, num_layers: int) -> tuple[Composition, float]:
    """Sample one composition and learning rate from ``space`` for a model of ``num_layers`` layers."""
    present = trial.suggest_categorical("experts", list(space.expert_subsets)).split("+")
    experts = []
    for kind in present:
        choices = space.experts[kind]
        size = _pick(trial, f"{kind}_size", choices.sizes)
        targets = _pick(trial, f"{kind}_targets", [",".join(t) for t in choices.targets]).split(",")
        experts.append(_expert(kind, size, tuple(t for t in targets if t), choices))
    first, last = _pick(trial, "layers", [f"{a}-{b}" for a, b in space.layers]).split("-")
    layers = layer_range(float(first), float(last), num_layers)
    kind = _pick(trial, "router", list(space.router_kinds))
    hidden = _pick(trial, "router_hidden", list(space.router_hidden))
    cap = (trial.suggest_float("threshold_cap", space.threshold_cap.low, space.threshold_cap.high)
           if kind == "sparse" else 1.0)
    lr = trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log)
    router = RouterSpec(kind=kind, hidden=hidden, threshold_cap=cap)
    return Composition(experts=tuple(experts), router=router, layers=layers), lr


def layer_range(first: float, last: float, num_layers: int) -> tuple[int, int]:
    """Depth fractions ``[first, last)`` as decoder-layer indices, rounded outwards: never empty, since
    ``floor(first * n) <= first * n < last * n <= ceil(last * n)``."""
    return int(math.floor(first * num_layers)), int(math.ceil(last * num_layers))


def every_choice(space: SearchSpace, num_layers: int) -> list[Composition]:
    """One single-expert composition per (type, size, targets) choice and one per layer range: checking these
    against the model before the search finds an expert the architecture cannot host before any training."""
    compositions = []
    for kind, choices in space.experts.items():
        for size, targets in itertools.product(choices.sizes, choices.targets):
            compositions.append(Composition(experts=(_expert(kind, size, targets, choices),),
                                            router=RouterSpec(kind="none")))
    first = compositions[0].experts
    for a, b in space.layers:
        compositions.append(Composition(experts=first, router=RouterSpec(kind="none"),
                                        layers=layer_range(a, b, num_layers)))
    return compositions


def _expert(kind: str, size: int, targets: tuple[str, ...], choices: ExpertChoices) -> ExpertSpec:
    """One expert of a sampled choice; a LoRA's alpha is ``alpha_ratio`` times its rank."""
    if kind == "lora":
        return ExpertSpec("lora", size=size, alpha=choices.alpha_ratio * size, targets=targets)
    return ExpertSpec(kind, size=size, targets=targets)


def _pick(trial, name: str, choices):
    """A categorical parameter, or the only choice without asking the sampler."""
    choices = list(choices)
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)


def _experts(raw: Any, where: str) -> dict[str, ExpertChoices]:
    raw = _mapping(raw, f"{where}: experts")
    if not raw:
        raise ValueError(f"{where}: experts is empty (list at least one of {', '.join(EXPERT_KINDS)})")
    experts = {}
    for kind, entry in raw.items():
        if kind not in EXPERT_KINDS:
            raise ValueError(f"{where}: unknown expert type {kind!r} (expected one of {', '.join(EXPERT_KINDS)})")
        entry = _mapping(entry, f"{where}: experts.{kind}")
        unknown = set(entry) - {"size", "targets", "alpha_ratio"}
        if unknown:
            raise ValueError(f"{where}: experts.{kind} has unknown keys {sorted(unknown)}")
        sizes = _choices(entry.get("size", [1]), f"{where}: experts.{kind}.size", _is_count(1), "integers >= 1")
        allowed = TARGETS.get(kind, ())
        if kind in TARGETS:
            targets = _choices(entry.get("targets"), f"{where}: experts.{kind}.targets",
                               lambda t, allowed=allowed: isinstance(t, list) and t and set(t) <= set(allowed),
                               f"non-empty lists of {', '.join(allowed)}")
            targets = tuple(tuple(t) for t in targets)
        elif "targets" in entry:
            raise ValueError(f"{where}: experts.{kind} takes no targets")
        else:
            targets = ((),)
        ratio = entry.get("alpha_ratio", 2.0)
        if not (isinstance(ratio, int | float) and not isinstance(ratio, bool) and ratio > 0):
            raise ValueError(f"{where}: experts.{kind}.alpha_ratio: bad value {ratio!r} (expected a number > 0)")
        experts[kind] = ExpertChoices(sizes=tuple(sizes), targets=targets, alpha_ratio=float(ratio))
    return experts


def _layers(raw: Any, where: str) -> tuple[tuple[float, float], ...]:
    def ok(pair):
        return (isinstance(pair, list) and len(pair) == 2 and all(_is_num(x) for x in pair)
                and 0 <= pair[0] < pair[1] <= 1)

    pairs = _choices(raw, f"{where}: layers", ok, "[first, last) fractions with 0 <= first < last <= 1")
    return tuple((float(a), float(b)) for a, b in pairs)


def _choices(raw: Any, key: str, ok, expected: str) -> list:
    if not isinstance(raw, list) or not raw or not all(ok(x) for x in raw):
        raise ValueError(f"{key}: bad value {raw!r} (expected a non-empty list of {expected})")
    if len({repr(x) for x in raw}) != len(raw):
        raise ValueError(f"{key}: bad value {raw!r} (choices repeat)")
    return raw


def _range(raw: Any, key: str, ok, expected: str) -> NumberRange:
    raw = _mapping(raw, key)
    low, high, log = raw.get("low"), raw.get("high"), raw.get("log", False)
    if not (_is_num(low) and _is_num(high) and ok(low) and ok(high) and low <= high and isinstance(log, bool)):
        raise ValueError(f"{key}: bad value {raw!r} (expected {{low, high, log}} with low <= high, each {expected})")
    return NumberRange(float(low), float(high), log)


def _mapping(raw: Any, key: str) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{key}: bad value {raw!r} (expected a mapping)")
    return raw


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(minimum: int):
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= minimum
