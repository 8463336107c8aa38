"""The adapter library on tiny Llama/Mistral/Qwen2/Qwen3 models, against independent oracles.

- One shared tester runs a table of (model, composition) cases: at init the adapted model computes exactly what
  the base computes; once the zero-initialised parameters move, every adapter parameter gets a gradient and no
  base parameter does; detaching restores the model bit for bit.
- Oracles written here from the formulas: peft's LoRA (same A/B), a direct computation of every routed expert
  from the parameters, (IA)^3 folded into the base weights, and the gated prompt attention head by head with
  transformers' own rotary function.
- Routers and auxiliary losses against hand-computed values; the sparse router's threshold is trained.
- Adapters under a sparse-attention plan: forward, backward, and decoding through the per-head cache equals a
  greedy recomputation without cache.
"""

import copy
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ARCHS, make_tiny_model
from torch import nn

from pipeline.adapters import (
    AdapterSet,
    Composition,
    ExpertSpec,
    RouterSpec,
    attach_adapters,
    base_fingerprint,
    composition_from_dict,
    decoder_layers,
    detach_adapters,
    validate_composition,
)
from pipeline.adapters.attach import AdaptedLinear
from pipeline.adapters.experts import GatedPromptExpert, IA3Expert, LoRAExpert, ParallelAdapter
from pipeline.adapters.routers import load_balance_loss, make_router, routing_entropy
from pipeline.models import fingerprint

VOCAB = 300
ALL_LORA = ("q", "k", "v", "o", "gate", "up", "down")
HETEROGENEOUS = Composition(
    experts=(ExpertSpec("lora", size=4, alpha=8.0, targets=ALL_LORA), ExpertSpec("parallel", size=8),
             ExpertSpec("prompt", size=3), ExpertSpec("ia3", targets=("k", "v", "down"))),
    router=RouterSpec("soft"),
)


def tiny(arch="llama", **kwargs):
    """hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300 (see conftest.make_tiny_model)."""
    return make_tiny_model(arch, vocab=VOCAB, **kwargs)


def token_ids(batch=2, length=13, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(adapter_set: AdapterSet, seed=0, scale=0.2):
    """Move the zero-initialised parameters (LoRA B, parallel up, prompt gate, (IA)^3 scale) as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter_set.modules():
            params = {LoRAExpert: ["B.weight"], ParallelAdapter: ["up.weight", "up.bias"],
                      GatedPromptExpert: ["gate"], IA3Expert: ["scale"]}.get(type(module), [])
            for name in params:
                p = module.get_parameter(name)
                p.add_(torch.randn(p.shape, generator=g) * scale)


def lm_loss(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------- the shared tester over a case table

CASES = [(arch, "heterogeneous-soft", HETEROGENEOUS) for arch in TINY_ARCHS] + [
    ("llama", "moe-lora-top2", Composition((ExpertSpec("lora", 4, targets=("q", "v"), count=4),),
                                           RouterSpec("topk", top_k=2))),
    ("qwen3", "sparse-swiglu-layer1", Composition(
        (ExpertSpec("lora", 4, targets=("q", "o", "up")), ExpertSpec("prompt", 2), ExpertSpec("parallel", 4, count=2)),
        RouterSpec("sparse", hidden=16, threshold_cap=0.8), layers=(1, 2))),
    ("mistral", "single-lora-none", Composition((ExpertSpec("lora", 2, targets=("k", "down")),), RouterSpec("none"))),
    # Projections with different LoRA experts (q: the first, v: both, down: the second) in one layer: each needs
    # its own gate from the layer's router weights.
    ("llama", "two-lora-specs-soft", Composition(
        (ExpertSpec("lora", 2, targets=("q", "v")), ExpertSpec("lora", 3, alpha=5.0, targets=("v", "down"))),
        RouterSpec("soft"))),
]


@pytest.mark.parametrize(("arch", "name", "composition"), CASES, ids=[f"{a}-{n}" for a, n, _ in CASES])
def test_adapted_model(arch, name, composition):
    model = tiny(arch)
    ids = token_ids()
    keys_before = list(model.state_dict())
    with torch.no_grad():
        base = model(ids).logits
    adapters = attach_adapters(model, composition, seed=3)
    assert model.moa_adapters is adapters and adapters.composition == composition
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # every expert starts as a no-op
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("moa_adapters."))
    assert adapters.num_trainable() == sum(p.numel() for p in adapters.trainable_parameters()) > 0
    first, last = composition.layers or (0, 2)
    assert adapters.layer_indices == list(range(first, last))

    perturb(adapters)
    model.train()
    loss = lm_loss(model, ids) + adapters.weighted_aux_loss()
    loss.backward()
    for n, p in adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("moa_adapters."))
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - base).abs().max() > 1e-3
    stats = adapters.router_stats()
    assert set(stats) >= {"specialisation", "active_experts"}

    detach_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert list(model.state_dict()) == keys_before and not hasattr(model, "moa_adapters")
    assert all(p.requires_grad for p in model.parameters())
    for module in model.modules():
        assert not isinstance(module, AdaptedLinear) and not module._forward_hooks
    with pytest.raises(ValueError, match="no adapters"):
        detach_adapters(model)


# ---------------------------------------------------------------- oracles for the experts


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers 5.24
def test_lora_equals_peft():
    """A single LoRA expert with router none on q, v is peft's LoRA given the same A and B."""
    peft = pytest.importorskip("peft")
    ours, theirs = tiny("llama"), tiny("llama")
    adapters = attach_adapters(ours, Composition((ExpertSpec("lora", 4, alpha=12.0, targets=("q", "v")),),
                                                 RouterSpec("none")))
    perfected = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0))
    perturb(adapters)
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(perfected.base_model.model)):
            for target in ("q", "v"):
                expert = adapters.layers[str(index)].experts[0][target]
                peft_layer = getattr(layer.self_attn, f"{target}_proj")
                peft_layer.lora_A["default"].weight.copy_(expert.A.weight)
                peft_layer.lora_B["default"].weight.copy_(expert.B.weight)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, perfected(ids).logits, atol=1e-5, rtol=1e-5)
        assert (ours(ids).logits - tiny("llama")(ids).logits).abs().max() > 1e-3


def test_routed_experts_equal_direct_computation():
    """LoRA, (IA)^3 and parallel experts under a soft router, layer 0, written out from the parameters."""
    model = tiny("llama")
    comp = Composition((ExpertSpec("lora", 4, alpha=8.0, targets=("q",), count=2), ExpertSpec("ia3", targets=("k", "down")),
                        ExpertSpec("parallel", 6)), RouterSpec("soft"))
    adapters = attach_adapters(model, comp, seed=5)
    perturb(adapters, scale=0.5)
    layer, la = decoder_layers(model)[0], adapters.layers["0"]
    seen = {}

    def keep(name, inputs=False):
        def hook(module, args, output):
            seen[name] = (args[0] if inputs else output).detach().double()
        return hook

    hooks = [layer.input_layernorm.register_forward_hook(keep("x")), layer.self_attn.q_proj.register_forward_hook(keep("q")),
             layer.self_attn.k_proj.register_forward_hook(keep("k")), layer.mlp.register_forward_hook(keep("m", True)),
             layer.mlp.register_forward_hook(keep("mlp"))]
    with torch.no_grad():
        model(token_ids())
    for h in hooks:
        h.remove()

    def p(module, name):
        return module.get_parameter(name).detach().double()

    x = seen["x"]
    w = torch.sigmoid(x @ p(la.router.head, "weight").T)  # (B, T, 4): lora, lora, ia3, parallel
    attn = layer.self_attn
    q = x @ p(attn.q_proj.base_layer, "weight").T
    for e in (0, 1):
        lora = la.experts[e]["q"]
        q = q + w[..., e:e + 1] * (x @ p(lora.A, "weight").T @ p(lora.B, "weight").T) * 2.0
    torch.testing.assert_close(seen["q"], q, atol=1e-5, rtol=1e-5)
    k = (x @ p(attn.k_proj.base_layer, "weight").T) * (1 + w[..., 2:3] * (p(la.experts[2]["k"], "scale") - 1))
    torch.testing.assert_close(seen["k"], k, atol=1e-5, rtol=1e-5)
    m, mlp = seen["m"], layer.mlp
    inner = F.silu(m @ p(mlp.gate_proj, "weight").T) * (m @ p(mlp.up_proj, "weight").T)
    inner = inner * (1 + w[..., 2:3] * (p(la.experts[2]["down"], "scale") - 1))  # (IA)^3 on the down_proj input
    parallel = la.experts[3]
    side = F.silu(m @ p(parallel.down, "weight").T + p(parallel.down, "bias"))
    side = side @ p(parallel.up, "weight").T + p(parallel.up, "bias")
    expected = inner @ p(mlp.down_proj.base_layer, "weight").T + w[..., 3:4] * side
    torch.testing.assert_close(seen["mlp"], expected, atol=1e-5, rtol=1e-5)


def _moe_lora_v_matches_direct_computation(model, adapters) -> None:
    """One no-grad forward: layer 0's v output equals the base plus the top-2 experts' updates, computed in float64
    from the current parameters (four rank-3 experts, alpha 4.5: scaling 1.5)."""
    layer, la = decoder_layers(model)[0], adapters.layers["0"]
    seen = {}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.update(x=out.detach().double())),
             layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: seen.update(v=out.detach().double()))]
    with torch.no_grad():
        model(token_ids())
    for h in hooks:
        h.remove()
    x = seen["x"]  # (B, T, hidden)
    p = torch.softmax(x @ la.router.head.weight.detach().double().T, dim=-1)  # (B, T, 4)
    top, index = p.topk(2, dim=-1)
    w = torch.zeros_like(p).scatter(-1, index, top / top.sum(-1, keepdim=True))
    assert ((w > 0).sum(-1) == 2).all()
    v = x @ layer.self_attn.v_proj.base_layer.weight.detach().double().T
    for e in range(4):
        lora = la.experts[e]["v"]
        a, b = lora.A.weight.detach().double(), lora.B.weight.detach().double()
        v = v + w[..., e:e + 1] * (x @ a.T @ b.T) * 1.5
    torch.testing.assert_close(seen["v"], v, atol=1e-5, rtol=1e-5)


def _moe_lora_on_v(seed: int = 3):
    model = tiny("llama")
    comp = Composition((ExpertSpec("lora", 3, alpha=4.5, targets=("v",), count=4),), RouterSpec("topk", top_k=2))
    adapters = attach_adapters(model, comp, seed=seed)
    perturb(adapters, scale=0.5)
    return model, adapters


def test_top2_lora_experts_of_unequal_weight_equal_direct_computation():
    """MoE-LoRA's layer (four rank-3 experts on v, top-2 of a softmax): every token's v output is the base plus the
    two chosen experts' updates, weighted by their renormalised probabilities; the other two contribute nothing."""
    _moe_lora_v_matches_direct_computation(*_moe_lora_on_v())


def test_stacked_lora_weights_follow_in_place_updates():
    """Decoding reuses the experts' stacked weights between forwards; an in-place update of one expert's weights
    (what an optimiser step or load_state_dict does) must show in the next forward."""
    model, adapters = _moe_lora_on_v()
    _moe_lora_v_matches_direct_computation(model, adapters)
    with torch.no_grad():
        adapters.layers["0"].experts[1]["v"].B.weight.add_(0.7)
        adapters.layers["0"].experts[2]["v"].A.weight.mul_(-2.0)
    _moe_lora_v_matches_direct_computation(model, adapters)


def test_parallel_adapter_output_added_to_mlp():
    model = tiny("qwen2")
    adapters = attach_adapters(model, Composition((ExpertSpec("parallel", 5, count=2),), RouterSpec("soft")), seed=2)
    perturb(adapters, scale=0.5)
    layer, la = decoder_layers(model)[1], adapters.layers["1"]
    seen = {}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, o: seen.update(x=o.detach().double())),
             layer.mlp.register_forward_hook(lambda m, a, o: seen.update(m=a[0].detach(), out=o.detach().double()))]
    with torch.no_grad():
        model(token_ids())
        for h in hooks:
            h.remove()
        plain = layer.mlp.forward(seen["m"]).double()  # .forward skips the hooks: the base MLP
    w = torch.sigmoid(seen["x"] @ la.router.head.weight.double().T)
    expected = plain
    for e, adapter in enumerate(la.experts):
        h = F.silu(seen["m"].double() @ adapter.down.weight.double().T + adapter.down.bias.double())
        expected = expected + w[..., e:e + 1] * (h @ adapter.up.weight.double().T + adapter.up.bias.double())
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_ia3_equals_scaled_base_weights():
    """(IA)^3 with router none is the base model with k/v rows and down_proj columns scaled by l."""
    model, folded = tiny("qwen2"), tiny("qwen2")  # qwen2: k/v projections have biases
    adapters = attach_adapters(model, Composition((ExpertSpec("ia3", targets=("k", "v", "down")),), RouterSpec("none")))
    perturb(adapters, scale=0.3)
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(folded)):
            expert = adapters.layers[str(index)].experts[0]
            for target in ("k", "v"):
                proj = getattr(layer.self_attn, f"{target}_proj")
                proj.weight.mul_(expert[target].scale[:, None])
                proj.bias.mul_(expert[target].scale)
            layer.mlp.down_proj.weight.mul_(expert["down"].scale[None, :])
        ids = token_ids()
        torch.testing.assert_close(model(ids).logits, folded(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prompt_expert_equals_gated_separate_softmax(arch):
    """The hooked attention output is the base output plus, per query head h, tanh(g_h) * softmax(q_h K^T / sqrt(D)) V
    over the prompt keys of h's KV head (through k_norm on Qwen3), through o_proj; written head by head in float64."""
    model = tiny(arch)
    adapters = attach_adapters(model, Composition((ExpertSpec("prompt", 5),), RouterSpec("none")), seed=1)
    expert = adapters.layers["1"].experts[0]
    with torch.no_grad():
        expert.gate.copy_(torch.tensor([0.9, -0.4, 0.3, 1.7]))
    attn = decoder_layers(model)[1].self_attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, a, k, o: seen.update(kwargs=k, out=o[0].detach()), with_kwargs=True)
    with torch.no_grad():
        model(token_ids(length=9))
        hook.remove()
        kwargs = seen["kwargs"]
        plain = attn.forward(**kwargs)[0]  # without hooks: the base attention
    rotary = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}").apply_rotary_pos_emb
    hs = kwargs["hidden_states"].double()
    cos, sin = (t.double() for t in kwargs["position_embeddings"])
    b, t, _ = hs.shape
    d, heads, kv_heads = 16, 4, 2
    queries = (hs @ attn.q_proj.weight.double().T).view(b, t, heads, d)
    prompt = expert.prompt.detach().double()
    keys = (prompt @ attn.k_proj.weight.double().T).view(-1, kv_heads, d)
    values = (prompt @ attn.v_proj.weight.double().T).view(-1, kv_heads, d)
    if arch == "qwen3":
        queries = copy.deepcopy(attn.q_norm).double()(queries)
        keys = copy.deepcopy(attn.k_norm).double()(keys)
    queries, _ = rotary(queries.transpose(1, 2), queries.transpose(1, 2), cos, sin)  # (B, H, T, D)
    heads_out = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        probs = torch.softmax(queries[:, h] @ keys[:, g].T / math.sqrt(d), dim=-1)  # (B, T, P)
        heads_out.append(math.tanh(float(expert.gate[h].detach())) * probs @ values[:, g])  # (B, T, D)
    delta = torch.cat(heads_out, dim=-1) @ attn.o_proj.weight.double().T
    torch.testing.assert_close(seen["out"].double(), plain.double() + delta, atol=1e-5, rtol=1e-5)
    assert delta.abs().max() > 1e-2


# ---------------------------------------------------------------- routers and auxiliary losses


def router_input(tokens=40, hidden=64, seed=0):
    return torch.randn(2, tokens // 2, hidden, generator=torch.Generator().manual_seed(seed)) * 3


def test_router_kinds_weights():
    x = router_input()
    torch.manual_seed(0)
    assert torch.equal(make_router(RouterSpec("none"), 64, 3)(x), torch.ones(2, 20, 3))
    soft = make_router(RouterSpec("soft", hidden=8), 64, 5)(x)
    assert soft.shape == (2, 20, 5) and bool(((soft > 0) & (soft < 1)).all())
    top = make_router(RouterSpec("topk", top_k=3), 64, 6)(x)
    assert bool(((top > 0).sum(-1) == 3).all())
    torch.testing.assert_close(top.sum(-1), torch.ones(2, 20))
    router = make_router(RouterSpec("sparse", threshold_cap=0.9), 64, 4)
    sparse = router(x)
    assert bool((sparse >= 0).all()) and bool(((sparse > 0).sum(-1) >= 1).all())
    torch.testing.assert_close(sparse.sum(-1), torch.ones(2, 20))
    assert float(router.last_threshold.detach().max()) <= 0.9 / 4
    stats = router.stats()
    assert 1 <= stats["active_experts"] <= 4 and 0 < stats["threshold"] <= 0.9 / 4


def test_sparse_weights_follow_the_adamole_formula():
    router = make_router(RouterSpec("sparse", threshold_cap=1.0), 64, 4)
    x = router_input()
    w = router(x)
    p = torch.softmax(x @ router.head.weight.T, dim=-1)
    thr = 0.25 * torch.sigmoid(x @ router.threshold_head.weight.T + router.threshold_head.bias)
    excess = torch.where(p >= thr, p - thr, torch.zeros_like(p))
    torch.testing.assert_close(w, excess / excess.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_aux_losses_against_hand_values():
    uniform = torch.full((3, 7, 4), 0.25)
    torch.testing.assert_close(load_balance_loss(uniform), torch.tensor(1.0))
    torch.testing.assert_close(routing_entropy(uniform), torch.tensor(math.log(4)))
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # every token on expert 0: f = (1, 0), P = (1, 0)
    torch.testing.assert_close(load_balance_loss(collapsed), torch.tensor(2.0))
    torch.testing.assert_close(routing_entropy(collapsed), torch.tensor(0.0))
    # two tokens, top-1 of 2 on different experts, soft weights (0.7, 0.3) and (0.4, 0.6) normalised:
    # f = (1/2, 1/2) only if both are active; here all four pairs are active: f = (1/2, 1/2), P = (0.55, 0.45)
    mixed = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    torch.testing.assert_close(load_balance_loss(mixed), torch.tensor(2 * (0.5 * 0.55 + 0.5 * 0.45)))
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3) + 0.4 * math.log(0.4) + 0.6 * math.log(0.6)) / 2
    torch.testing.assert_close(routing_entropy(mixed), torch.tensor(h))
    sparse = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])  # pairs: e0 1, e1 1, e2 1 -> f = 1/3 each
    torch.testing.assert_close(load_balance_loss(sparse), torch.tensor(3 * (1 / 3) * (0.5 + 0.25 + 0.25)))


def test_adapter_set_aux_losses_and_weights():
    model = tiny("llama")
    comp = Composition((ExpertSpec("lora", 2, count=3),), RouterSpec("topk", top_k=1, load_balance_weight=0.3,
                                                                     entropy_weight=0.05))
    adapters = attach_adapters(model, comp)
    assert adapters.aux_losses() == {} and adapters.router_stats() == {}
    model(token_ids())
    losses = adapters.aux_losses()
    per_layer = [load_balance_loss(la.router.last_weights) for la in adapters.layers.values()]
    torch.testing.assert_close(losses["load_balance"], torch.stack(per_layer).mean())
    torch.testing.assert_close(losses["entropy"], torch.tensor(0.0))  # top-1: one-hot weights
    torch.testing.assert_close(adapters.weighted_aux_loss(), 0.3 * losses["load_balance"])
    assert adapters.weighted_aux_loss().requires_grad
    stats = adapters.router_stats()
    assert stats["active_experts"] == 1.0 and stats["load_balance"] == pytest.approx(float(losses["load_balance"].detach()))
    detach_adapters(model)
    unrouted = attach_adapters(model, Composition((ExpertSpec("lora", 2),), RouterSpec("soft", entropy_weight=1.0)))
    model(token_ids())
    assert unrouted.aux_losses() == {} and float(unrouted.weighted_aux_loss()) == 0.0
    assert unrouted.weighted_aux_loss().shape == ()


def test_sparse_threshold_is_trained():
    """The threshold heads get non-zero gradients from the LM loss alone (through p - thr) and move under Adam."""
    model = tiny("llama")
    adapters = attach_adapters(model, Composition((ExpertSpec("lora", 4, targets=("q", "v", "up"), count=4),),
                                                  RouterSpec("sparse")), seed=4)
    perturb(adapters, scale=0.5)
    heads = [la.router.threshold_head for la in adapters.layers.values()]
    before = [copy.deepcopy(h.state_dict()) for h in heads]
    optimizer = torch.optim.Adam(adapters.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        lm_loss(model, token_ids(seed=step)).backward()
        for h in heads:
            assert h.weight.grad is not None and h.weight.grad.abs().max() > 0
            assert h.bias.grad.abs().max() > 0
        optimizer.step()
    for h, old in zip(heads, before, strict=True):
        assert not torch.equal(h.weight, old["weight"]) and not torch.equal(h.bias, old["bias"])
    stats = adapters.router_stats()
    assert 1 <= stats["active_experts"] < 4 and 0 < stats["threshold"] <= 0.25


# ---------------------------------------------------------------- compositions


def test_composition_round_trip_and_label():
    comp = Composition((ExpertSpec("lora", 8, targets=("q", "v")), ExpertSpec("parallel", 16), ExpertSpec("prompt", 4)),
                       RouterSpec("sparse", threshold_cap=0.5), layers=(0, 30))
    assert comp.label() == "lora8[q,v]+parallel16+prompt4|sparse|L0-30"
    assert composition_from_dict(json.loads(json.dumps(comp.to_dict()))) == comp
    moe = Composition([ExpertSpec("lora", 4, count=8)], RouterSpec("topk", top_k=2, hidden=32))
    assert moe.label() == "lora4[q,v]x8|top2-h32" and moe.num_experts == 8
    assert composition_from_dict(moe.to_dict()) == moe
    assert ExpertSpec("ia3").targets == ("k", "v", "down") and ExpertSpec("parallel").targets == ()
    assert composition_from_dict({"experts": [{"kind": "lora"}]}) == Composition((ExpertSpec("lora"),))


def _bad(**changes):
    expert = changes.pop("expert", {})
    router = changes.pop("router", {})
    return Composition((ExpertSpec(**{"kind": "lora", **expert}),), RouterSpec(**router), **changes)


BAD_COMPOSITIONS = [
    (Composition(()), "no experts"),
    (_bad(expert={"size": 0}), "rank"),
    (_bad(expert={"kind": "parallel", "size": 0}), "bottleneck"),
    (_bad(expert={"count": 0}), "count"),
    (_bad(expert={"kind": "adapterx"}), "unknown expert kind 'adapterx'"),
    (_bad(expert={"targets": ("q", "x")}), "unknown target 'x'"),
    (_bad(expert={"targets": ()}), "targets is empty"),
    (_bad(expert={"kind": "ia3", "targets": ("q",)}), "unknown target 'q'"),
    (_bad(expert={"kind": "prompt", "targets": ("q",)}), "take no targets"),
    (_bad(router={"kind": "dense"}), "unknown kind 'dense'"),
    (_bad(router={"kind": "topk", "top_k": 2}), r"top_k must be in \[1, 1\]"),
    (_bad(router={"kind": "topk", "top_k": 0}), "top_k"),
    (_bad(router={"threshold_cap": 0.0}), "threshold_cap"),
    (_bad(router={"threshold_cap": 1.5}), "threshold_cap"),
    (_bad(router={"load_balance_weight": -1.0}), "load_balance_weight"),
    (_bad(router={"entropy_weight": -0.1}), "entropy_weight"),
    (_bad(expert={"dropout": 1.0}), "dropout"),
    (_bad(expert={"dropout": -0.1}), "dropout"),
    (_bad(layers=(3, 3)), "empty"),
    (_bad(layers=(-1, 2)), "empty or negative"),
]


@pytest.mark.parametrize(("composition", "message"), BAD_COMPOSITIONS, ids=[m for _, m in BAD_COMPOSITIONS])
def test_bad_compositions_are_refused(composition, message):
    with pytest.raises(ValueError, match=message) as info:
        validate_composition(composition)
    assert "\n" not in str(info.value)


def test_compositions_the_model_cannot_host():
    model = tiny("llama")
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        attach_adapters(model, Composition((ExpertSpec("lora"),), layers=(1, 3)))

    class FcMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = nn.Linear(64, 128), nn.Linear(128, 64)

    decoder_layers(model)[1].mlp = FcMLP()
    with pytest.raises(ValueError, match=r"layer 1 mlp has no linear gate_proj \(it has: fc_in, fc_out\)"):
        validate_composition(Composition((ExpertSpec("lora", targets=("q", "gate")),)), model)
    validate_composition(Composition((ExpertSpec("lora", targets=("q", "gate")),), layers=(0, 1)), model)
    assert not hasattr(model, "moa_adapters")


def test_composition_from_dict_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown key 'rank'"):
        composition_from_dict({"experts": [{"kind": "lora", "rank": 8}]})
    with pytest.raises(ValueError, match="unknown key 'extra'"):
        composition_from_dict({"experts": [{"kind": "lora"}], "extra": 1})
    with pytest.raises(ValueError, match=r"experts\[0\].size: expected an integer"):
        composition_from_dict({"experts": [{"kind": "lora", "size": "8"}]})
    with pytest.raises(ValueError, match="layers"):
        composition_from_dict({"experts": [{"kind": "lora"}], "layers": [0]})
    with pytest.raises(ValueError, match="count"):
        composition_from_dict({"experts": [{"kind": "lora", "count": 0}]})


# ---------------------------------------------------------------- attach/detach, fingerprint


def test_attach_twice_is_refused_and_seed_is_deterministic():
    a, b = tiny("llama"), tiny("llama")
    state = torch.random.get_rng_state()
    sa, sb = attach_adapters(a, HETEROGENEOUS, seed=7), attach_adapters(b, HETEROGENEOUS, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(x, y) for x, y in zip(sa.state_dict().values(), sb.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="already attached"):
        attach_adapters(a, HETEROGENEOUS)


def test_base_fingerprint_is_the_unadapted_fingerprint():
    model = tiny("qwen3")
    expected = fingerprint(model)
    adapters = attach_adapters(model, HETEROGENEOUS)
    perturb(adapters)
    ids = token_ids()
    with torch.no_grad():
        adapted = model(ids).logits
    assert fingerprint(model) != expected  # the state dict now holds the adapters
    assert base_fingerprint(model) == expected
    assert model.moa_adapters is adapters
    with torch.no_grad():
        assert torch.equal(model(ids).logits, adapted)  # the adapters are back in place


# ---------------------------------------------------------------- with a sparse-attention plan


def fixed_span_plan(model, seed=0):
    """Spans independent of N (beta 0): a plain forward at any length applies the mask the cache fixes."""
    from pipeline.plan import Plan

    plan = Plan.uniform(model, 0.0, sink=2, min_span=2)
    g = torch.Generator().manual_seed(seed)
    plan.alphas = torch.randint(3, 9, (len(plan.alphas), len(plan.alphas[0])), generator=g).double().tolist()
    return plan


def assert_greedy_equals_recomputation(model, ids, result, new):
    """Each step's logits and greedy token equal a forward over the whole sequence so far, without cache."""
    seq = ids
    for step in range(new):
        with torch.no_grad():
            logits = model(seq, use_cache=False).logits[:, -1]
        torch.testing.assert_close(result.logits[step], logits, atol=1e-4, rtol=1e-4)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result.sequences, seq)


@pytest.mark.parametrize(("arch", "plan_first"), [("llama", False), ("qwen3", True)])
def test_adapters_under_a_sparse_plan(arch, plan_first):
    """Forward and backward through the CPU sparse kernel, and decoding through the per-head cache, with every
    expert kind attached (in either order with the plan)."""
    from pipeline.sparse_runtime import apply_plan, generate, remove_plan

    model = tiny(arch)
    model.generation_config.eos_token_id = None
    ids = token_ids(length=15, seed=2)
    with torch.no_grad():
        dense_base = model(ids).logits
    if plan_first:
        plan = apply_plan(model, fixed_span_plan(model), backend="cpu")
    adapters = attach_adapters(model, HETEROGENEOUS, seed=1)
    perturb(adapters)
    if not plan_first:
        plan = apply_plan(model, fixed_span_plan(model), backend="cpu")
    loss = lm_loss(model, ids)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("moa_adapters."))

    new = 9
    result = generate(model, ids, new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert_greedy_equals_recomputation(model, ids, result, new)
    assert plan.sink == 2

    detach_adapters(model)
    remove_plan(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_base)


def test_adapters_decode_through_the_model_cache():
    """Without a plan, decoding with transformers' own cache matches recomputation with every expert attached."""
    model = tiny("mistral")
    model.generation_config.eos_token_id = None
    perturb(attach_adapters(model, HETEROGENEOUS, seed=2))
    ids = token_ids(length=7, seed=3)
    result = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert_greedy_equals_recomputation(model, ids, result, 6)
