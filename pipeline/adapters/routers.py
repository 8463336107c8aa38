"""Token-level routers: one per adapted layer, mapping the layer's normalised hidden state to expert weights.

Input: the output of the decoder layer's ``input_layernorm``, ``x [B, T, hidden]``. Output: ``w [B, T, E]``, the
weight each of the layer's ``E`` experts gets at each token. Logits come from ``Linear(hidden, E)`` or, with
``RouterSpec.hidden > 0``, a SwiGLU ``down(SiLU(gate(x)) * up(x))``.

- ``none``: every weight 1 (no parameters);
- ``soft``: ``sigmoid(logits)`` per expert, independently;
- ``topk``: ``softmax(logits)``, the ``top_k`` largest kept and renormalised (the MoE-LoRA baseline);
- ``sparse``: AdaMoLE's trainable threshold. ``p = softmax(logits)``, ``thr = cap / E * sigmoid(h(x))`` with
  ``h = Linear(hidden, 1)``, ``w = (p - thr) * [p >= thr]``, renormalised. ``thr <= 1/E <= max p``, so at least
  one expert is always active, and the threshold gets gradient through ``p - thr``.

Each router keeps the weights of its last forward (with their graph) for the auxiliary losses and statistics,
computed over every token of that forward (padding included: routers do not see the attention mask):

- ``load_balance`` (:func:`load_balance_loss`): ``E * sum_e f_e * P_e``, Switch-style. ``P_e`` is expert ``e``'s
  mean normalised weight and ``f_e`` its share of the active (token, expert) pairs, so ``sum_e f_e = 1``: with
  one active expert per token this is Switch's fraction of tokens, and perfectly uniform routing gives 1. Where
  every expert is always active (``soft``, ``none``) ``f_e = 1/E`` and the loss is the constant 1.
- ``entropy`` (:func:`routing_entropy`): mean per-token entropy of the normalised weights (``log E`` if uniform).
- statistics: ``specialisation``, the mean over tokens of the (population) standard deviation across experts of
  the weights as applied; ``active_experts``, the mean count of experts with weight > 0; for ``sparse`` also the
  mean ``threshold``.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapters.composition import RouterSpec

EPS = 1e-9


class SwiGLU(nn.Module):
    """``down(SiLU(gate(x)) * up(x))``: ``hidden -> width -> out``."""

    def __init__(self, hidden: int, width: int, out: int):
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Router(nn.Module, abc.ABC):
    """Base class: ``forward(x [B, T, hidden]) -> w [B, T, E]`` (fp32); remembers the last weights. Subclasses
    define :meth:`weights`."""

    def __init__(self, spec: RouterSpec, hidden: int, num_experts: int):
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        self.last_weights: torch.Tensor | None = None
        self.last_threshold: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, hidden) -> (B, T, E), fp32
        return self.head(x.to(_dtype_of(self.head))).float()

    @abc.abstractmethod
    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token expert weights ``[B, T, E]`` of ``x`` ``[B, T, hidden]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(x)
        self.last_weights = w
        return w

    @property
    def routes(self) -> bool:
        """Whether the router has anything to balance: a learned router over more than one expert."""
        return self.num_experts > 1 and self.spec.kind != "none"

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """``{"load_balance", "entropy"}`` of the last forward; empty before any forward or if nothing is routed."""
        if self.last_weights is None or not self.routes:
            return {}
        return {"load_balance": load_balance_loss(self.last_weights), "entropy": routing_entropy(self.last_weights)}

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Routing statistics of the last forward (see the module docstring); empty before any forward."""
        if self.last_weights is None:
            return {}
        w = self.last_weights.detach().float().reshape(-1, self.num_experts)  # (tokens, E)
        stats = {
            "specialisation": float(w.std(dim=-1, correction=0).mean()),
            "active_experts": float((w > 0).sum(-1).float().mean()),
        }
        if self.last_threshold is not None:
            stats["threshold"] = float(self.last_threshold.detach().float().mean())
        return stats


class NoRouter(Router):
    """Every expert gets weight 1 at every token."""

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(*x.shape[:-1], self.num_experts, dtype=torch.float32)


class SoftRouter(Router):
    """Independent gates ``sigmoid(logits)`` in (0, 1)."""

    def __init__(self, spec: RouterSpec, hidden: int, num_experts: int):
        super().__init__(spec, hidden, num_experts)
        self.head = _logit_head(spec, hidden, num_experts)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class TopKRouter(Router):
    """``softmax(logits)`` restricted to the ``top_k`` largest per token and renormalised."""

    def __init__(self, spec: RouterSpec, hidden: int, num_experts: int):
        super().__init__(spec, hidden, num_experts)
        self.head = _logit_head(spec, hidden, num_experts)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.logits(x), dim=-1)
        top, index = p.topk(self.spec.top_k, dim=-1)
        return torch.zeros_like(p).scatter(-1, index, top / top.sum(-1, keepdim=True))


class SparseRouter(Router):
    """AdaMoLE: experts whose probability clears a learned per-token threshold, weighted by the excess."""

    def __init__(self, spec: RouterSpec, hidden: int, num_experts: int):
        super().__init__(spec, hidden, num_experts)
        self.head = _logit_head(spec, hidden, num_experts)
        self.threshold_head = nn.Linear(hidden, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.logits(x), dim=-1)  # (B, T, E)
        head = self.threshold_head(x.to(self.threshold_head.weight.dtype)).float()
        thr = self.spec.threshold_cap / self.num_experts * torch.sigmoid(head)  # (B, T, 1)
        self.last_threshold = thr
        w = (p - thr) * (p >= thr)
        return w / (w.sum(-1, keepdim=True) + EPS)


ROUTERS = {"none": NoRouter, "soft": SoftRouter, "topk": TopKRouter, "sparse": SparseRouter}


def make_router(spec: RouterSpec, hidden: int, num_experts: int) -> Router:
    """The router ``spec`` describes, over ``num_experts`` experts of a ``hidden``-wide layer."""
    return ROUTERS[spec.kind](spec, hidden, num_experts)


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """Per-token weights scaled to sum to 1 over the experts (last dim)."""
    return weights / (weights.sum(-1, keepdim=True) + EPS)


def load_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Switch-style ``E * sum_e f_e * P_e`` over all tokens of ``weights [..., E]`` (1 when perfectly uniform).

    ``f_e``: expert ``e``'s share of the active (weight > 0) token-expert pairs (no gradient); ``P_e``: its mean
    normalised weight (differentiable)."""
    num_experts = weights.shape[-1]
    flat = weights.reshape(-1, num_experts)
    active = (flat > 0).float().sum(0)  # (E,)
    share = active / active.sum().clamp_min(1.0)
    mean_weight = normalised(flat).mean(0)  # (E,)
    return num_experts * (share * mean_weight).sum()


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of the normalised weights ``[..., E]`` (``0 log 0 = 0``; ``log E`` if uniform)."""
    p = normalised(weights.reshape(-1, weights.shape[-1]))
    return -(p * torch.log(p.clamp_min(EPS))).sum(-1).mean()


def _logit_head(spec: RouterSpec, hidden: int, num_experts: int) -> nn.Module:
    return SwiGLU(hidden, spec.hidden, num_experts) if spec.hidden else nn.Linear(hidden, num_experts, bias=False)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
