"""The blockwise profiler on the real SmolLM2 (30 layers, 9 query / 3 KV heads): float64 oracle agreement."""

from pathlib import Path

import pytest
import torch

from pipeline.profile import attention_influence, naive_attention_influence

CONF = Path(__file__).resolve().parents[1] / "pipeline" / "conf"


@pytest.mark.slow
def test_smollm2_blockwise_matches_full_matrix_in_float64():
    from hydra import compose, initialize_config_dir

    from pipeline.models import load_model

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=["model=smollm2", "model.dtype=float64"])
    model = load_model(cfg.model).model
    gen = torch.Generator().manual_seed(0)
    n = 200  # ragged: 4 blocks of 64 with a last one of 8
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
    mask = torch.zeros(n, dtype=torch.uint8)
    mask[150:] = 1
    got = attention_influence(model, ids, mask, 64, "kv_head", dtype=torch.float64)
    want = naive_attention_influence(model, ids, mask, 64, "kv_head")
    assert got.shape == (30, 3, 4, 4)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
