"""The sparse-attention plan file (``plan.json``, format ``moa-plan/1``): one elastic rule per head and layer.

A plan stores ``alphas``/``betas`` as ``[layer][head]`` arrays. With ``granularity="kv_head"`` (the default) a
head is a KV head and every query head of its GQA group shares the rule; with ``granularity="head"`` a head is a
query head. Spans follow :mod:`kernels.pattern`: ``S(N) = clamp(alpha + beta * N, min_span, N)`` (an imported
plan may also set ``span_multiple`` and ``span_offset``, written only when set).

Checking a plan against a model (:func:`validate_plan`) compares layer and head counts, the head size and the
weight fingerprint. The model may be a :class:`pipeline.models.ModelInfo`-like object (attributes ``name,
num_layers, num_heads, num_kv_heads, head_dim, fingerprint``), a ``LoadedModel`` (its ``.info`` is used) or a
Hugging Face model, read from its config. The fingerprint check is skipped only when the model has no
``fingerprint`` attribute (a bare HF model usually has none: pass its ``ModelInfo`` to get the check) or when the
plan records none (a bare file of the original MoA release).

KV density (:func:`plan_kv_density`) is what the per-head cache allocates: per KV head, ``min(sink + S_kv, N)``
tokens, with ``S_kv`` the largest span among the query heads sharing it (:func:`kv_spans_for`). At ``head``
granularity on a GQA model that is more than the mean over query heads.

Importing the original MoA release. Its bare ``{"alphas", "betas"}`` files are per query head, and its runtime
keeps, per head, ``C = min(N, max(128, ceil64(min(int(alpha + beta * N), N))))`` KV tokens with the sink (64
tokens) *inside* that span, where this runtime keeps ``sink + S``. :func:`from_moa_release` converts: sink 64,
``span_multiple=64`` and ``span_offset=-64`` (so ``S = ceil64(floor(alpha + beta * N)) - 64``, the release's
span less its sink) and ``min_span=64`` (so ``sink + S >= 128``), recorded in ``imported_from``. Every head then
keeps exactly ``C`` tokens at every ``N``: the release's ``int()`` truncates where ``floor`` rounds down only
below 0, where both end at the 128-token floor. The sink comes off after the floor, in integers, rather than off
``alpha`` (storing ``alpha - 64``): ``floor(alpha + beta * N)`` is then the same float64 expression as the
release's, while ``(alpha - 64) + beta * N`` can round differently within an ulp of an integer and move ``C`` by
64 tokens. What still differs from the release's runtime:

- its prefill is block-granular (64-token blocks), where ours keeps the token-level mask of
  :mod:`kernels.pattern`, so prefill attends to slightly different keys near each band's edge;
- it sizes spans at the prompt length plus its ``max_new_tokens`` (1024 by default); ours at the prompt length plus
  the ``max_new_tokens`` given to :func:`pipeline.sparse_runtime.generate`, and a plain forward at its own length.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from kernels.pattern import kept_pairs, spans_at
from pipeline.io import read_json, write_json

PLAN_FORMAT = "moa-plan/1"
GRANULARITIES = ("kv_head", "head")
MODEL_FIELDS = ("name", "num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint")
MOA_RELEASE_SINK = 64
# The original MoA release's bare {"alphas", "betas"} files: per query head, sink 64, block 64; its spans include the
# sink, are rounded up to 64 and keep at least 128 tokens (see the module docstring for the conversion).
MOA_RELEASE_DEFAULTS = {"granularity": "head", "sink": MOA_RELEASE_SINK, "block_size": 64, "min_span": 64,
                        "span_multiple": 64, "span_offset": -MOA_RELEASE_SINK}


@dataclass
class Plan:
    """One ``(alpha, beta)`` rule per head and layer, plus the facts needed to check and reproduce it."""

    granularity: str
    sink: int
    min_span: int
    block_size: int
    alphas: list[list[float]]
    betas: list[list[float]]
    model: dict | None = None
    """``{name, num_layers, num_heads, num_kv_heads, head_dim, fingerprint}``; None only for a bare MoA file."""
    profile_lengths: list[int] = field(default_factory=list)
    density_budget: dict[int, float] = field(default_factory=dict)
    expected: dict[int, dict] = field(default_factory=dict)
    """``{N: {kv_density, attention_density, influence_loss}}``."""
    solver: dict = field(default_factory=dict)
    """``{name, status, objective, seconds}``."""
    created_with: dict = field(default_factory=dict)
    """``{config_hash, version}``."""
    span_multiple: int = 1
    """Round ``floor(alpha + beta * N)`` up to a multiple of this before the clamp (1: no rounding)."""
    span_offset: int = 0
    """Tokens added to the rounded ``floor(alpha + beta * N)`` before the clamp (see :mod:`kernels.pattern`)."""
    imported_from: dict | None = None
    """How the plan was converted from another format (None: made here)."""
    format: str = PLAN_FORMAT

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"plan granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.sink < 0 or self.min_span < 1 or self.block_size < 1 or self.span_multiple < 1:
            raise ValueError(
                f"plan needs sink >= 0, min_span >= 1, block_size >= 1 and span_multiple >= 1 (got sink={self.sink}, "
                f"min_span={self.min_span}, block_size={self.block_size}, span_multiple={self.span_multiple})"
            )
        shape = _table_shape(self.alphas, "alphas")
        if _table_shape(self.betas, "betas") != shape:
            raise ValueError(f"plan alphas and betas differ in shape: {shape} vs {_table_shape(self.betas, 'betas')}")

    @property
    def num_layers(self) -> int:
        return len(self.alphas)

    @property
    def num_plan_heads(self) -> int:
        """Heads per layer as the plan counts them: KV heads or query heads, by granularity."""
        return len(self.alphas[0])

    @classmethod
    def uniform(cls, model, span_fraction: float, *, sink: int = 64, min_span: int = 64, block_size: int = 64,
                granularity: str = "kv_head", lengths=()) -> Plan:
        """The baseline plan giving every head span ``clamp(span_fraction * N, min_span, N)``.

        ``model`` is anything :func:`validate_plan` accepts; ``lengths`` fills ``expected`` with the plan's
        densities at those N (its influence loss is unknown, so recorded as None).
        """
        info = describe_model(model)
        heads = info["num_kv_heads"] if granularity == "kv_head" else info["num_heads"]
        plan = cls(
            granularity=granularity, sink=int(sink), min_span=int(min_span), block_size=int(block_size),
            alphas=[[0.0] * heads for _ in range(info["num_layers"])],
            betas=[[float(span_fraction)] * heads for _ in range(info["num_layers"])],
            model=info,
            profile_lengths=[int(n) for n in lengths],
            solver={"name": "uniform", "status": "fixed", "objective": None, "seconds": 0.0},
            created_with={"config_hash": None, "version": package_version()},
        )
        plan.expected = {
            int(n): {"kv_density": plan_kv_density(plan, n), "attention_density": plan_attention_density(plan, n),
                     "influence_loss": None}
            for n in lengths
        }
        return plan

    def to_dict(self) -> dict:
        """The ``plan.json`` object, fields in the documented order; ``span_multiple``, ``span_offset`` and
        ``imported_from`` only when set."""
        optional = {}  # fields written only when set, so plans without them keep their exact files
        if self.span_multiple != 1:
            optional["span_multiple"] = self.span_multiple
        if self.span_offset != 0:
            optional["span_offset"] = self.span_offset
        imported = {"imported_from": self.imported_from} if self.imported_from is not None else {}
        return {
            "format": self.format,
            "model": self.model,
            "granularity": self.granularity,
            "sink": self.sink,
            "min_span": self.min_span,
            "block_size": self.block_size,
            **optional,
            "alphas": self.alphas,
            "betas": self.betas,
            "profile_lengths": self.profile_lengths,
            "density_budget": {str(n): d for n, d in self.density_budget.items()},
            "expected": {str(n): e for n, e in self.expected.items()},
            "solver": self.solver,
            "created_with": self.created_with,
            **imported,
        }

    @classmethod
    def from_dict(cls, obj: dict, source: str = "plan") -> Plan:
        """Parse a ``moa-plan/1`` object, or a bare ``{"alphas", "betas"}`` object of the original MoA release."""
        if not isinstance(obj, dict) or "alphas" not in obj or "betas" not in obj:
            raise ValueError(f"{source}: not a plan (expected a JSON object with alphas and betas)")
        fmt = obj.get("format")
        if fmt is None:
            extra = sorted(set(obj) - {"alphas", "betas"})
            if extra:
                raise ValueError(f"{source}: no 'format' field, yet has {', '.join(extra)} besides alphas/betas")
            return from_moa_release(obj["alphas"], obj["betas"])
        if fmt != PLAN_FORMAT:
            raise ValueError(f"{source}: unsupported plan format {fmt!r} (expected {PLAN_FORMAT!r})")
        missing = [k for k in ("model", "granularity", "sink", "min_span", "block_size") if k not in obj]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        return cls(
            granularity=obj["granularity"], sink=int(obj["sink"]), min_span=int(obj["min_span"]),
            block_size=int(obj["block_size"]), alphas=_floats(obj["alphas"]), betas=_floats(obj["betas"]),
            model=_model_dict(obj["model"], source),
            profile_lengths=[int(n) for n in obj.get("profile_lengths", [])],
            density_budget={int(n): float(d) for n, d in obj.get("density_budget", {}).items()},
            expected={int(n): dict(e) for n, e in obj.get("expected", {}).items()},
            solver=dict(obj.get("solver", {})),
            created_with=dict(obj.get("created_with", {})),
            span_multiple=int(obj.get("span_multiple", 1)), span_offset=int(obj.get("span_offset", 0)),
            imported_from=None if obj.get("imported_from") is None else dict(obj["imported_from"]),
        )


def from_moa_release(alphas, betas) -> Plan:
    """A plan keeping, per head and at every ``N``, the KV tokens the original MoA release keeps for these rules.

    The release's span ``alpha + beta * N`` includes its 64 sink tokens and is rounded up to a multiple of 64,
    at least 128 tokens: ``span_offset=-64``, ``span_multiple=64`` and ``min_span=64`` (module docstring).
    """
    return Plan(
        alphas=_floats(alphas), betas=_floats(betas), **MOA_RELEASE_DEFAULTS,
        imported_from={"format": "moa-release", "note": "S = ceil64(floor(alpha + beta * N)) - sink: the release's "
                       "span holds the sink; sink + S >= 128"},
    )


def save_plan(plan: Plan, path) -> None:
    """Write ``plan`` as JSON to ``path`` atomically."""
    write_json(path, plan.to_dict())


def load_plan(path, model=None) -> Plan:
    """Read a plan file (``moa-plan/1`` or the original MoA bare format); check it against ``model`` if given."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan file not found: {path}")
    try:
        obj = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"plan file {path} is not valid JSON: {err}") from None
    plan = Plan.from_dict(obj, source=f"plan file {path}")
    return plan if model is None else validate_plan(plan, model)


def describe_model(model) -> dict:
    """The plan's ``model`` record for a ModelInfo-like object, a ``LoadedModel`` or a Hugging Face model."""
    model = getattr(model, "info", model)
    if hasattr(model, "num_layers"):
        info = {k: getattr(model, k, None) for k in MODEL_FIELDS}
    elif hasattr(model, "config"):
        from pipeline.models import attention_shape

        cfg = model.config
        num_layers, heads, kv_heads, head_dim = attention_shape(cfg)
        info = {
            "name": getattr(cfg, "name_or_path", "") or getattr(cfg, "model_type", "model"),
            "num_layers": num_layers,
            "num_heads": heads,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "fingerprint": getattr(model, "fingerprint", None),
        }
    else:
        raise TypeError(f"cannot describe a {type(model).__name__}: expected a ModelInfo or a Hugging Face model")
    return info


def validate_plan(plan: Plan, model) -> Plan:
    """Check ``plan`` against ``model``; raise ``ValueError`` naming the first mismatch.

    Returns the plan; a bare MoA-release plan (no model record) comes back with the model's record filled in, so
    its KV-head layout is known.
    """
    info = describe_model(model)
    name = info["name"]
    if plan.model is not None:
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if plan.model.get(key) is not None and int(plan.model[key]) != int(info[key]):
                raise ValueError(
                    f"plan was made for model {plan.model.get('name')!r} with {key}={plan.model[key]}, "
                    f"but model {name!r} has {key}={info[key]}"
                )
        planned, actual = plan.model.get("fingerprint"), info["fingerprint"]
        if planned and actual and planned != actual:
            raise ValueError(
                f"plan was made for model {plan.model.get('name')!r} with fingerprint {planned}, but model {name!r} "
                f"has fingerprint {actual}: the weights differ; re-run the optimize stage for this model"
            )
    if plan.num_layers != info["num_layers"]:
        raise ValueError(f"plan has {plan.num_layers} layers, but model {name!r} has {info['num_layers']}")
    expected_heads = info["num_kv_heads"] if plan.granularity == "kv_head" else info["num_heads"]
    if plan.num_plan_heads != expected_heads:
        raise ValueError(
            f"plan has {plan.num_plan_heads} heads per layer, but model {name!r} has {expected_heads} "
            f"{'KV' if plan.granularity == 'kv_head' else 'query'} heads ({plan.granularity} granularity)"
        )
    if info["num_heads"] % info["num_kv_heads"]:
        raise ValueError(f"model {name!r}: {info['num_heads']} query heads are not a multiple of {info['num_kv_heads']}")
    return plan if plan.model is not None else dataclasses.replace(plan, model=info)


def spans_for(plan: Plan, layer: int, n: int) -> torch.Tensor:
    """Per-query-head spans ``[Hq]`` (int64) of ``layer`` at length ``n``; KV-head rules are repeated per group."""
    spans = _plan_spans(plan, layer, n)
    if plan.granularity == "kv_head":
        spans = spans.repeat_interleave(_group(plan))  # (Hq,)
    return spans


def kv_spans_for(plan: Plan, layer: int, n: int) -> torch.Tensor:
    """Per-KV-head spans ``[Hkv]`` (int64) that size the cache: with per-query-head rules, the group's largest."""
    return _kv_spans(plan, _plan_spans(plan, layer, n))


def plan_kv_density(plan: Plan, n: int) -> float:
    """KV density at ``n``, what the per-head cache allocates over a dense cache: the mean over layers and KV heads
    of ``min(sink + S_kv(n), n) / n``, ``S_kv`` the largest span of the KV head's query-head group."""
    spans = _kv_spans(plan, _all_spans(plan, n))  # (L, Hkv)
    return float(((spans + plan.sink).clamp(max=n).double() / n).mean())


def plan_attention_density(plan: Plan, n: int) -> float:
    """Attention density at ``n``: kept pairs over causal pairs, averaged over the plan's heads and layers."""
    spans = _all_spans(plan, n).flatten().tolist()
    causal = n * (n + 1) / 2
    return sum(kept_pairs(n, s, plan.sink) for s in spans) / (causal * len(spans))


def package_version() -> str:
    """The installed ``moa-autotune`` version, or ``"unknown"`` when running from an uninstalled checkout."""
    try:
        return metadata.version("moa-autotune")
    except metadata.PackageNotFoundError:
        return "unknown"


def _plan_spans(plan: Plan, layer: int, n: int) -> torch.Tensor:
    if not 0 <= layer < plan.num_layers:
        raise IndexError(f"layer {layer} out of range for a plan with {plan.num_layers} layers")
    return spans_at(plan.alphas[layer], plan.betas[layer], n, plan.min_span, plan.span_multiple, plan.span_offset)


def _all_spans(plan: Plan, n: int) -> torch.Tensor:
    return spans_at(plan.alphas, plan.betas, n, plan.min_span, plan.span_multiple, plan.span_offset)  # (L, H)


def _kv_spans(plan: Plan, spans: torch.Tensor) -> torch.Tensor:
    """Plan-head spans ``(..., H)`` -> per-KV-head spans ``(..., Hkv)``: a group's largest at ``head`` granularity."""
    if plan.granularity == "head":
        spans = spans.unflatten(-1, (-1, _group(plan))).amax(dim=-1)  # (..., Hkv)
    return spans


def _group(plan: Plan) -> int:
    if plan.model is None:
        raise ValueError("a bare MoA-release plan has no model record: load or validate it against a model first")
    return int(plan.model["num_heads"]) // int(plan.model["num_kv_heads"])


def _table_shape(table, name: str) -> tuple[int, int]:
    if not table or not all(isinstance(row, list) and row for row in table):
        raise ValueError(f"plan {name} must be a non-empty [layer][head] array")
    widths = {len(row) for row in table}
    if len(widths) != 1:
        raise ValueError(f"plan {name} rows differ in length: {sorted(widths)}")
    return len(table), widths.pop()


def _floats(table) -> list[list[float]]:
    try:
        rows = [[float(x) for x in row] for row in table]
    except (TypeError, ValueError):
        raise ValueError("plan alphas/betas must be [layer][head] arrays of numbers") from None
    if not all(math.isfinite(x) for row in rows for x in row):
        raise ValueError("plan alphas/betas must be finite numbers")
    return rows


def _model_dict(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: 'model' must be an object with {', '.join(MODEL_FIELDS)}")
    missing = [k for k in MODEL_FIELDS if k not in obj]
    if missing:
        raise ValueError(f"{source}: model record lacks {', '.join(missing)}")
    return {k: obj[k] for k in MODEL_FIELDS}
