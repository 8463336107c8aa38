"""Attach a :class:`~pipeline.adapters.composition.Composition` to a Hugging Face decoder and take it off again.

Nothing in transformers is edited; per adapted decoder layer, :func:`attach_adapters` adds

- a forward hook on ``input_layernorm`` that runs the layer's router once on the normalised hidden state and
  keeps the weights ``[B, T, E]`` on the layer's :class:`RoutingState` (cleared when the layer's forward ends);
- an :class:`AdaptedLinear` in place of each targeted projection (``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``), holding the layer's LoRA and (IA)^3 experts for it;
- a forward hook on ``mlp`` adding the parallel adapters (from the MLP input) to the MLP output;
- a forward hook on ``self_attn`` (with kwargs, for ``hidden_states`` and ``position_embeddings``) adding the
  gated prompt attention, through ``o_proj``, to the attention output.

Expert ``e`` of a layer is the ``e``-th of :meth:`Composition.expanded` and gets router weight ``w[..., e]``.
The base model's parameters are frozen; the :class:`AdapterSet` (``model.moa_adapters``, a registered
submodule so ``model.to``/``train``/``eval`` reach it) holds every adapter parameter. :func:`detach_adapters`
puts back the original projection modules, removes every hook and restores ``requires_grad``, so the model
computes exactly what it computed before.

The sparse-attention runtime (:mod:`pipeline.sparse_runtime`) works unchanged with adapters attached: it only
swaps the attention function, and the prompt attention is a separate softmax outside the sequence (see
:class:`~pipeline.adapters.experts.GatedPromptExpert`).

An adapted model's ``state_dict`` gains the adapters and a ``base_layer`` level under each wrapped projection;
:func:`base_fingerprint` gives the fingerprint of the model as it is without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapters.composition import (
    ATTENTION_TARGETS,
    LORA_TARGETS,
    Composition,
    projection_name,
    validate_composition,
)
from pipeline.adapters.experts import GatedPromptExpert, IA3Expert, LoRAExpert, ParallelAdapter, layer_queries
from pipeline.adapters.routers import make_router

ATTRIBUTE = "moa_adapters"


class RoutingState:
    """The router weights ``[B, T, E]`` of the decoder layer being run; None outside its forward.

    It also keeps the per-rank LoRA gates made from those weights (:meth:`gate`), so the projections of one layer
    whose LoRA experts have the same ranks and scalings share one gate per forward; setting ``weights`` drops them.
    """

    def __init__(self):
        self._weights: torch.Tensor | None = None
        self._gates: dict = {}

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value
        self._gates = {}

    def gate(self, key, make) -> torch.Tensor:
        """The gate ``make()`` builds from the current weights, built once per ``key`` and forward."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = make()
        return gate

    def weights_for(self, x: torch.Tensor, where: str) -> torch.Tensor:
        w = self.weights
        if w is None or w.shape[:-1] != x.shape[:-1]:
            got = "none" if w is None else tuple(w.shape[:-1])
            raise ValueError(f"{where}: no router weights for input of shape {tuple(x.shape[:-1])} (have {got}); "
                             "adapted modules run only inside their decoder layer's forward")
        return w


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus routed LoRA and (IA)^3 experts: ``y = base(x') + sum_e w_e * delta_e(x)``.

    With ``scale_input`` (``down_proj``), (IA)^3 experts scale the input, ``x' = x * (1 + sum_e w_e (l_e - 1))``;
    otherwise ``x' = x`` and they add ``w_e (l_e - 1) * base(x)`` to the output. LoRA experts always see the
    unscaled input. ``experts`` are ``(router index, module)`` pairs, referenced, not registered: they belong to
    the :class:`AdapterSet`.
    """

    def __init__(self, base_layer: nn.Linear, experts: list[tuple[int, nn.Module]], routing: RoutingState,
                 name: str, *, scale_input: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.scale_input = scale_input
        self._experts = list(experts)
        self._routing = routing
        self._ia3 = [(e, m) for e, m in self._experts if isinstance(m, IA3Expert)]
        lora = [(e, m) for e, m in self._experts if isinstance(m, LoRAExpert)]
        self._lora = _RoutedLoRA(lora, routing) if lora else None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        """``bias=False`` drops the base bias (the prompt path uses ``o_proj`` as a linear map)."""
        w = self._routing.weights_for(x, self.name)  # (B, T, E)
        ia3 = self._ia3
        x_in = x
        if ia3 and self.scale_input:
            x_in = x + sum(w[..., e:e + 1] * m(x) for e, m in ia3).to(x.dtype)
        y = F.linear(x_in, self.base_layer.weight, self.base_layer.bias if bias else None)
        delta = [w[..., e:e + 1] * m(y) for e, m in ia3] if ia3 and not self.scale_input else []
        if self._lora is not None:
            delta.append(self._lora(x, w))
        return y + sum(delta).to(y.dtype) if delta else y

    def extra_repr(self) -> str:
        return f"{self.name}, experts={[e for e, _ in self._experts]}, scale_input={self.scale_input}"


class _RoutedLoRA:
    """``sum_e w_e * B_e(A_e(x)) * scaling_e`` over one projection's LoRA experts, as two matmuls over their stacked
    ranks rather than two per expert (a MoE-LoRA layer holds eight): ``A = [A_1; ...; A_E]`` ``[R, in]``,
    ``B = [B_1 ... B_E]`` ``[out, R]`` and a per-rank gate ``w_e * scaling_e``. Experts whose dropout is active
    take the per-expert path, each with its own mask.

    Without autograd (scoring, decoding) the stacked weights are kept between calls and rebuilt only when a weight
    changes: every in-place update (an optimiser step, ``load_state_dict``) bumps the tensor's version counter,
    and the cache is keyed on those counters. With autograd the stack is rebuilt on every call, so gradients reach
    each expert's own weights.

    A decode step calls this for every adapted projection, so the per-call Python work is kept small: the expert
    weights (the ``Parameter`` objects, which moving or loading the adapters updates in place) and the experts
    with a dropout are listed once, and the gate ``w[..., index] * scaling`` comes from the layer's
    :class:`RoutingState`, shared by its projections with the same experts."""

    def __init__(self, lora: list[tuple[int, LoRAExpert]], routing: RoutingState):
        self.experts = lora
        self._routing = routing
        ranks = [m.A.out_features for _, m in lora]
        experts = [e for e, _ in lora]
        scalings = [float(m.scaling) for _, m in lora]
        self.router_index = torch.repeat_interleave(torch.tensor(experts), torch.tensor(ranks))  # (R,)
        self.scaling = torch.repeat_interleave(torch.tensor(scalings), torch.tensor(ranks))  # (R,)
        self._gate_key = (tuple(experts), tuple(ranks), tuple(scalings))
        self._on_device: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
        self._weights = [t for _, m in lora for t in (m.A.weight, m.B.weight)]
        self._with_dropout = [m for _, m in lora if not isinstance(m.dropout, nn.Identity)]
        self._stacked: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x (B, T, in), w (B, T, E) -> (B, T, out)
        if any(m.training for m in self._with_dropout):
            return sum(w[..., e:e + 1] * m(x) for e, m in self.experts)
        a, b = self._stacked_weights()  # (R, in), (out, R)
        gate = self._routing.gate(self._gate_key, lambda: self._gate(w))  # (B, T, R)
        h = F.linear(x.to(a.dtype), a)  # (B, T, R)
        return F.linear(h * gate.to(h.dtype), b)

    def _gate(self, w: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, R)
        if self._on_device is None or self._on_device[0] != w.device:
            self._on_device = (w.device, self.router_index.to(w.device), self.scaling.to(w.device))
        _, index, scaling = self._on_device
        return w.index_select(-1, index) * scaling

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self._weights
        if torch.is_grad_enabled() and any(t.requires_grad for t in weights):
            self._stacked = None
            return self._stack()
        key = tuple((t.data_ptr(), t._version) for t in weights)
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, *self._stack())
        return self._stacked[1], self._stacked[2]

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat(self._weights[0::2])  # (R, in)
        b = torch.cat(self._weights[1::2], dim=1)  # (out, R)
        return a, b


class LayerAdapters(nn.Module):
    """One decoder layer's router and experts, and the hooks that apply them."""

    def __init__(self, composition: Composition, layer: nn.Module):
        super().__init__()
        specs = composition.expanded()
        attn = layer.self_attn
        hidden = _linear(attn, "q_proj").in_features
        self.router = make_router(composition.router, hidden, len(specs))
        experts = []
        for spec in specs:
            if spec.kind == "lora":
                experts.append(nn.ModuleDict({
                    t: LoRAExpert(target_linear(layer, t).in_features, target_linear(layer, t).out_features,
                                  spec.size, spec.alpha, spec.dropout)
                    for t in spec.targets
                }))
            elif spec.kind == "ia3":
                experts.append(nn.ModuleDict({t: IA3Expert(_ia3_features(layer, t)) for t in spec.targets}))
            elif spec.kind == "parallel":
                experts.append(ParallelAdapter(hidden, spec.size, spec.dropout))
            else:
                num_heads = _linear(attn, "q_proj").out_features // attn.head_dim
                experts.append(GatedPromptExpert(spec.size, hidden, num_heads))
        self.experts = nn.ModuleList(experts)
        self.routing = RoutingState()

    def of_type(self, cls) -> list[tuple[int, nn.Module]]:
        return [(e, m) for e, m in enumerate(self.experts) if isinstance(m, cls)]

    def for_target(self, target: str) -> list[tuple[int, nn.Module]]:
        """``(router index, module)`` of every LoRA/(IA)^3 expert acting on ``target``."""
        return [(e, m[target]) for e, m in enumerate(self.experts) if isinstance(m, nn.ModuleDict) and target in m]

    def route_hook(self, module, args, output) -> None:  # on input_layernorm: output is (B, T, hidden)
        self.routing.weights = self.router(output)

    def clear_hook(self, module, args, output) -> None:  # on the decoder layer, always called
        self.routing.weights = None

    def mlp_hook(self, module, args, output):
        x = args[0]  # (B, T, hidden)
        w = self.routing.weights_for(x, "mlp")
        delta = sum(w[..., e:e + 1] * m(x) for e, m in self.of_type(ParallelAdapter))
        return output + delta.to(output.dtype)

    def attn_hook(self, module, args, kwargs, output):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, hidden)
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        w = self.routing.weights_for(hidden_states, "self_attn")
        queries = layer_queries(module, hidden_states, position_embeddings)  # (B, Hq, T, D)
        prompt = sum(w[..., e].unsqueeze(1).unsqueeze(-1) * m(module, queries)  # (B, 1, T, 1) * (B, Hq, T, D)
                     for e, m in self.of_type(GatedPromptExpert))
        b, t, _ = hidden_states.shape
        prompt = prompt.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)  # (B, T, Hq * D)
        o_proj = module.o_proj
        delta = o_proj(prompt, bias=False) if isinstance(o_proj, AdaptedLinear) else F.linear(prompt, o_proj.weight)
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta


@dataclass
class _Installed:
    hooks: list = field(default_factory=list)
    replaced: list = field(default_factory=list)  # (parent, attribute, original module)
    requires_grad: list = field(default_factory=list)  # (parameter, flag before attach)


class AdapterSet(nn.Module):
    """Every adapter parameter of one attached composition: ``layers[str(i)]`` for decoder layer ``i``."""

    def __init__(self, composition: Composition, layers: dict[int, nn.Module]):
        super().__init__()
        self.composition = composition
        self.layers = nn.ModuleDict({str(i): LayerAdapters(composition, layer) for i, layer in layers.items()})
        self._installed: _Installed | None = None

    @property
    def layer_indices(self) -> list[int]:
        return [int(i) for i in self.layers]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """``{"load_balance", "entropy"}`` of the last forward averaged over adapted layers; empty if nothing is
        routed (router ``none`` or one expert) or before the first forward."""
        per_layer = [la.router.aux_losses() for la in self.layers.values()]
        per_layer = [losses for losses in per_layer if losses]
        if not per_layer:
            return {}
        return {name: torch.stack([losses[name] for losses in per_layer]).mean() for name in per_layer[0]}

    def weighted_aux_loss(self) -> torch.Tensor:
        """``load_balance_weight * load_balance + entropy_weight * entropy`` (0-dim; 0 if nothing is routed).

        A positive ``entropy_weight`` penalises routing entropy, pushing tokens towards fewer experts."""
        spec = self.composition.router
        total = torch.zeros((), device=_device_of(self))
        losses = self.aux_losses()
        for name, weight in (("load_balance", spec.load_balance_weight), ("entropy", spec.entropy_weight)):
            if weight and name in losses:
                total = total + weight * losses[name]
        return total

    def router_stats(self) -> dict[str, float]:
        """Router statistics of the last forward (see :mod:`pipeline.adapters.routers`) averaged over layers, plus
        the aux losses as floats; empty before the first forward."""
        per_layer = []
        for la in self.layers.values():
            stats = la.router.stats()
            if stats:
                stats.update({name: float(loss.detach()) for name, loss in la.router.aux_losses().items()})
                per_layer.append(stats)
        if not per_layer:
            return {}
        return {name: sum(s[name] for s in per_layer) / len(per_layer) for name in per_layer[0]}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Llama/Mistral/Qwen2/Qwen3-style model (``model.model.layers`` or ``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
            isinstance(getattr(layer, name, None), nn.Module)
            for layer in layers for name in ("self_attn", "mlp", "input_layernorm")
        ):
            return list(layers)
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}: expected model.model.layers whose "
                     "layers have self_attn, mlp and input_layernorm (Llama/Mistral/Qwen2/Qwen3 layout)")


def attach_adapters(model: nn.Module, composition: Composition, *, seed: int = 0) -> AdapterSet:
    """Validate ``composition`` against ``model``, freeze the model, and attach fresh adapters (seeded by ``seed``,
    leaving the global RNG as it was) on the model's device; returns them (also ``model.moa_adapters``).

    The adapters take the model's dtype, except that on a half-precision base (bfloat16, float16) they stay in
    float32, as peft's ``autocast_adapter_dtype`` does: the frozen base computes in half precision, while the
    trained weights and their optimiser updates keep full precision (see :func:`adapter_dtype`)."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError("adapters are already attached to this model; detach_adapters(model) first")
    validate_composition(composition, model)
    layers = decoder_layers(model)
    first, last = composition.layers if composition.layers is not None else (0, len(layers))
    reference = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter_set = AdapterSet(composition, {i: layers[i] for i in range(first, last)})
    adapter_set.to(device=reference.device, dtype=adapter_dtype(reference.dtype))
    _install(model, adapter_set)
    return adapter_set


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapters are kept in on a base model of ``base_dtype``: float32 for a half-precision base."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


def detach_adapters(model: nn.Module) -> None:
    """Undo :func:`attach_adapters`: original modules back, hooks removed, ``requires_grad`` as before."""
    if not isinstance(getattr(model, ATTRIBUTE, None), AdapterSet):
        raise ValueError("no adapters are attached to this model")
    _uninstall(model)


@contextmanager
def adapters_detached(model: nn.Module) -> Iterator[AdapterSet | None]:
    """Run a block on the model without its adapters (if any), then put the same adapters back."""
    adapter_set = getattr(model, ATTRIBUTE, None)
    if adapter_set is None:
        yield None
        return
    _uninstall(model)
    try:
        yield adapter_set
    finally:
        _install(model, adapter_set)


def base_fingerprint(model: nn.Module) -> str:
    """:func:`pipeline.models.fingerprint` of the model without its adapters (equal to the unadapted model's).

    ``pipeline.models`` is imported here, not at the top: the rest of the library needs nothing of the pipeline."""
    from pipeline.models import fingerprint

    with adapters_detached(model):
        return fingerprint(model)


def _install(model: nn.Module, adapter_set: AdapterSet) -> None:
    installed = _Installed(requires_grad=[(p, p.requires_grad) for p in model.parameters()])
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    for index, la in zip(adapter_set.layer_indices, adapter_set.layers.values(), strict=True):
        layer = layers[index]
        installed.hooks.append(layer.input_layernorm.register_forward_hook(la.route_hook))
        installed.hooks.append(layer.register_forward_hook(la.clear_hook, always_call=True))
        if la.of_type(ParallelAdapter):
            installed.hooks.append(layer.mlp.register_forward_hook(la.mlp_hook))
        if la.of_type(GatedPromptExpert):
            installed.hooks.append(layer.self_attn.register_forward_hook(la.attn_hook, with_kwargs=True))
        for target in LORA_TARGETS:
            experts = la.for_target(target)
            if not experts:
                continue
            parent, name = _parent(layer, target), projection_name(target)
            original = getattr(parent, name)
            wrapper = AdaptedLinear(original, experts, la.routing, f"layer {index} {name}", scale_input=target == "down")
            setattr(parent, name, wrapper)
            installed.replaced.append((parent, name, original))
    setattr(model, ATTRIBUTE, adapter_set)
    adapter_set._installed = installed


def _uninstall(model: nn.Module) -> None:
    adapter_set = getattr(model, ATTRIBUTE)
    installed = adapter_set._installed
    for handle in installed.hooks:
        handle.remove()
    for parent, name, original in reversed(installed.replaced):
        setattr(parent, name, original)
    for p, flag in installed.requires_grad:
        p.requires_grad_(flag)
    for la in adapter_set.layers.values():
        la.routing.weights = None
    delattr(model, ATTRIBUTE)
    adapter_set._installed = None


def _parent(layer: nn.Module, target: str) -> nn.Module:
    return layer.self_attn if target in ATTENTION_TARGETS else layer.mlp


def _linear(parent: nn.Module, name: str) -> nn.Linear:
    module = getattr(parent, name)
    return getattr(module, "base_layer", module)


def target_linear(layer: nn.Module, target: str) -> nn.Linear:
    """The base ``nn.Linear`` a target (``"q"``, ..., ``"down"``) names in a decoder layer, adapted or not."""
    return _linear(_parent(layer, target), projection_name(target))


def _ia3_features(layer: nn.Module, target: str) -> int:
    """(IA)^3 scales ``k``/``v`` outputs and the ``down_proj`` input."""
    linear = target_linear(layer, target)
    return linear.in_features if target == "down" else linear.out_features


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device
