"""Typed, validated settings: one frozen dataclass per config section, built from the composed Hydra config.

Every ``from_cfg(cfg)`` checks each key it reads and converts it to plain Python types; a bad value raises
:class:`pipeline.errors.UserError` with one line naming the key, the value and what is expected, e.g.
``optimize.points: bad value -1 (expected an integer >= 1)``. :func:`check_all` builds every section, whatever
stage is selected, so that a bad value anywhere fails before any stage runs.

Importing this module is cheap: torch, the kernels and the rule grid are imported only inside the checks that
need them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.errors import UserError


class _TorchDtypes(Mapping):
    """Dtype name -> ``torch.dtype``. Membership tests need no torch; a lookup imports it."""

    def __init__(self, names: tuple[str, ...]):
        self._names = names

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


DTYPES: Mapping = _TorchDtypes(("float32", "float16", "bfloat16", "float64"))
"""The one name -> torch dtype map of the project (model, profile and benchmark dtypes)."""
PROFILE_DTYPES = ("float32", "float64")
BENCH_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
MODEL_SOURCES = ("smollm2_gguf", "tiny", "path")
TINY_KEYS = ("seed", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
SOLVERS = ("highs", "cbc")
TRACKING_SCHEMES = ("sqlite:", "http:", "https:", "file:", "postgresql:")
STORAGE_SCHEMES = ("sqlite:", "postgresql", "mysql")
SAMPLERS = ("tpe", "nsga2")
PRUNERS = ("median", "none")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""A stage's own model dtype (``evaluate.dtype``, ``adapters.dtype``); see :class:`ComputeDtype`."""
MIN_LENGTH = 16
"""The shortest calibration, profile or validation length."""
BENCH_CPU_SEQ_LENS = (1024, 2048, 4096, 8192)
BENCH_GPU_SEQ_LENS = (1024, 4096, 16384, 65536, 131072)


# ---- small checkers: each takes the dotted key and the raw value, returns the converted value ----------------


def _show(value: Any) -> str:
    """``repr`` of a config value, with OmegaConf containers shown as plain lists and dicts, None as null."""
    if value is None:
        return "null"
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value)


def _bad(key: str, value: Any, expected: str) -> UserError:
    return UserError(f"{key}: bad value {_show(value)} (expected {expected})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(key: str, value: Any, minimum: int) -> int:
    """An integer >= ``minimum`` (bools and floats are rejected)."""
    if not _is_int(value) or value < minimum:
        raise _bad(key, value, f"an integer >= {minimum}")
    return int(value)


def _number(key: str, value: Any, ok: Callable[[float], bool], expected: str) -> float:
    """A finite number (int or float, not bool) for which ``ok`` holds."""
    if not _is_number(value) or not ok(value):
        raise _bad(key, value, expected)
    return float(value)


def _fraction(key: str, value: Any) -> float:
    """A number strictly between 0 and 1."""
    return _number(key, value, lambda x: 0 < x < 1, "a number in (0, 1)")


def _optional(check: Callable, key: str, value: Any, *args) -> Any:
    """``None`` stays ``None``; anything else goes through ``check``."""
    return None if value is None else check(key, value, *args)


def _choice(key: str, value: Any, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _bad(key, value, f"one of {', '.join(allowed)}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false")
    return value


def _text(key: str, value: Any, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, what)
    return value


def _list(key: str, value: Any, expected: str, item_ok: Callable[[Any], bool]) -> list:
    """A non-empty list of distinct items, each passing ``item_ok``; ``expected`` describes such a list."""
    if not isinstance(value, ListConfig | list | tuple) or not value or not all(map(item_ok, value)):
        raise _bad(key, value, expected)
    items = list(value)
    if len(set(map(repr, items))) != len(items):
        raise _bad(key, value, f"{expected}, without repeats")
    return items


def _int_list(key: str, value: Any, minimum: int) -> tuple[int, ...]:
    """A non-empty list of distinct integers >= ``minimum``, as a tuple in the given order."""
    items = _list(key, value, f"a non-empty list of integers >= {minimum}, e.g. [512,1024]",
                  lambda n: _is_int(n) and n >= minimum)
    return tuple(int(n) for n in items)


def _fraction_list(key: str, value: Any) -> tuple[float, ...]:
    """A non-empty list of distinct numbers in (0, 1)."""
    items = _list(key, value, "a non-empty list of numbers in (0, 1), e.g. [0.25,0.5]",
                  lambda x: _is_number(x) and 0 < x < 1)
    return tuple(float(x) for x in items)


def _choice_list(key: str, value: Any, allowed) -> tuple[str, ...]:
    """A non-empty list of distinct names, each one of ``allowed``."""
    items = _list(key, value, f"a non-empty list of names from {', '.join(allowed)}",
                  lambda x: isinstance(x, str) and x in allowed)
    return tuple(items)


def _directory(key: str, value: Any, must_exist: bool) -> Path:
    """A path that is (or, unless ``must_exist``, may become) a readable directory."""
    text = _text(key, value, "a directory path")
    path = Path(text).expanduser()
    if path.exists() or must_exist:
        if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
            raise _bad(key, value, "a readable directory")
    return path


def _section(cfg: DictConfig, name: str) -> Callable[[str], Any]:
    """A reader of ``cfg.<name>.<key>``: ``read(key)`` is the raw value, ``None`` when the key is absent."""
    node = cfg.get(name)
    if not isinstance(node, DictConfig):
        raise _bad(name, node, "a config section (a mapping)")
    return lambda key: node.get(key)


# ---- one settings class per section ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """Top-level keys: which stage, where runs go, resume, seed and device."""

    stage: str
    run_dir: Path
    force: bool
    lock_wait: bool
    """A stage running elsewhere on the same run directory: wait for it (true) or stop at once (false)."""
    seed: int
    device: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RunSettings:
        from pipeline.stages.registry import STAGE_ORDER

        return cls(
            stage=_choice("stage", cfg.get("stage"), (*STAGE_ORDER, "all")),
            run_dir=_directory("run_dir", cfg.get("run_dir"), False),
            force=_bool("force", cfg.get("force")),
            lock_wait=_bool("lock_wait", cfg.get("lock_wait", False)),
            seed=_int("seed", cfg.get("seed"), 0),
            device=_choice("device", cfg.get("device"), DEVICES),
        )

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this run selects, in order."""
        from pipeline.stages.registry import STAGE_ORDER

        return tuple(STAGE_ORDER) if self.stage == "all" else (self.stage,)

    def torch_device(self):
        """The ``torch.device`` that ``device`` names (``auto``: CUDA when available); CUDA must be present."""
        import torch

        cuda = torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise _bad("device", self.device, "auto or cpu: CUDA is not available on this machine")
        return torch.device("cuda" if self.device == "cuda" or (self.device == "auto" and cuda) else "cpu")


@dataclass(frozen=True)
class TinyModelSettings:
    """The extra keys of ``model=tiny``: the shape and seed of the random Llama."""

    seed: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TinyModelSettings:
        read = _section(cfg, "model")
        values = {key: _int(f"model.{key}", read(key), 0 if key == "seed" else 1) for key in TINY_KEYS}
        heads, kv_heads = values["num_heads"], values["num_kv_heads"]
        if heads % kv_heads:
            raise _bad("model.num_kv_heads", kv_heads, f"a divisor of model.num_heads={heads}")
        if values["hidden_size"] % (2 * heads):
            raise _bad("model.hidden_size", values["hidden_size"],
                       f"a multiple of 2 x model.num_heads = {2 * heads}, for an even head size")
        return cls(**values)


@dataclass(frozen=True)
class ModelSettings:
    """``model.*``: which model to load and how. ``path`` (a local checkpoint) wins over ``source``."""

    name: str
    source: str
    path: Path | None
    cache_dir: Path
    dtype: str
    max_positions: int
    tiny: TinyModelSettings | None
    """Set for ``source=tiny`` (or whenever the tiny keys are present)."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ModelSettings:
        read = _section(cfg, "model")
        source = _choice("model.source", read("source"), MODEL_SOURCES)
        if source == "path" and read("path") is None:
            raise _bad("model.path", None, "a readable directory, since model.source=path")
        path = _optional(_directory, "model.path", read("path"), True)
        wants_tiny = source == "tiny" or any(read(key) is not None for key in TINY_KEYS)
        return cls(
            name=_text("model.name", read("name")),
            source=source,
            path=path,
            cache_dir=_directory("model.cache_dir", read("cache_dir"), False),
            dtype=_choice("model.dtype", read("dtype"), tuple(DTYPES)),
            max_positions=_int("model.max_positions", read("max_positions"), 1),
            tiny=TinyModelSettings.from_cfg(cfg) if wants_tiny else None,
        )

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SparseSettings:
    """``sparse.*``: the sink-plus-band pattern every stage shares."""

    sink: int
    min_span: int
    block_size: int
    granularity: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SparseSettings:
        from pipeline.plan import GRANULARITIES

        read = _section(cfg, "sparse")
        return cls(
            sink=_int("sparse.sink", read("sink"), 0),
            min_span=_int("sparse.min_span", read("min_span"), 1),
            block_size=_int("sparse.block_size", read("block_size"), 1),
            granularity=_choice("sparse.granularity", read("granularity"), GRANULARITIES),
        )


@dataclass(frozen=True)
class CalibrationSettings:
    """``calibration.*``: the calibration samples (also the defaults of the profile lengths)."""

    lengths: tuple[int, ...]
    """Sorted."""
    samples_per_length: int
    tasks: tuple[str, ...]
    max_new_tokens: int
    seed: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> CalibrationSettings:
        from pipeline.calibration.tasks import TASKS

        read = _section(cfg, "calibration")
        return cls(
            lengths=tuple(sorted(_int_list("calibration.lengths", read("lengths"), MIN_LENGTH))),
            samples_per_length=_int("calibration.samples_per_length", read("samples_per_length"), 1),
            tasks=_choice_list("calibration.tasks", read("tasks"), tuple(TASKS)),
            max_new_tokens=_int("calibration.max_new_tokens", read("max_new_tokens"), 1),
            seed=_int("calibration.seed", read("seed"), 0),
        )


@dataclass(frozen=True)
class ProfileSettings:
    """The validated config keys the profile stage reads (``profile.*`` plus two ``sparse`` keys)."""

    lengths: tuple[int, ...]
    """In the configured order; each must be a calibration length."""
    block_size: int
    granularity: str
    checkpoint_every: int
    dtype: str
    long_range: float
    collective_timeout_s: float
    """Under torchrun: how long a collective waits for the other ranks before the job fails."""
    answer_weight: float
    """Weight of the mean NLL of the answer tokens added to the response mean (``pipeline.profile.loss``)."""
    gate_steps: int
    """Distillation steps of the head gates (``pipeline.profile.gates``); 0 trains none."""
    gate_length: int
    """The calibration length whose samples train the gates."""
    gate_lr: float
    gate_l1: float
    """Weight of the mean gate in the gates' training loss."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ProfileSettings:
        read = _section(cfg, "profile")
        sparse = SparseSettings.from_cfg(cfg)
        lengths = _int_list("profile.lengths", read("lengths"), MIN_LENGTH)
        calibrated = CalibrationSettings.from_cfg(cfg).lengths
        missing = [n for n in lengths if n not in calibrated]
        if missing:
            raise _bad("profile.lengths", read("lengths"),
                       f"calibration lengths only (calibration.lengths={list(calibrated)}); {missing[0]} is not one")
        return cls(
            lengths=lengths,
            block_size=sparse.block_size,
            granularity=sparse.granularity,
            checkpoint_every=_int("profile.checkpoint_every", read("checkpoint_every"), 1),
            dtype=_choice("profile.dtype", read("dtype"), PROFILE_DTYPES),
            long_range=_fraction("profile.long_range", read("long_range")),
            collective_timeout_s=_number("profile.collective_timeout_s", read("collective_timeout_s"),
                                         lambda x: x > 0, "a number of seconds > 0"),
            answer_weight=_number("profile.answer_weight", read("answer_weight"), lambda x: x >= 0, "a number >= 0"),
            gate_steps=_int("profile.gate_steps", read("gate_steps"), 0),
            gate_length=_gate_length(read("gate_length"), lengths),
            gate_lr=_number("profile.gate_lr", read("gate_lr"), lambda x: x > 0, "a number > 0"),
            gate_l1=_number("profile.gate_l1", read("gate_l1"), lambda x: x >= 0, "a number >= 0"),
        )

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]


def profile_lengths(cfg: DictConfig) -> tuple[int, ...]:
    """The planned lengths (``profile.lengths``), sorted: what rules, optimize and validate work with."""
    return tuple(sorted(ProfileSettings.from_cfg(cfg).lengths))


@dataclass(frozen=True)
class RulesSettings:
    """``rules.*``: the rule grid file and the coverages fitted per head."""

    grid: str
    """As configured; :func:`pipeline.rules.grid.load_grid` resolves it (a path, or a grid shipped in the
    ``search_spaces`` package)."""
    coverages: tuple[float, ...]
    report_coverage: float
    local_beta: float
    lengths: tuple[int, ...]
    """The sorted profile lengths the grid was checked against."""
    influence: str = "net"
    """``net``: the loss table sums the profile's signed block influence, clamped at 0; ``abs``: its absolute one."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RulesSettings:
        read = _section(cfg, "rules")
        coverages = _fraction_list("rules.coverages", read("coverages"))
        report = _fraction("rules.report_coverage", read("report_coverage"))
        if report not in coverages:
            raise _bad("rules.report_coverage", report,
                       f"one of rules.coverages: {', '.join(f'{c:g}' for c in coverages)}")
        settings = cls(
            grid=_text("rules.grid", read("grid"), "a grid YAML file"),
            coverages=coverages,
            report_coverage=report,
            local_beta=_number("rules.local_beta", read("local_beta"), lambda x: 0 <= x <= 1, "a number in [0, 1]"),
            lengths=profile_lengths(cfg),
            influence=_choice("rules.influence", read("influence"), ("net", "abs")),
        )
        settings.check_grid(SparseSettings.from_cfg(cfg))
        return settings

    def check_grid(self, sparse: SparseSettings) -> None:
        """Load the grid once, so a missing file, bad YAML or an invalid rule fails before any stage runs."""
        from pipeline.rules.grid import load_grid, resolve_grid_path

        try:
            resolve_grid_path(self.grid)
        except ValueError:
            raise _bad("rules.grid", self.grid, "a grid YAML file: a path, or search_spaces/<name> for a shipped grid") from None
        try:
            load_grid(self.grid, self.lengths, sink=sparse.sink, min_span=sparse.min_span,
                      block_size=sparse.block_size)
        except ValueError as err:
            raise UserError(" ".join(str(err).split())) from None  # YAML errors span lines


def _gate_length(value: Any, lengths: tuple[int, ...]) -> int:
    """``profile.gate_length``: one of the profile lengths; null: the middle one (the shorter of two)."""
    if value is None:
        return sorted(lengths)[(len(lengths) - 1) // 2]
    if isinstance(value, bool) or not isinstance(value, int) or value not in lengths:
        raise _bad("profile.gate_length", value, f"null or one of the profile lengths {list(lengths)}")
    return value


@dataclass(frozen=True)
class OptimizeSettings:
    """``optimize.*``: the plan MILP and its Pareto front."""

    budgets: tuple[dict[int, float], ...]
    """One front per entry: its KV density upper bound per profile length, in length order."""
    lower_bound_ratio: float | None
    max_rules_per_layer: int
    solver: str
    points: int
    time_limit: float | None
    gap_rel: float
    binary_window: int | None
    """The binary baseline's streaming window (tokens after the sink); None picks one per budget."""
    gate_weight: float
    """Weight of the head gates' term in the plan cost (:func:`pipeline.optimize.gate_cost.planning_loss`)."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> OptimizeSettings:
        read = _section(cfg, "optimize")
        return cls(
            budgets=density_budgets(read("density_budget"), profile_lengths(cfg)),
            lower_bound_ratio=_optional(_number, "optimize.lower_bound_ratio", read("lower_bound_ratio"),
                                        lambda x: 0 < x <= 1, "null or a number in (0, 1]"),
            max_rules_per_layer=_int("optimize.max_rules_per_layer", read("max_rules_per_layer"), 1),
            solver=_choice("optimize.solver", read("solver"), SOLVERS),
            points=_int("optimize.points", read("points"), 1),
            time_limit=_optional(_number, "optimize.time_limit", read("time_limit"), lambda x: x > 0,
                                 "null or a number of seconds > 0"),
            gap_rel=_number("optimize.gap_rel", read("gap_rel"), lambda x: 0 <= x < 1, "a number in [0, 1)"),
            binary_window=_optional(_int, "optimize.binary_window", read("binary_window"), 1),
            gate_weight=_number("optimize.gate_weight", read("gate_weight"), lambda x: x >= 0, "a number >= 0"),
        )


def density_budgets(value: Any, lengths) -> tuple[dict[int, float], ...]:
    """``optimize.density_budget`` as one ``{N: d}`` per front: a number or a map from every profile length to a
    number, or a list of those (one front per entry, e.g. ``[0.5, 0.25]``)."""
    key = "optimize.density_budget"
    if not isinstance(value, ListConfig | list | tuple):
        return (_one_budget(key, value, lengths),)
    if not value:
        raise _bad(key, value, "a number in (0, 1], a map over the profile lengths, or a non-empty list of those")
    budgets = tuple(_one_budget(f"{key}[{i}]", item, lengths) for i, item in enumerate(value))
    labels = [budget_label(b) for b in budgets]
    if len(set(labels)) != len(labels):
        raise _bad(key, value, "distinct budgets (their values at the longest profile length name them)")
    return budgets


def budget_label(budget: dict[int, float]) -> str:
    """The name of a budget in file names, tables and MLflow: its value at the longest profile length."""
    return f"{budget[max(budget)]:g}"


def _one_budget(key: str, value: Any, lengths) -> dict[int, float]:
    lengths, budget = sorted(lengths), "a number in (0, 1]"
    if not isinstance(value, DictConfig | dict):
        expected = f"{budget}, or a map {{length: number}} over the profile lengths {lengths}"
        return dict.fromkeys(lengths, _number(key, value, _is_budget, expected))
    given = _length_map(key, value, lengths)
    return {n: _number(f"{key}[{n}]", given[n], _is_budget, budget) for n in lengths}


def _is_budget(x: float) -> bool:
    return 0 < x <= 1


def _length_map(key: str, value, lengths: list[int]) -> dict[int, Any]:
    """A map keyed by exactly ``lengths`` (keys may be written as strings), as ``{int: value}``."""
    expected = f"a map over exactly the profile lengths {lengths}, e.g. {{{lengths[0]}: 0.5}}"
    try:
        given = {int(length): item for length, item in value.items()}
    except (TypeError, ValueError):
        raise _bad(key, value, expected) from None
    if sorted(given) != lengths:
        raise _bad(key, value, expected)
    return given


@dataclass(frozen=True)
class ValidateSettings:
    """``validate.*``: held-out scoring of the candidate plans."""

    length: int | None
    """The validation length: ``validate.length``, or the midpoint of the two longest profile lengths on a block
    boundary; never a profile length. ``None`` only when built with ``need_length=False`` and no default exists."""
    samples: int
    backend: str
    shortlist: int
    """Front plans scored per budget: the compromise plans of the front (see ``stages.validate.shortlist``)."""
    tie_tolerance: float
    """Relative perplexity within which shortlisted plans count as tied; the first in compromise order wins a tie
    (see ``stages.validate.select``)."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig, *, need_length: bool = True) -> ValidateSettings:
        from kernels import PREFILL_BACKENDS

        read = _section(cfg, "validate")
        return cls(
            length=validation_length(cfg, read("length"), need_length),
            samples=_int("validate.samples", read("samples"), 1),
            shortlist=_int("validate.shortlist", read("shortlist"), 1),
            tie_tolerance=_number("validate.tie_tolerance", read("tie_tolerance"), lambda x: 0 <= x < 1,
                                  "a number in [0, 1)"),
            backend=_choice("validate.backend", read("backend"), PREFILL_BACKENDS),
        )


def validation_length(cfg: DictConfig, value: Any, need_length: bool) -> int | None:
    """``validate.length`` checked against the profile lengths, or by default the midpoint of the two longest
    profile lengths, rounded down to a block boundary."""
    lengths = profile_lengths(cfg)
    unseen = f"an integer >= {MIN_LENGTH} that is not a profile length {list(lengths)}"
    if value is not None:
        length, shown = _int("validate.length", value, MIN_LENGTH), value
    elif len(lengths) >= 2:
        block = SparseSettings.from_cfg(cfg).block_size
        length = (lengths[-2] + lengths[-1]) // 2 // block * block
        shown = f"null (its default {length})"
    elif need_length:
        raise _bad("validate.length", None, f"{unseen}; with a single profile length there is no default")
    else:
        return None
    if length in lengths or length < MIN_LENGTH:
        raise UserError(f"validate.length: bad value {shown} (expected {unseen})")
    return length


class ComputeDtype:
    """A stage setting ``dtype`` (one of :data:`COMPUTE_DTYPES`): the model's dtype in that stage."""

    dtype: str

    def compute_dtype(self, model_dtype: str, device) -> str:
        """The model's dtype for this stage on ``device`` (a ``torch.device``), when it was loaded as
        ``model_dtype``: ``dtype`` itself, or for ``auto`` bfloat16 where the device computes it natively (CUDA
        with bf16 support, a CPU with AVX512-BF16 or AMX), else ``model_dtype``."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if model_dtype == "bfloat16" or native_bfloat16(device) else model_dtype


@dataclass(frozen=True)
class EvaluateSettings(ComputeDtype):
    """``evaluate.*``: the methods x budgets x tasks x lengths evaluation."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int
    """Samples per task and length."""
    max_new_tokens: int
    seed: int
    backend: str
    dtype: str
    """The model's dtype in this stage: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (see
    :meth:`compute_dtype`). Every method, dense included, runs in it."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> EvaluateSettings:
        from kernels import PREFILL_BACKENDS
        from pipeline.evaluation.tasks import TASKS

        read = _section(cfg, "evaluate")
        max_new_tokens = _int("evaluate.max_new_tokens", read("max_new_tokens"), 1)
        lengths = _int_list("evaluate.lengths", read("lengths"), max_new_tokens + MIN_LENGTH)
        positions = ModelSettings.from_cfg(cfg).max_positions
        if max(lengths) > positions:
            raise _bad("evaluate.lengths", read("lengths"), f"lengths within the model's {positions} positions")
        return cls(
            tasks=_choice_list("evaluate.tasks", read("tasks"), tuple(TASKS)),
            lengths=tuple(sorted(lengths)),
            samples=_int("evaluate.samples", read("samples"), 1),
            max_new_tokens=max_new_tokens,
            seed=_int("evaluate.seed", read("seed"), 0),
            backend=_choice("evaluate.backend", read("backend"), PREFILL_BACKENDS),
            dtype=_choice("evaluate.dtype", read("dtype"), COMPUTE_DTYPES),
        )


@dataclass(frozen=True)
class BenchmarkSettings:
    """``benchmark.*`` as configured; :meth:`resolve` turns it into :class:`kernels.bench.BenchSettings`."""

    seq_lens: tuple[int, ...] | None
    """``None``: the device's default lengths."""
    densities: tuple[float, ...]
    backends: tuple[str, ...]
    decode_seq_lens: tuple[int, ...] | None
    """``None``: the prefill lengths."""
    decode_backends: tuple[str, ...]
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    warmup: int
    repeats: int
    decode_repeats: int
    error_rows: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> BenchmarkSettings:
        from kernels.bench import BENCH_DECODE_BACKENDS, BENCH_PREFILL_BACKENDS

        read = _section(cfg, "benchmark")
        ints = {key: _int(f"benchmark.{key}", read(key), 0 if key == "warmup" else 1)
                for key in ("batch", "heads", "kv_heads", "head_dim", "warmup", "repeats", "decode_repeats",
                            "error_rows")}
        if ints["heads"] % ints["kv_heads"]:
            raise _bad("benchmark.kv_heads", ints["kv_heads"], f"a divisor of benchmark.heads={ints['heads']}")
        return cls(
            seq_lens=_optional(_int_list, "benchmark.seq_lens", read("seq_lens"), 1),
            densities=_fraction_list("benchmark.densities", read("densities")),
            backends=_choice_list("benchmark.backends", read("backends"), BENCH_PREFILL_BACKENDS),
            decode_seq_lens=_optional(_int_list, "benchmark.decode_seq_lens", read("decode_seq_lens"), 1),
            decode_backends=_choice_list("benchmark.decode_backends", read("decode_backends"), BENCH_DECODE_BACKENDS),
            dtype=_choice("benchmark.dtype", read("dtype"), BENCH_DTYPES),
            **ints,
        )

    def resolve(self, device, sink: int, seed: int):
        """The :class:`kernels.bench.BenchSettings` for ``device``: its default lengths and dtype, and only the
        backends that run there."""
        from kernels import bench

        cuda = device.type == "cuda"
        seq_lens = self.seq_lens or (BENCH_GPU_SEQ_LENS if cuda else BENCH_CPU_SEQ_LENS)
        dtype = ("bfloat16" if cuda else "float32") if self.dtype == "auto" else self.dtype
        return bench.BenchSettings(
            seq_lens=seq_lens, densities=self.densities,
            backends=bench.available_backends(self.backends, device, bench.BENCH_PREFILL_BACKENDS),
            decode_seq_lens=self.decode_seq_lens or seq_lens,
            decode_backends=bench.available_backends(self.decode_backends, device, bench.BENCH_DECODE_BACKENDS),
            batch=self.batch, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, sink=sink,
            dtype=DTYPES[dtype], device=device, warmup=self.warmup, repeats=self.repeats,
            decode_repeats=self.decode_repeats, error_rows=self.error_rows, seed=seed,
        )


def bench_settings(cfg: DictConfig):
    """``cfg.benchmark`` validated and resolved for the configured device: a :class:`kernels.bench.BenchSettings`
    (what ``pipeline.stages.benchmark.settings_from`` returned)."""
    run = RunSettings.from_cfg(cfg)
    return BenchmarkSettings.from_cfg(cfg).resolve(run.torch_device(), SparseSettings.from_cfg(cfg).sink, run.seed)


@dataclass(frozen=True)
class OptunaSettings:
    """``adapters.optuna.*``: the composition study, its sampler, pruner and storage."""

    trials: int
    sampler: str
    sampler_seed: int
    startup_trials: int
    pruner: str
    pruner_startup_trials: int
    storage: str | None
    """``None``: ``sqlite:///<run_dir>/optuna.db``."""
    study_name: str
    heartbeat_s: int
    worker: bool
    """Only add trials to the (shared) study, and leave the baselines and results to the stage's own run."""
    time_budget_min: float | None = None
    """No new trial starts once the trial time (summed over workers) and a typical trial would pass this many
    minutes; ``None``: no limit, only ``trials``."""

    @property
    def time_budget_s(self) -> float | None:
        return None if self.time_budget_min is None else 60.0 * self.time_budget_min

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> OptunaSettings:
        node = cfg.adapters.get("optuna") if isinstance(cfg.get("adapters"), DictConfig) else None
        if not isinstance(node, DictConfig):
            raise _bad("adapters.optuna", node, "a config section (a mapping)")
        read = node.get
        storage = read("storage")
        if storage is not None and not (isinstance(storage, str) and storage.startswith(STORAGE_SCHEMES)):
            raise _bad("adapters.optuna.storage", storage, f"null or an RDB URL starting with {', '.join(STORAGE_SCHEMES)}")
        return cls(
            trials=_int("adapters.optuna.trials", read("trials"), 1),
            sampler=_choice("adapters.optuna.sampler", read("sampler"), SAMPLERS),
            sampler_seed=_int("adapters.optuna.sampler_seed", read("sampler_seed"), 0),
            startup_trials=_int("adapters.optuna.startup_trials", read("startup_trials"), 0),
            pruner=_choice("adapters.optuna.pruner", read("pruner"), PRUNERS),
            pruner_startup_trials=_int("adapters.optuna.pruner_startup_trials", read("pruner_startup_trials"), 0),
            storage=storage,
            study_name=_text("adapters.optuna.study_name", read("study_name")),
            heartbeat_s=_int("adapters.optuna.heartbeat_s", read("heartbeat_s"), 1),
            worker=_bool("adapters.optuna.worker", read("worker", False)),
            time_budget_min=_optional(_number, "adapters.optuna.time_budget_min", read("time_budget_min"),
                                      lambda x: x > 0, "null or a number of minutes > 0"),
        )


@dataclass(frozen=True)
class AdaptersSettings(ComputeDtype):
    """``adapters.*``: the Mixture-of-Adapters search, its tasks, training and baselines."""

    tasks: tuple[str, ...]
    train_examples: int
    val_examples: int
    test_examples: int
    steps: int
    """Optimiser steps of each search trial."""
    final_steps: int
    """Optimiser steps of the final comparison: the most accurate Pareto composition retrained (``final``) and the
    lora and moe_lora baselines; ``adapters.final_steps=null`` means ``steps`` (no retraining: the trial itself)."""
    batch_size: int
    max_new_tokens: int
    latency_prompts: int
    latency_rounds: int
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    search_space: Any
    """The checked :class:`pipeline.search.space.SearchSpace`."""
    search_space_path: str | None
    plan: str | None
    """``selected``: validate's plan at the first budget; a plan file path; ``None``: no plan."""
    plan_training: bool
    """Also retrain the most accurate Pareto composition with the plan applied (``trial_<n>+plan``)."""
    backend: str
    dtype: str
    """The frozen base model's dtype in this stage: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (see
    :meth:`compute_dtype`); the adapters themselves stay float32 on a half-precision base."""
    seed: int
    optuna: OptunaSettings
    lora_targets: tuple[str, ...]
    moe_lora_experts: int
    moe_lora_rank: int
    moe_lora_targets: tuple[str, ...]
    moe_lora_top_k: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> AdaptersSettings:
        from kernels import PREFILL_BACKENDS
        from pipeline.adapters.composition import LORA_TARGETS
        from pipeline.adapters.tasks import TASKS
        from pipeline.search.space import load_space

        read = _section(cfg, "adapters")
        space_path = read("search_space")
        if space_path is not None:
            space_path = _text("adapters.search_space", space_path, "null or a search-space YAML path")
        if space_path is not None and not Path(space_path).expanduser().is_file():
            raise _bad("adapters.search_space", space_path, "null or an existing search-space YAML file")
        try:
            space = load_space(space_path and Path(space_path).expanduser())
        except ValueError as err:
            raise _bad("adapters.search_space", space_path, f"a usable search space; {err}") from None
        plan = read("plan")
        if plan is not None and plan != "selected":
            plan = _text("adapters.plan", plan, "null, selected, or a plan file path")
            if not Path(plan).expanduser().is_file():
                raise _bad("adapters.plan", plan, "null, selected, or an existing plan file")
        baselines = cfg.adapters.get("baselines")
        if not isinstance(baselines, DictConfig):
            raise _bad("adapters.baselines", baselines, "a config section (a mapping)")
        experts = _int("adapters.baselines.moe_lora_experts", baselines.get("moe_lora_experts"), 2)
        top_k = _int("adapters.baselines.moe_lora_top_k", baselines.get("moe_lora_top_k"), 1)
        if top_k > experts:
            raise _bad("adapters.baselines.moe_lora_top_k", top_k, f"at most moe_lora_experts={experts}")
        steps = _int("adapters.steps", read("steps"), 2)
        final_steps = _optional(_int, "adapters.final_steps", read("final_steps"), 2)
        return cls(
            tasks=_choice_list("adapters.tasks", read("tasks"), tuple(TASKS)),
            train_examples=_int("adapters.train_examples", read("train_examples"), 1),
            val_examples=_int("adapters.val_examples", read("val_examples"), 1),
            test_examples=_int("adapters.test_examples", read("test_examples"), 1),
            steps=steps,
            final_steps=steps if final_steps is None else final_steps,
            batch_size=_int("adapters.batch_size", read("batch_size"), 1),
            max_new_tokens=_int("adapters.max_new_tokens", read("max_new_tokens"), 1),
            latency_prompts=_int("adapters.latency_prompts", read("latency_prompts"), 1),
            latency_rounds=_int("adapters.latency_rounds", read("latency_rounds"), 1),
            weight_decay=_number("adapters.weight_decay", read("weight_decay"), lambda x: x >= 0, "a number >= 0"),
            warmup_ratio=_number("adapters.warmup_ratio", read("warmup_ratio"), lambda x: 0 <= x < 1,
                                 "a number in [0, 1)"),
            max_grad_norm=_number("adapters.max_grad_norm", read("max_grad_norm"), lambda x: x > 0, "a number > 0"),
            search_space=space,
            search_space_path=space_path,
            plan=plan,
            plan_training=_bool("adapters.plan_training", read("plan_training")),
            backend=_choice("adapters.backend", read("backend"), PREFILL_BACKENDS),
            dtype=_choice("adapters.dtype", read("dtype"), COMPUTE_DTYPES),
            seed=_int("adapters.seed", read("seed"), 0),
            optuna=OptunaSettings.from_cfg(cfg),
            lora_targets=_choice_list("adapters.baselines.lora_targets", baselines.get("lora_targets"), LORA_TARGETS),
            moe_lora_experts=experts,
            moe_lora_rank=_int("adapters.baselines.moe_lora_rank", baselines.get("moe_lora_rank"), 1),
            moe_lora_targets=_choice_list("adapters.baselines.moe_lora_targets", baselines.get("moe_lora_targets"),
                                          LORA_TARGETS),
            moe_lora_top_k=top_k,
        )


def native_bfloat16(device) -> bool:
    """Whether ``device`` (a ``torch.device``) has bfloat16 matrix units: CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX tiles (``torch.cpu``'s capability checks)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check() for check in checks if check is not None)
    return False


@dataclass(frozen=True)
class TrackingSettings:
    """``tracking.*``: the MLflow store (``None``: SQLite under ``run_dir``) and experiment."""

    uri: str | None
    experiment: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrackingSettings:
        read = _section(cfg, "tracking")
        uri = read("uri")
        if uri is not None and not (isinstance(uri, str) and uri.startswith(TRACKING_SCHEMES)):
            raise _bad("tracking.uri", uri, f"null or a URI starting with {', '.join(TRACKING_SCHEMES)}")
        return cls(uri=uri, experiment=_text("tracking.experiment", read("experiment")))


@dataclass(frozen=True)
class Settings:
    """Every section's settings, as :func:`check_all` returns them."""

    run: RunSettings
    model: ModelSettings
    sparse: SparseSettings
    calibration: CalibrationSettings
    profile: ProfileSettings
    rules: RulesSettings
    optimize: OptimizeSettings
    validate: ValidateSettings
    evaluate: EvaluateSettings
    adapters: AdaptersSettings
    benchmark: Any
    """The resolved :class:`kernels.bench.BenchSettings`."""
    tracking: TrackingSettings


def check_all(cfg: DictConfig) -> Settings:
    """Validate every section, whatever stage is selected; raise :class:`UserError` for the first bad value.

    The one check that depends on the selection: a default validation length is required only when the validate
    stage runs (a single calibration length is fine for ``stage=calibrate``)."""
    run = RunSettings.from_cfg(cfg)
    return Settings(
        run=run,
        model=ModelSettings.from_cfg(cfg),
        sparse=SparseSettings.from_cfg(cfg),
        calibration=CalibrationSettings.from_cfg(cfg),
        profile=ProfileSettings.from_cfg(cfg),
        rules=RulesSettings.from_cfg(cfg),
        optimize=OptimizeSettings.from_cfg(cfg),
        validate=ValidateSettings.from_cfg(cfg, need_length="validate" in run.stages),
        evaluate=EvaluateSettings.from_cfg(cfg),
        adapters=AdaptersSettings.from_cfg(cfg),
        benchmark=bench_settings(cfg),
        tracking=TrackingSettings.from_cfg(cfg),
    )
