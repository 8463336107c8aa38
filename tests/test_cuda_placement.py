"""The pipeline on the run's device: ``load_model`` places the model, the stages send their tensors to wherever the
model is, and profiling in bf16 on CUDA agrees with CPU float32.

Without CUDA the placement is checked on PyTorch's ``meta`` device: a model there holds no data, so every entry
point is stopped at the embedding by a pre-hook that records the device of the token ids it was given. The ``gpu``
test runs on the GPU machine (``scripts/gpu_check.sh``), which has no Hydra or OmegaConf: everything that needs
them is imported inside the CPU tests.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model

TINY = {"name": "tiny", "source": "tiny", "path": None, "dtype": "float32", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_positions": 2048, "seed": 0}


class _Stop(Exception):
    """Raised by the probe once it has seen the model's input."""


def probed(model: torch.nn.Module, seen: list) -> torch.nn.Module:
    """``model`` with a pre-hook on its token embedding that records the ids' device, then stops the forward."""

    def probe(module, args, kwargs):
        seen.append(args[0].device if args else kwargs["input"].device)
        raise _Stop

    model.get_input_embeddings().register_forward_pre_hook(probe, with_kwargs=True)
    return model


def test_load_model_places_the_model_where_asked_and_keeps_its_fingerprint():
    from omegaconf import OmegaConf

    from pipeline.models import load_model

    cfg = OmegaConf.create(TINY)
    host = load_model(cfg)
    placed = {str(device): load_model(cfg, device) for device in ("cpu", torch.device("meta"))}
    assert {p.device.type for p in host.model.parameters()} == {"cpu"}
    assert {p.device.type for p in placed["cpu"].model.parameters()} == {"cpu"}
    assert {p.device.type for p in placed["meta"].model.parameters()} == {"meta"}
    assert host.info == placed["cpu"].info == placed["meta"].info  # the fingerprint does not depend on the device


@pytest.mark.parametrize(("device", "cuda_available", "expected"),
                         [("cpu", False, "cpu"), ("cpu", True, "cpu"), ("auto", False, "cpu"), ("auto", True, "cuda"),
                          ("cuda", True, "cuda")])
def test_stage_context_loads_the_model_on_the_run_device(monkeypatch, tmp_path, device, cuda_available, expected):
    import pipeline.models
    from pipeline.context import StageContext
    from pipeline.run import compose
    from pipeline.settings import check_all

    cfg = compose(["model=tiny", "stage=calibrate", f"run_dir={tmp_path}", "device=cpu"])
    settings = check_all(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    settings = type(settings)(**{**settings.__dict__, "run": type(settings.run)(**{**settings.run.__dict__,
                                                                                  "device": device})})
    asked = []
    monkeypatch.setattr(pipeline.models, "load_model", lambda model_cfg, where=None: asked.append(where) or "loaded")
    ctx = StageContext(cfg=cfg, name="calibrate", run_dir=tmp_path, config_hash="test", tracker=None, run=None,
                       settings=settings)
    assert ctx.load_model() == "loaded" and ctx.load_model() == "loaded"  # loaded once per invocation
    assert asked == [torch.device(expected)]


def test_device_cuda_without_cuda_is_one_line_error(monkeypatch, tmp_path):
    from pipeline.errors import UserError
    from pipeline.run import compose
    from pipeline.settings import check_all

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^device: bad value 'cuda' \(expected auto or cpu: CUDA is not available"):
        check_all(compose(["model=tiny", "stage=calibrate", f"run_dir={tmp_path}", "device=cuda"])).run.torch_device()


def _calibrate_entry(model, seen):
    from pipeline.calibration.builder import greedy_response

    def generate(input_ids, **_):  # generate() reads token ids back on the host, which a meta tensor cannot do
        seen.append(input_ids.device)
        raise _Stop

    model.generate = generate
    greedy_response(model, [5, 6, 7, 8], 2, {1})


def _validate_entry(model):
    from pipeline.evaluation.perplexity import perplexity

    ids = torch.randint(1, 100, (1, 12))
    mask = torch.zeros(1, 12, dtype=torch.uint8)
    mask[0, 6:] = 1
    perplexity(model, ids, mask, torch.tensor([12]))


def _evaluate_entry(model):
    from pipeline.evaluation.generation import timed_greedy

    timed_greedy(model, [5, 6, 7, 8], 2, {1})


def _evaluate_kl_entry(model):
    from pipeline.evaluation.generation import teacher_forced_logits

    teacher_forced_logits(model, [5, 6, 7], [8, 9])


def _profile_entry(model, tmp_path):
    from test_profile_stage import BLOCK, make_cfg, make_ctx, write_calibration

    import pipeline.stages.profile as profile_stage

    write_calibration(tmp_path, 48, [48, 40])
    cfg = make_cfg([48])
    info = SimpleNamespace(name="tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_positions=4096,
                           fingerprint="tiny-fp")
    ctx = make_ctx(cfg, tmp_path, SimpleNamespace(model=model, tokenizer=None, info=info))
    assert ctx.settings.profile.block_size == BLOCK
    profile_stage.profile_length(ctx, ctx.load_model(), 48, ctx.settings.profile)


@pytest.mark.parametrize("stage", ["calibrate", "profile", "validate", "evaluate", "evaluate_kl"])
def test_stage_tensors_follow_the_model_device(stage, tmp_path):
    """Every stage's model call gets its token ids on the model's device (here ``meta``), never on the CPU."""
    import torch.fx.experimental._config as fx_config

    seen = []
    model = probed(make_tiny_model("llama").to("meta"), seen)
    entry = {"calibrate": lambda m: _calibrate_entry(m, seen), "validate": _validate_entry,
             "evaluate": _evaluate_entry, "evaluate_kl": _evaluate_kl_entry,
             "profile": lambda m: _profile_entry(m, tmp_path)}[stage]
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), pytest.raises(_Stop):  # the loss mask's nonzero()
        entry(model)
    assert [d.type for d in seen] == ["meta"]


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_profiling_in_bf16_on_cuda_agrees_with_cpu_float32(granularity):
    """Influence of a bf16 model on CUDA against the same float32 model on CPU.

    Tolerance, in the Triton tutorial's idiom: the largest block error on CUDA is at most twice that of the same bf16
    computation on the CPU plus 1% of the largest block (the devices' bf16 kernels accumulate in different orders;
    on CPU the bf16 error itself is about 0.3% of the largest block); each head's long-range share (influence at
    least 4 blocks back) within 0.05; total influence within 10%."""
    from pipeline.profile.influence import attention_influence

    gen = torch.Generator().manual_seed(0)
    n, block = 192, 16
    ids = torch.randint(0, 128, (n,), generator=gen)
    mask = torch.zeros(n, dtype=torch.uint8)
    mask[n // 2:] = 1
    model = make_tiny_model("llama", layers=2, heads=4, kv_heads=2)
    want = attention_influence(model, ids, mask, block, granularity)  # CPU float32
    bf16 = model.to(torch.bfloat16)
    cpu_bf16 = attention_influence(bf16, ids, mask, block, granularity)
    got = attention_influence(bf16.to("cuda"), ids.cuda(), mask.cuda(), block, granularity)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == want.shape
    got = got.cpu()
    cpu_err = (cpu_bf16 - want).abs().max().item()
    cuda_err = (got - want).abs().max().item()
    assert cuda_err <= 2 * cpu_err + 1e-2 * want.abs().max().item(), (cuda_err, cpu_err)
    far = torch.ones(n // block, n // block).tril(-4).bool()  # blocks at least 4 blocks back
    share = lambda e: e[..., far].sum(-1) / e.sum((-1, -2))  # noqa: E731 - long-range share per (layer, head)
    assert (share(got) - share(want)).abs().max().item() <= 0.05
    assert math.isclose(got.sum().item(), want.sum().item(), rel_tol=0.1)
