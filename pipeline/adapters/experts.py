"""The adapter experts: small modules, each computing one expert's contribution for one decoder layer.

:mod:`pipeline.adapters.attach` places them in the model and weights each contribution per token by the layer's
router (:mod:`pipeline.adapters.routers`):

- :class:`LoRAExpert` adds ``B(A(x)) * alpha / rank`` to a projection's output;
- :class:`ParallelAdapter` adds ``up(SiLU(down(x)))`` of the MLP input to the MLP output;
- :class:`GatedPromptExpert` adds a gated attention over learned prompt keys to the attention output;
- :class:`IA3Expert` scales a projection's output (or the MLP intermediate) by a learned vector.

Every expert starts as a no-op (LoRA ``B``, the parallel up-projection and the prompt gate are zero, the (IA)^3
vector is one), so attaching adapters leaves the model's output unchanged until training moves them.

Why our own modules rather than peft's: a peft LoRA layer sums its active adapters with a fixed scale each and
exposes no per-token weight per adapter, which a token-level router needs; peft also has no parallel adapter and
no way to mix kinds in one layer. The math of each module follows peft's and torchtune's (``LoRAExpert`` equals
peft's ``LoraConfig(r, lora_alpha)`` layer given the same ``A`` and ``B``; tests/test_adapters_library.py checks
that against peft).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAExpert(nn.Module):
    """Low-rank update of one linear projection: ``delta(x) = B(A(dropout(x))) * alpha / rank``.

    Args:
        in_features, out_features: the adapted projection's shape.
        rank: inner width ``r`` of ``A: in -> r`` and ``B: r -> out``.
        alpha: scaling numerator; the update is scaled by ``alpha / rank`` (peft's ``lora_alpha``).
        dropout: dropout on the expert's input.

    ``A`` is kaiming-uniform (``a = sqrt(5)``, as peft and ``nn.Linear``) and ``B`` zero, so ``delta`` starts at 0.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x = x.to(self.A.weight.dtype)
        return self.B(self.A(self.dropout(x))) * self.scaling


class ParallelAdapter(nn.Module):
    """Bottleneck adapter beside the MLP: ``up(SiLU(down(dropout(x))))`` of the MLP input, added to its output.

    Args:
        hidden: the model width (MLP input and output).
        bottleneck: the adapter's inner width.
        dropout: dropout on the adapter's input.

    ``down`` is ``nn.Linear``'s default init; ``up`` (weight and bias) is zero, so the adapter starts at 0.
    """

    def __init__(self, hidden: int, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (..., hidden)
        x = x.to(self.down.weight.dtype)
        return self.up(F.silu(self.down(self.dropout(x))))


class GatedPromptExpert(nn.Module):
    """LLaMA-Adapter-style gated prompt attention for one decoder layer.

    The expert holds ``P`` learned prompt embeddings ``[P, hidden]`` and a per-head gate ``[num_heads]``. The
    prompt goes through the layer's *frozen* ``k_proj``/``v_proj`` (and ``k_norm`` where the attention module
    has one, as Qwen3) to ``P`` keys and values per KV head, with no rotary embedding: prompt keys have no
    position. The layer's queries (``q_proj``, ``q_norm`` if present, and rotary with the ``position_embeddings``
    the attention module received; see :func:`layer_queries`) attend over those ``P`` keys with their own
    softmax (fp32), and head ``h``'s result is multiplied by ``tanh(gate[h])``. :mod:`pipeline.adapters.attach`
    then passes the ``[B, heads, T, head_dim]`` result through the layer's ``o_proj`` (without its bias) and adds
    it to the attention module's output. GQA: each KV head's prompt keys and values serve its query group.

    Relation to sparse attention and the attention sink: the prompt attention is a separate softmax over keys
    that every query always sees, outside the sequence. It is independent of any sparse-attention plan and of
    the KV cache: the prompt never occupies sink positions or cache slots, and decoding one token attends to the
    same ``P`` prompt keys as prefill. In effect it is a learned, always-visible extra sink outside the sequence
    that costs ``P`` keys per layer and is not counted in a plan's KV density.

    The gate starts at zero, so the expert starts as a no-op (the prompt embeddings then get no gradient until
    the gate moves; the gate does). Prompt embeddings are standard normal, as peft's adaption prompt.
    """

    def __init__(self, num_prompt_tokens: int, hidden: int, num_heads: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(num_prompt_tokens, hidden))
        self.gate = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prompt)
        nn.init.zeros_(self.gate)

    def prompt_keys_values(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values through ``attn``'s frozen projections: each ``[H_kv, P, head_dim]``."""
        head_dim = attn.head_dim
        k_proj, v_proj = base_layer(attn.k_proj), base_layer(attn.v_proj)
        prompt = self.prompt.to(k_proj.weight.dtype)
        keys = k_proj(prompt).view(prompt.shape[0], -1, head_dim)  # (P, Hkv, D)
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None:
            keys = k_norm(keys)
        values = v_proj(prompt).view(prompt.shape[0], -1, head_dim)  # (P, Hkv, D)
        return keys.transpose(0, 1), values.transpose(0, 1)  # (Hkv, P, D)

    def forward(self, attn: nn.Module, queries: torch.Tensor) -> torch.Tensor:
        """Gated prompt attention of ``queries [B, Hq, T, D]`` (post-rotary); returns ``[B, Hq, T, D]`` in fp32."""
        keys, values = self.prompt_keys_values(attn)
        group = queries.shape[1] // keys.shape[0]
        keys = keys.repeat_interleave(group, dim=0).float()  # (Hq, P, D)
        values = values.repeat_interleave(group, dim=0).float()
        scores = torch.matmul(queries.float(), keys.transpose(-1, -2)) * attn.scaling  # (B, Hq, T, P)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, Hq, T, D)
        return out * torch.tanh(self.gate.float())[None, :, None, None]

    def extra_repr(self) -> str:
        return f"prompt_tokens={self.prompt.shape[0]}, hidden={self.prompt.shape[1]}, heads={self.gate.shape[0]}"


class IA3Expert(nn.Module):
    """(IA)^3 scaling: a learned vector ``l`` (init ones) over ``features``.

    Its contribution to an activation ``y`` is ``(l - 1) * y``, so with router weight ``w`` the activation becomes
    ``y * (1 + w * (l - 1))`` (``y * l`` at ``w = 1``, as in the (IA)^3 paper). Applied to the outputs of
    ``k_proj``/``v_proj`` and to the MLP intermediate (the input of ``down_proj``).
    """

    def __init__(self, features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # (..., features) -> (..., features)
        return (self.scale - 1) * y

    def extra_repr(self) -> str:
        return f"features={self.scale.shape[0]}"


def base_layer(module: nn.Module) -> nn.Module:
    """The frozen projection under an adapted one (``module.base_layer``), or ``module`` itself."""
    return getattr(module, "base_layer", module)


def layer_queries(attn: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The attention module's post-rotary queries ``[B, Hq, T, D]``, recomputed as its forward does.

    ``q_proj`` is called as attached (with its LoRA experts, if any), so prompt attention uses the same queries as
    the sequence's attention; then ``q_norm`` where present, then rotary with ``(cos, sin)``, each ``[B, T, D]``.
    """
    b, t, _ = hidden_states.shape
    queries = attn.q_proj(hidden_states).view(b, t, -1, attn.head_dim)  # (B, T, Hq, D)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:
        queries = q_norm(queries)
    queries = queries.transpose(1, 2)  # (B, Hq, T, D)
    cos, sin = (x.unsqueeze(1) for x in position_embeddings)  # (B, 1, T, D)
    return queries * cos + _rotate_half(queries) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
