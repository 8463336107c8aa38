"""stage=rules and stage=optimize end to end on synthetic influence files, through the runner."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kernels.pattern import kv_density, spans_at
from pipeline import io
from pipeline.plan import load_plan
from pipeline.rules.loss_table import BlockInfluence
from pipeline.run import compose, main
from pipeline.runner import stage_hash, write_marker
from pipeline.stages.registry import registered
from tests.pipeline_helpers import run_stage

LENGTHS = (768, 1536)
BLOCK, SINK, MIN_SPAN = 64, 64, 64


def fake_profile(run_dir, lengths=LENGTHS, seed=0) -> dict[str, dict[int, torch.Tensor]]:
    """Synthetic influence for the tiny model (2 layers x 2 KV heads) and a profile stage marked done: per tensor
    name (``influence``, ``net_influence``, the latter with negative blocks) and length, what the file holds."""
    torch.manual_seed(seed)
    cfg = compose(["model=tiny", f"run_dir={run_dir}", f"calibration.lengths=[{','.join(map(str, lengths))}]"])
    influence, net = {}, {}
    for n in lengths:
        nb = math.ceil(n / BLOCK)
        d = (torch.arange(nb).view(nb, 1) - torch.arange(nb).view(1, nb)).float()
        reach = torch.tensor([[1.0, 0.2 * nb], [3.0, 0.5 * nb]]).view(2, 2, 1, 1)  # local and elastic heads
        influence[n] = (torch.exp(-d.clamp(min=0) / reach) * torch.rand(2, 2, nb, nb)).tril()
        net[n] = (influence[n] * (1.2 * torch.rand(2, 2, nb, nb) - 0.4)).tril()  # about a third of blocks < 0
        io.save_tensors(run_dir / "profile" / f"influence_{n}.safetensors",
                        {"influence": influence[n], "net_influence": net[n]},
                        metadata={"block_size": str(BLOCK), "length": str(n)})
    io.write_json(run_dir / "profile" / "summary.json", {})
    stages = registered()
    write_marker(run_dir, stages["profile"], stage_hash(cfg, "profile", stages), stages)
    return {"influence": influence, "net_influence": net}


def overrides(lengths=LENGTHS):
    # the fake profile has no head gates: plan on influence alone (the gates' cost is tested in test_gate_cost.py)
    return [f"calibration.lengths=[{','.join(map(str, lengths))}]", "optimize.gate_weight=0"]


@pytest.mark.parametrize("kind", ["abs", "net"])
def test_loss_table_sums_the_chosen_influence(tmp_path, kind):
    """rules.influence=abs scores rules on the absolute block influence as stored; net (the default) on the signed
    one with its negative blocks counted as 0."""
    tensors = fake_profile(tmp_path)
    extra = [] if kind == "net" else ["rules.influence=abs"]
    assert run_stage(tmp_path, "stage=rules", *overrides(), *extra) == {"rules": "ran"}
    table = pd.read_parquet(tmp_path / "rules" / "loss_table.parquet")
    rules = table["rule"].nunique()
    for n in LENGTHS:
        blocks = tensors["influence"][n] if kind == "abs" else tensors["net_influence"][n].clamp(min=0)
        rows = table[table["length"] == n].sort_values(["layer", "head", "rule"])
        per_rule = rows.drop_duplicates("rule")
        spans = spans_at(per_rule["alpha"].to_numpy(copy=True), per_rule["beta"].to_numpy(copy=True), n, MIN_SPAN)
        want = BlockInfluence.from_blocks(blocks, n, BLOCK, SINK).loss_per_rule(spans)
        np.testing.assert_allclose(rows["loss"].to_numpy().reshape(2, 2, rules), want.numpy(), rtol=1e-6)


def test_rules_then_optimize_write_consistent_tables_and_plans(tmp_path):
    influence = {n: net.clamp(min=0) for n, net in fake_profile(tmp_path)["net_influence"].items()}
    assert run_stage(tmp_path, "stage=rules", *overrides()) == {"rules": "ran"}
    table = pd.read_parquet(tmp_path / "rules" / "loss_table.parquet")
    assert list(table.columns) == ["layer", "head", "rule", "alpha", "beta", "length", "loss", "kv_density",
                                   "attention_density"]
    rules = table["rule"].nunique()
    assert len(table) == 2 * 2 * rules * len(LENGTHS)
    for n in LENGTHS:
        rows = table[table["length"] == n].sort_values(["layer", "head", "rule"])
        per_rule = rows.drop_duplicates("rule")
        spans = spans_at(per_rule["alpha"].to_numpy(copy=True), per_rule["beta"].to_numpy(copy=True), n, MIN_SPAN)
        want = BlockInfluence.from_blocks(influence[n], n, BLOCK, SINK).loss_per_rule(spans)
        np.testing.assert_allclose(rows["loss"].to_numpy().reshape(2, 2, rules), want.numpy(), rtol=1e-6)
        np.testing.assert_allclose(per_rule["kv_density"], [kv_density(n, int(s), SINK) for s in spans])
    scaling = pd.read_csv(tmp_path / "rules" / "head_scaling.csv")
    assert set(scaling["coverage"]) == {0.9, 0.95, 0.99}
    assert {"layer", "head", "alpha", "beta", "r2", *(f"span_{n}" for n in LENGTHS)} <= set(scaling.columns)
    shown = scaling[scaling["coverage"] == 0.95].set_index(["layer", "head"])["beta"]
    assert shown[(0, 0)] < shown[(0, 1)]  # the far-reaching head widens faster

    assert run_stage(tmp_path, "stage=optimize", *overrides(), "optimize.density_budget=0.45",
                     "optimize.points=6") == {"optimize": "ran"}
    front = io.read_json(tmp_path / "optimize" / "front.json")
    assert front["plans"]
    for entry in front["plans"]:
        plan = load_plan(tmp_path / entry["plan"])
        assert plan.sink == SINK and plan.granularity == "kv_head" and plan.profile_lengths == list(LENGTHS)
        for n in LENGTHS:  # densities recomputed from the plan's own alphas/betas meet the budget
            spans = spans_at(plan.alphas, plan.betas, n, plan.min_span)
            density = float((spans + SINK).clamp(max=n).double().div(n).mean())
            assert density <= 0.45 + 1e-12
            assert plan.expected[n]["kv_density"] == pytest.approx(density)


def test_missing_inputs_and_bad_grids_exit_2_with_one_line(tmp_path, capsys):
    fake_profile(tmp_path)
    (tmp_path / "profile" / "influence_1536.safetensors").unlink()
    base = ["model=tiny", f"run_dir={tmp_path}", *overrides()]
    assert main([*base, "stage=rules"]) == 2  # the profile marker no longer vouches for what is on disk
    assert "run stage=profile first" in capsys.readouterr().err
    stages = registered()
    cfg = compose(base)
    write_marker(tmp_path, stages["profile"], stage_hash(cfg, "profile", stages), stages)  # a marker that lies
    assert main([*base, "stage=rules"]) == 2
    assert "influence_1536.safetensors" in capsys.readouterr().err

    fake_profile(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text("alpha: {start: 0}\nbeta: [0.0]\nrules: [[2000, 0.0]]\n")
    assert main([*base, "stage=rules", f"rules.grid={grid}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpha=2000.0" in err[0] and "768" in err[0]


def test_optimize_errors_name_the_length_and_the_stage_to_run(tmp_path, capsys):
    fake_profile(tmp_path)
    base = ["model=tiny", f"run_dir={tmp_path}", *overrides()]
    assert main([*base, "stage=rules"]) == 0
    assert main([*base[:-1], "stage=optimize"]) == 2  # the default gate weight without profile/gates.json
    assert "optimize.gate_weight=0.1 needs the head gates of stage=profile" in capsys.readouterr().err
    (tmp_path / "rules" / "loss_table.parquet").unlink()
    (tmp_path / "rules" / ".done.json").write_text(json.dumps({"config_hash": "stale"}))
    assert main([*base, "stage=optimize"]) == 2
    assert "stage=rules" in capsys.readouterr().err
    assert main([*base, "stage=rules"]) == 0
    assert main([*base, "stage=optimize", "optimize.density_budget=[{768: 0.5, 1536: 0.01}]"]) == 2
    err = capsys.readouterr().err
    assert "length 1536" in err and "smallest KV density" in err
