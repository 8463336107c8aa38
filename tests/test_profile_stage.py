"""stage=profile: averaging, resume after an interruption, skipping finished lengths, bad input."""

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pipeline.stages.profile as profile_stage
from pipeline.artifacts import ArtifactError
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.profile import attention_influences
from pipeline.run import compose
from pipeline.settings import check_all

BLOCK = 16


@pytest.fixture(scope="module")
def loaded():
    model = make_tiny_model("llama", layers=2, heads=4, kv_heads=2)
    info = SimpleNamespace(name="tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           max_positions=4096, fingerprint="tiny-fp")
    return SimpleNamespace(model=model, tokenizer=None, info=info)


def make_cfg(lengths, **profile):
    overrides = [f"profile.{key}={value}" for key, value in profile.items()]
    return compose(["model=tiny", "stage=profile", f"calibration.lengths=[{','.join(map(str, lengths))}]",
                    f"sparse.block_size={BLOCK}", *overrides])


def write_calibration(run_dir, n, real_lengths, prompt=0.5, seed=0):
    """A calibration file in the calibrate stage's format: tail-padded ids, response-only loss mask."""
    gen = torch.Generator().manual_seed(seed)
    s = len(real_lengths)
    ids = torch.zeros(s, n, dtype=torch.int64)
    mask = torch.zeros(s, n, dtype=torch.uint8)
    prompts = torch.zeros(s, dtype=torch.int64)
    for row, real in enumerate(real_lengths):
        ids[row, :real] = torch.randint(1, 128, (real,), generator=gen)
        prompts[row] = int(prompt * real)
        mask[row, prompts[row]:real] = 1
    tensors = {"input_ids": ids, "loss_mask": mask, "lengths": torch.tensor(real_lengths), "prompt_lengths": prompts}
    path = run_dir / "calibrate" / f"calibration_{n}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


def make_ctx(cfg, run_dir, loaded, force=False):
    """A StageContext whose model is the tiny one and whose MLflow logging is recorded in memory."""
    ctx = StageContext(cfg=cfg, name="profile", run_dir=run_dir, config_hash="test", tracker=None, run=None,
                       settings=check_all(cfg), force=force)
    ctx.load_model = lambda: loaded
    ctx.metrics, ctx.figures = [], []
    ctx.log_params = lambda params: None
    ctx.log_metrics = lambda metrics, step=None: ctx.metrics.append((dict(metrics), step))
    ctx.log_figure = lambda figure, name: ctx.figures.append(name)
    return ctx


def direct_mean(model, tensors, n, usable, which: int = 0):
    """Oracle: the public API per usable sample at its real length, zero-padded to ``n`` and averaged (``which``:
    0 the absolute, 1 the net influence)."""
    nb = math.ceil(n / BLOCK)
    total = torch.zeros(2, 2, nb, nb, dtype=torch.float64)
    for s in usable:
        real = int(tensors["lengths"][s])
        one = attention_influences(model, tensors["input_ids"][s, :real], tensors["loss_mask"][s, :real], BLOCK)[which]
        total[..., : one.shape[-2], : one.shape[-1]] += one.double()
    return (total / len(usable)).float()


def counting_influence(calls: list, fail_at: int | None = None):
    """``attention_influences`` that records each call and raises on call number ``fail_at``."""
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("interrupted")
        return attention_influences(*args, **kwargs)
    return wrapped


def metric(ctx, name):
    return [m[name] for m, _ in ctx.metrics if name in m]


def test_profile_averages_samples_and_writes_artifacts(tmp_path, loaded):
    tensors = write_calibration(tmp_path, 40, [40, 33, 21])
    ctx = make_ctx(make_cfg([40]), tmp_path, loaded)
    profile_stage.run_profile(ctx)
    path = tmp_path / "profile" / "influence_40.safetensors"
    got = load_file(path)["influence"]
    assert got.dtype == torch.float32 and got.shape == (2, 2, 3, 3)
    torch.testing.assert_close(got, direct_mean(loaded.model, tensors, 40, [0, 1, 2]), rtol=1e-6, atol=0)
    net = load_file(path)["net_influence"]
    torch.testing.assert_close(net, direct_mean(loaded.model, tensors, 40, [0, 1, 2], which=1), rtol=1e-6, atol=1e-9)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["fingerprint"] == "tiny-fp" and meta["block_size"] == str(BLOCK)
    assert meta["granularity"] == "kv_head" and meta["samples"] == "3"
    assert (tmp_path / "profile" / "long_range_40.png").stat().st_size > 0
    assert not (tmp_path / "profile" / ".partial" / "test" / "partial_40.safetensors").exists()
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert summary["lengths"]["40"]["samples"] == 3
    assert len(summary["lengths"]["40"]["long_range_share"]) == 2
    assert metric(ctx, "skipped_samples") == [0]
    assert ctx.figures == ["long_range_40.png"]
    assert [step for m, step in ctx.metrics if "layer_influence_mass@40" in m] == [0, 1]


@pytest.mark.parametrize("answer_weight", [0.0, 2.0])
def test_the_stage_weights_answer_tokens_as_configured(tmp_path, loaded, answer_weight):
    tensors = write_calibration(tmp_path, 40, [40, 33])
    tensors["loss_mask"][0, 30:34] = 2  # ANSWER tokens in the first sample only
    save_file(tensors, str(tmp_path / "calibrate" / "calibration_40.safetensors"))
    profile_stage.run_profile(make_ctx(make_cfg([40], answer_weight=answer_weight), tmp_path, loaded))
    got = load_file(tmp_path / "profile" / "influence_40.safetensors")["influence"]
    nb = math.ceil(40 / BLOCK)
    want = torch.zeros(2, 2, nb, nb, dtype=torch.float64)  # oracle: the public API with the same weight
    for s in (0, 1):
        real = int(tensors["lengths"][s])
        one = attention_influences(loaded.model, tensors["input_ids"][s, :real], tensors["loss_mask"][s, :real],
                                   BLOCK, answer_weight=answer_weight)[0]
        want[..., : one.shape[-2], : one.shape[-1]] += one.double() / 2
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    plain = direct_mean(loaded.model, tensors, 40, [0, 1])  # every response token alike
    assert torch.allclose(got, plain, rtol=1e-6, atol=0) == (answer_weight == 0)


def test_interrupted_profile_resumes_to_the_same_result(tmp_path, loaded, monkeypatch):
    for run in ("fresh", "broken"):
        write_calibration(tmp_path / run, 40, [40, 38, 35, 30, 25])
    cfg = make_cfg([40], checkpoint_every=2)
    profile_stage.run_profile(make_ctx(cfg, tmp_path / "fresh", loaded))

    calls = []
    monkeypatch.setattr(profile_stage, "attention_influences", counting_influence(calls, fail_at=3))
    with pytest.raises(RuntimeError, match="interrupted"):
        profile_stage.run_profile(make_ctx(cfg, tmp_path / "broken", loaded))
    partial = tmp_path / "broken" / "profile" / ".partial" / "test" / "partial_40.safetensors"
    with safe_open(str(partial), framework="pt") as f:
        assert f.metadata()["next"] == "2"  # the first batch of two samples was kept

    calls = []
    monkeypatch.setattr(profile_stage, "attention_influences", counting_influence(calls))
    profile_stage.run_profile(make_ctx(cfg, tmp_path / "broken", loaded))
    assert len(calls) == 3  # only samples 2, 3, 4 were recomputed
    fresh = load_file(tmp_path / "fresh" / "profile" / "influence_40.safetensors")["influence"]
    resumed = load_file(tmp_path / "broken" / "profile" / "influence_40.safetensors")["influence"]
    assert torch.equal(fresh, resumed)
    fresh_net = load_file(tmp_path / "fresh" / "profile" / "influence_40.safetensors")["net_influence"]
    resumed_net = load_file(tmp_path / "broken" / "profile" / "influence_40.safetensors")["net_influence"]
    assert torch.equal(fresh_net, resumed_net)


def test_finished_lengths_are_skipped_unless_inputs_change_or_forced(tmp_path, loaded, monkeypatch):
    write_calibration(tmp_path, 24, [24, 20])
    cfg = make_cfg([24])
    profile_stage.run_profile(make_ctx(cfg, tmp_path, loaded))
    calls = []
    monkeypatch.setattr(profile_stage, "attention_influences", counting_influence(calls))
    profile_stage.run_profile(make_ctx(cfg, tmp_path, loaded))
    assert calls == []
    profile_stage.run_profile(make_ctx(cfg, tmp_path, loaded, force=True))
    assert len(calls) == 2
    write_calibration(tmp_path, 24, [24, 22, 18], seed=1)  # new calibration data: recomputed
    profile_stage.run_profile(make_ctx(cfg, tmp_path, loaded))
    assert len(calls) == 5
    OmegaConf.update(cfg, "sparse.granularity", "head")  # another granularity: recomputed
    profile_stage.run_profile(make_ctx(cfg, tmp_path, loaded))
    assert len(calls) == 8
    assert load_file(tmp_path / "profile" / "influence_24.safetensors")["influence"].shape == (2, 4, 2, 2)


def test_bad_samples_are_skipped_and_counted(tmp_path, loaded, caplog):
    tensors = write_calibration(tmp_path, 48, [48, 30, 40, 20])
    tensors["loss_mask"][2] = 0  # empty loss mask
    save_file(tensors, str(tmp_path / "calibrate" / "calibration_48.safetensors"))
    short = SimpleNamespace(**{**vars(loaded), "info": SimpleNamespace(**{**vars(loaded.info), "max_positions": 45})})
    ctx = make_ctx(make_cfg([48]), tmp_path, short)
    with caplog.at_level(logging.WARNING):
        profile_stage.run_profile(ctx)
    assert metric(ctx, "skipped_samples") == [2] and metric(ctx, "skipped_samples@48") == [2]
    assert "exceed the model's 45 positions" in caplog.text and "selects no response token" in caplog.text
    got = load_file(tmp_path / "profile" / "influence_48.safetensors")["influence"]
    torch.testing.assert_close(got, direct_mean(loaded.model, tensors, 48, [1, 3]), rtol=1e-6, atol=0)


def test_missing_or_unusable_calibration_is_a_user_error(tmp_path, loaded):
    ctx = make_ctx(make_cfg([32]), tmp_path, loaded)
    with pytest.raises(ArtifactError, match=r"calibration_32\.safetensors.*stage=calibrate"):
        profile_stage.run_profile(ctx)
    empty = {"input_ids": torch.zeros(0, 32, dtype=torch.int64), "loss_mask": torch.zeros(0, 32, dtype=torch.uint8),
             "lengths": torch.zeros(0, dtype=torch.int64), "prompt_lengths": torch.zeros(0, dtype=torch.int64)}
    (tmp_path / "calibrate").mkdir()
    save_file(empty, str(tmp_path / "calibrate" / "calibration_32.safetensors"))
    with pytest.raises(ArtifactError, match=r"calibration_32\.safetensors holds no samples.*stage=calibrate"):
        profile_stage.run_profile(ctx)
    tensors = write_calibration(tmp_path, 32, [32, 30])
    tensors["loss_mask"].zero_()
    save_file(tensors, str(tmp_path / "calibrate" / "calibration_32.safetensors"))
    with pytest.raises(UserError, match=r"no usable calibration sample in .*calibration_32.*2 skipped"):
        profile_stage.run_profile(ctx)


@pytest.mark.parametrize("key,value", [("sparse.granularity", "query"), ("sparse.block_size", 0),
                                       ("profile.dtype", "float16"), ("profile.lengths", [])])
def test_bad_config_values_name_the_key(key, value):
    cfg = make_cfg([32])
    OmegaConf.update(cfg, key, value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        check_all(cfg)
