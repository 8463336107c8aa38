"""What to attach: a :class:`Composition` of expert specs, one router spec and the adapted layer range.

Every adapted decoder layer gets the same experts, in composition order expanded by ``count`` (expert index ``e``
of the layer's router), and one token-level router over them. A composition is plain data: frozen dataclasses
that round-trip through JSON (:meth:`Composition.to_dict`, :func:`composition_from_dict`), so an Optuna trial,
a saved adapter and a results row all record the same thing.

Targets name projections by short names: ``q, k, v, o`` are ``self_attn.{q,k,v,o}_proj`` and ``gate, up, down``
are ``mlp.{gate,up,down}_proj``. LoRA experts add to the output of each target; (IA)^3 experts scale the output of
``k``/``v`` and the MLP intermediate (the input of ``down_proj``).

Defaults for ``targets``: LoRA ``("q", "v")``; an (IA)^3 spec left at that default gets the (IA)^3 paper's
``("k", "v", "down")``; parallel and prompt experts take none (the default is dropped for them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

EXPERT_KINDS = ("lora", "parallel", "prompt", "ia3")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
IA3_TARGETS = ("k", "v", "down")
ROUTER_KINDS = ("none", "soft", "sparse", "topk")
ATTENTION_TARGETS = ("q", "k", "v", "o")
"""Targets inside ``self_attn``; the others are inside ``mlp``."""
_DEFAULT_TARGETS = ("q", "v")


def projection_name(target: str) -> str:
    """``"q"`` -> ``"q_proj"``: the attribute the target names on ``self_attn`` or ``mlp``."""
    return f"{target}_proj"


@dataclass(frozen=True)
class ExpertSpec:
    """One kind of expert, present ``count`` times in every adapted layer."""

    kind: str
    """One of :data:`EXPERT_KINDS`."""
    size: int = 8
    """lora: rank; parallel: bottleneck width; prompt: prompt tokens per layer; ia3: ignored (must be >= 1)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is scaled by ``alpha / size``."""
    dropout: float = 0.0
    """Input dropout of lora and parallel experts."""
    targets: tuple[str, ...] = _DEFAULT_TARGETS
    """lora: a subset of :data:`LORA_TARGETS`; ia3: of :data:`IA3_TARGETS`; parallel, prompt: ``()``."""
    count: int = 1
    """Experts of this spec per adapted layer (a homogeneous MoE-LoRA is one lora spec with count 8)."""

    def __post_init__(self):
        targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        if targets == _DEFAULT_TARGETS and self.kind == "ia3":
            targets = IA3_TARGETS
        elif targets == _DEFAULT_TARGETS and self.kind in ("parallel", "prompt"):
            targets = ()
        object.__setattr__(self, "targets", targets)

    def label(self) -> str:
        targets = f"[{','.join(self.targets)}]" if self.targets else ""
        size = "" if self.kind == "ia3" else str(self.size)
        return f"{self.kind}{size}{targets}" + (f"x{self.count}" if self.count != 1 else "")


@dataclass(frozen=True)
class RouterSpec:
    """The token-level router of every adapted layer (see :mod:`pipeline.adapters.routers`)."""

    kind: str = "soft"
    """none: every weight 1; soft: sigmoid per expert; sparse: AdaMoLE threshold; topk: softmax top-k."""
    hidden: int = 0
    """0: linear router; > 0: SwiGLU router with this hidden width."""
    top_k: int = 2
    """Experts kept per token (topk only)."""
    threshold_cap: float = 1.0
    """sparse only: the per-token threshold is ``threshold_cap / E * sigmoid(linear(x))``; in (0, 1]."""
    load_balance_weight: float = 0.0
    entropy_weight: float = 0.0

    def label(self) -> str:
        name = f"top{self.top_k}" if self.kind == "topk" else self.kind
        return name + (f"-h{self.hidden}" if self.hidden else "")


@dataclass(frozen=True)
class Composition:
    """Experts, router and adapted layers: everything :func:`pipeline.adapters.attach_adapters` needs."""

    experts: tuple[ExpertSpec, ...]
    router: RouterSpec = field(default_factory=RouterSpec)
    layers: tuple[int, int] | None = None
    """Half-open ``[first, last)`` range of adapted decoder layers; None: all of them."""

    def __post_init__(self):
        if isinstance(self.experts, (list, tuple)):
            object.__setattr__(self, "experts", tuple(self.experts))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def num_experts(self) -> int:
        """Experts per adapted layer (the router's ``E``)."""
        return sum(spec.count for spec in self.experts)

    def expanded(self) -> list[ExpertSpec]:
        """The layer's experts in router order: composition order, each spec repeated ``count`` times."""
        return [spec for spec in self.experts for _ in range(spec.count)]

    def to_dict(self) -> dict:
        """JSON-safe; :func:`composition_from_dict` turns it back into an equal composition."""
        return {
            "experts": [{**asdict(spec), "targets": list(spec.targets)} for spec in self.experts],
            "router": asdict(self.router),
            "layers": None if self.layers is None else list(self.layers),
        }

    def label(self) -> str:
        """Short and human-readable, e.g. ``lora8[q,v]+parallel16+prompt4|sparse|L0-30``."""
        parts = ["+".join(spec.label() for spec in self.experts), self.router.label()]
        if self.layers is not None:
            parts.append(f"L{self.layers[0]}-{self.layers[1]}")
        return "|".join(parts)


def composition_from_dict(d: dict) -> Composition:
    """The composition a :meth:`Composition.to_dict` dict describes; ``ValueError`` on unknown keys or bad values.

    Missing keys take the dataclass defaults (``experts`` is required)."""
    if not isinstance(d, dict):
        raise ValueError(f"composition: expected a dict, got {type(d).__name__}")
    _check_keys(d, {"experts", "router", "layers"}, "composition")
    if "experts" not in d:
        raise ValueError("composition: missing key 'experts'")
    raw_experts = d["experts"]
    if not isinstance(raw_experts, (list, tuple)):
        raise ValueError(f"composition.experts: expected a list, got {type(raw_experts).__name__}")
    experts = tuple(_spec_from_dict(ExpertSpec, item, f"composition.experts[{i}]") for i, item in enumerate(raw_experts))
    router = _spec_from_dict(RouterSpec, d.get("router", {}), "composition.router")
    layers = d.get("layers")
    if layers is not None:
        if not (isinstance(layers, (list, tuple)) and len(layers) == 2 and all(_is_int(x) for x in layers)):
            raise ValueError(f"composition.layers: expected null or [first, last] integers, got {layers!r}")
        layers = (int(layers[0]), int(layers[1]))
    composition = Composition(experts=experts, router=router, layers=layers)
    validate_composition(composition)
    return composition


def validate_composition(comp: Composition, model=None) -> None:
    """Raise a one-line ``ValueError`` naming the first problem; with ``model``, also check it can host every expert.

    ``model`` is a Hugging Face decoder (Llama/Mistral/Qwen2/Qwen3 layout: ``model.model.layers``)."""
    if not isinstance(comp, Composition):
        raise ValueError(f"expected a Composition, got {type(comp).__name__}")
    if not comp.experts:
        raise ValueError("composition has no experts: give at least one ExpertSpec")
    for i, spec in enumerate(comp.experts):
        _validate_expert(spec, f"expert {i} ({spec.kind})" if isinstance(spec, ExpertSpec) else f"expert {i}")
    _validate_router(comp.router, comp.num_experts)
    if comp.layers is not None:
        if not (isinstance(comp.layers, tuple) and len(comp.layers) == 2 and all(_is_int(x) for x in comp.layers)):
            raise ValueError(f"layers must be None or a (first, last) pair of integers, got {comp.layers!r}")
        first, last = comp.layers
        if not 0 <= first < last:
            raise ValueError(f"layer range [{first}, {last}) is empty or negative: need 0 <= first < last")
    if model is not None:
        _validate_against_model(comp, model)


def _validate_expert(spec, where: str) -> None:
    if not isinstance(spec, ExpertSpec):
        raise ValueError(f"{where}: expected an ExpertSpec, got {type(spec).__name__}")
    if spec.kind not in EXPERT_KINDS:
        raise ValueError(f"{where}: unknown expert kind {spec.kind!r} (expected one of {', '.join(EXPERT_KINDS)})")
    name = {"lora": "rank", "parallel": "bottleneck", "prompt": "prompt tokens", "ia3": "size"}[spec.kind]
    if not _is_int(spec.size) or spec.size < 1:
        raise ValueError(f"{where}: {name} (size) must be an integer >= 1, got {spec.size!r}")
    if not _is_int(spec.count) or spec.count < 1:
        raise ValueError(f"{where}: count must be an integer >= 1, got {spec.count!r}")
    if not _is_number(spec.dropout) or not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {spec.dropout!r}")
    if not _is_number(spec.alpha) or spec.alpha <= 0:
        raise ValueError(f"{where}: alpha must be a number > 0, got {spec.alpha!r}")
    if not isinstance(spec.targets, tuple) or not all(isinstance(t, str) for t in spec.targets):
        raise ValueError(f"{where}: targets must be a tuple of names, got {spec.targets!r}")
    allowed = {"lora": LORA_TARGETS, "ia3": IA3_TARGETS}.get(spec.kind, ())
    if not allowed:
        if spec.targets:
            raise ValueError(f"{where}: {spec.kind} experts take no targets, got {list(spec.targets)}")
        return
    if not spec.targets:
        raise ValueError(f"{where}: targets is empty; choose from {', '.join(allowed)}")
    unknown = [t for t in spec.targets if t not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown target {unknown[0]!r} (expected a subset of {', '.join(allowed)})")
    if len(set(spec.targets)) != len(spec.targets):
        raise ValueError(f"{where}: targets repeat a name: {list(spec.targets)}")


def _validate_router(router, num_experts: int) -> None:
    if not isinstance(router, RouterSpec):
        raise ValueError(f"router: expected a RouterSpec, got {type(router).__name__}")
    if router.kind not in ROUTER_KINDS:
        raise ValueError(f"router: unknown kind {router.kind!r} (expected one of {', '.join(ROUTER_KINDS)})")
    if not _is_int(router.hidden) or router.hidden < 0:
        raise ValueError(f"router: hidden must be an integer >= 0 (0: linear router), got {router.hidden!r}")
    if router.kind == "topk" and (not _is_int(router.top_k) or not 1 <= router.top_k <= num_experts):
        raise ValueError(f"router: top_k must be in [1, {num_experts}] (the layer's experts), got {router.top_k!r}")
    if not _is_number(router.threshold_cap) or not 0.0 < router.threshold_cap <= 1.0:
        raise ValueError(f"router: threshold_cap must be in (0, 1], got {router.threshold_cap!r}")
    for name in ("load_balance_weight", "entropy_weight"):
        value = getattr(router, name)
        if not _is_number(value) or value < 0:
            raise ValueError(f"router: {name} must be a number >= 0, got {value!r}")


def _validate_against_model(comp: Composition, model) -> None:
    from pipeline.adapters.attach import decoder_layers  # attach imports this module

    layers = decoder_layers(model)
    first, last = comp.layers if comp.layers is not None else (0, len(layers))
    if last > len(layers):
        raise ValueError(f"layer range [{first}, {last}) is outside the model's {len(layers)} decoder layers")
    for index in range(first, last):
        layer = layers[index]
        for i, spec in enumerate(comp.experts):
            where = f"expert {i} ({spec.kind})"
            for target in spec.targets:
                parent_name = "self_attn" if target in ATTENTION_TARGETS else "mlp"
                _require_linear(layer, index, parent_name, projection_name(target), f"{where} target {target!r}")
            if spec.kind == "parallel":
                _require_linear(layer, index, "mlp", None, where)
            if spec.kind == "prompt":
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    _require_linear(layer, index, "self_attn", proj, where)
                attn = layer.self_attn
                head_dim = getattr(attn, "head_dim", None)
                if not _is_int(head_dim) or head_dim < 1 or not hasattr(attn, "num_key_value_groups"):
                    raise ValueError(f"{where}: layer {index} attention has no head_dim/num_key_value_groups to attend with")


def _require_linear(layer, index: int, parent_name: str, proj: str | None, where: str) -> None:
    import torch

    parent = getattr(layer, parent_name, None)
    if not isinstance(parent, torch.nn.Module):
        raise ValueError(f"{where}: decoder layer {index} has no {parent_name} module")
    if proj is None:
        return
    module = getattr(parent, proj, None)
    module = getattr(module, "base_layer", module)
    if not isinstance(module, torch.nn.Linear):
        has = sorted(name for name, child in parent.named_children() if isinstance(getattr(child, "base_layer", child), torch.nn.Linear))
        raise ValueError(f"{where}: layer {index} {parent_name} has no linear {proj} (it has: {', '.join(has) or 'none'})")


def _spec_from_dict(cls, item, where: str):
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a dict, got {type(item).__name__}")
    names = {f.name for f in fields(cls)}
    _check_keys(item, names, where)
    values = dict(item)
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.name == "kind":
            if not isinstance(value, str):
                raise ValueError(f"{where}.kind: expected a string, got {value!r}")
        elif f.name == "targets":
            if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{where}.targets: expected a list of names, got {value!r}")
            values[f.name] = tuple(value)
        elif f.type in ("int",):
            if not _is_int(value):
                raise ValueError(f"{where}.{f.name}: expected an integer, got {value!r}")
            values[f.name] = int(value)
        elif f.type in ("float",):
            if not _is_number(value):
                raise ValueError(f"{where}.{f.name}: expected a number, got {value!r}")
            values[f.name] = float(value)
    return cls(**values)


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
