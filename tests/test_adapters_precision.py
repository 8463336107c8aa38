"""Adapters on a half-precision base: the frozen model computes in bfloat16, the adapters stay float32.

Oracle: the same adapter weights on the float32 model. Every expert kind is perturbed away from its no-op start,
so an expert whose contribution were dropped or mis-cast on the bfloat16 base would move the logits far more than
bfloat16 rounding does.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from pipeline.adapters import Composition, ExpertSpec, RouterSpec, attach_adapters, detach_adapters
from pipeline.adapters.attach import adapter_dtype
from pipeline.run import compose
from pipeline.settings import AdaptersSettings, EvaluateSettings, native_bfloat16
from tests.test_adapters_library import HETEROGENEOUS, VOCAB, perturb, token_ids

# Every expert kept: a top-k below the count would pick other experts where bfloat16 rounding reorders near ties.
MOE = Composition((ExpertSpec("lora", 4, targets=("q", "v", "down"), count=4),), RouterSpec("topk", top_k=4))


@pytest.mark.parametrize("composition", [HETEROGENEOUS, MOE], ids=["heterogeneous", "moe-lora"])
def test_bfloat16_base_matches_float32_base_with_the_same_adapters(composition):
    reference = make_tiny_model("llama", vocab=VOCAB)
    adapters = attach_adapters(reference, composition, seed=4)
    perturb(adapters, seed=2, scale=0.5)
    ids = token_ids(batch=2, length=17)
    with torch.no_grad():
        expected = reference(ids).logits  # (B, T, V) float32
        detach_adapters(reference)
        unadapted = reference(ids).logits

    half = copy.deepcopy(reference).to(torch.bfloat16)
    moved = attach_adapters(half, composition, seed=4)
    assert {p.dtype for p in moved.parameters()} == {torch.float32}
    assert {p.dtype for n, p in half.named_parameters() if not n.startswith("moa_adapters.")} == {torch.bfloat16}
    moved.load_state_dict(adapters.state_dict())
    with torch.no_grad():
        got = half(ids).logits.float()
    error = (got - expected).abs().max()
    effect = (expected - unadapted).abs().max()
    assert effect > 20 * error, (float(effect), float(error))  # the adapters' effect is far above rounding
    assert torch.allclose(got, expected, atol=0.05 * float(expected.abs().max()), rtol=0)


def test_adapters_on_a_bfloat16_base_train_in_float32():
    model = make_tiny_model("llama", vocab=VOCAB).to(torch.bfloat16)
    adapters = attach_adapters(model, HETEROGENEOUS, seed=1)
    perturb(adapters, seed=0)
    ids = token_ids()
    logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in adapters.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) > 0 for g in grads.values()) == len(grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("moa_adapters."))


@pytest.mark.parametrize(("base", "kept"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_adapter_dtype(base, kept):
    assert adapter_dtype(base) == kept


def _settings(section: str, dtype: str) -> AdaptersSettings | EvaluateSettings:
    settings = {"adapters": AdaptersSettings, "evaluate": EvaluateSettings}[section]
    return settings.from_cfg(compose(["model=tiny", f"{section}.dtype={dtype}"]))


@pytest.mark.parametrize("section", ["adapters", "evaluate"])
@pytest.mark.parametrize(("setting", "model_dtype", "native", "expected"), [
    ("auto", "float32", True, "bfloat16"),
    ("auto", "float32", False, "float32"),
    ("auto", "bfloat16", False, "bfloat16"),
    ("float32", "float32", True, "float32"),
    ("bfloat16", "float32", False, "bfloat16"),
])
def test_compute_dtype(monkeypatch, section, setting, model_dtype, native, expected):
    import pipeline.settings as settings_module

    monkeypatch.setattr(settings_module, "native_bfloat16", lambda device: native)
    assert _settings(section, setting).compute_dtype(model_dtype, torch.device("cpu")) == expected


def test_native_bfloat16_follows_the_cpu_capability(monkeypatch):
    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bfloat16(torch.device("cpu")) is expected


def test_stage_context_gives_a_converted_copy_and_keeps_the_loaded_model(tmp_path):
    from pipeline.context import StageContext
    from pipeline.settings import check_all

    cfg = compose(["model=tiny", "stage=adapters", f"run_dir={tmp_path}", "device=cpu"])
    ctx = StageContext(cfg=cfg, name="adapters", run_dir=tmp_path, config_hash="test", tracker=None, run=None,
                       settings=check_all(cfg))
    loaded = ctx.load_model()
    weights = {n: p.clone() for n, p in loaded.model.named_parameters()}
    half = ctx.load_model("bfloat16")
    assert half.model is not loaded.model and ctx.load_model("bfloat16") is half  # one copy per invocation
    assert ctx.load_model("float32") is loaded  # model.dtype itself: the loaded model
    assert half.info == loaded.info and half.tokenizer is loaded.tokenizer
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    for name, p in loaded.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, weights[name])
        assert torch.equal(half.model.get_parameter(name), weights[name].to(torch.bfloat16))
