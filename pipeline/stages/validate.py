"""stage=validate: score every candidate plan on held-out samples at an unseen length and pick the best."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from safetensors.torch import load_file

from pipeline import io
from pipeline.calibration.builder import build_samples, pack, pad_token_id
from pipeline.errors import UserError
from pipeline.evaluation.perplexity import perplexity
from pipeline.plan import Plan, kv_density, load_plan, save_plan
from pipeline.sparse_runtime import apply_plan, remove_plan
from pipeline.stages.registry import stage

SPLIT = "validation"


def validation_length(cfg) -> int:
    """``validate.length``, or by default the midpoint of the two longest profile lengths, on a block boundary."""
    profile_lengths = sorted(int(n) for n in cfg.calibration.lengths)
    if cfg.validate.get("length"):
        length = int(cfg.validate.length)
    elif len(profile_lengths) >= 2:
        block = int(cfg.sparse.block_size)
        length = (profile_lengths[-2] + profile_lengths[-1]) // 2 // block * block
    else:
        raise UserError("validate.length: set it explicitly when there is a single profile length")
    if length in profile_lengths:
        raise UserError(f"validate.length: {length} is a profile length; validation needs an unseen length")
    return length


def heldout_samples(ctx, length: int) -> dict:
    """Held-out samples (disjoint seed stream) answered greedily by the dense model; built once, then reused."""
    path = ctx.stage_dir / f"heldout_{length}.safetensors"
    if not ctx.force and io.tensors_saved_for(path, ctx.config_hash):
        return load_file(str(path))
    loaded = ctx.load_model()
    cfg = ctx.cfg
    samples = build_samples(
        loaded.model, loaded.tokenizer, tasks=list(cfg.calibration.tasks), length=length, count=int(cfg.validate.samples),
        max_new_tokens=int(cfg.calibration.max_new_tokens), split=SPLIT, seed=int(cfg.calibration.seed),
        progress=lambda items: ctx.progress(items, desc=f"held-out N={length}"),
    )
    tensors = pack(samples, length, pad_token_id(loaded.tokenizer))
    io.save_tensors(path, tensors, metadata={"config_hash": ctx.config_hash})
    return tensors


def _uniform_like(plan: Plan, info, length: int) -> Plan:
    """The uniform plan (one span for every head) with the same KV density as ``plan`` at ``length``."""
    target = kv_density(plan, length)
    span = max(plan.min_span, round(target * length) - plan.sink)
    return Plan.uniform(info, span / length, sink=plan.sink, min_span=plan.min_span, block_size=plan.block_size,
                        granularity=plan.granularity, lengths=[length])


@stage("validate", requires=("optimize",), config_keys=("sparse", "calibration", "validate"),
       outputs=("plan.json", "validate/results.csv"))
def run_validate(ctx):
    """Response-masked perplexity of every Pareto plan at an unseen length; the best becomes run_dir/plan.json."""
    plan_paths = sorted((ctx.run_dir / "plans").glob("plan_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not plan_paths:
        raise UserError(f"no candidate plans under {ctx.run_dir / 'plans'}: run stage=optimize first")
    length = validation_length(ctx.cfg)
    data = heldout_samples(ctx, length)
    loaded = ctx.load_model()
    model, info = loaded.model, loaded.info
    backend = str(ctx.cfg.validate.backend)
    scored = lambda: perplexity(model, data["input_ids"], data["loss_mask"], data["lengths"])  # noqa: E731

    dense_ppl = scored()
    rows = [{"plan": "dense", "kv_density": 1.0, "val_ppl": dense_ppl, "ppl_ratio_vs_dense": 1.0}]
    for path in ctx.progress(plan_paths, desc="validate plans"):
        plan = load_plan(path)
        apply_plan(model, plan, backend=backend, info=info)
        try:
            ppl = scored()
        finally:
            remove_plan(model)
        rows.append({"plan": path.name, "kv_density": kv_density(plan, length), "val_ppl": ppl, "ppl_ratio_vs_dense": ppl / dense_ppl})
    candidates = [r for r in rows if r["plan"] != "dense"]
    best = min(candidates, key=lambda r: (r["val_ppl"], r["kv_density"]))
    best_plan = load_plan(ctx.run_dir / "plans" / best["plan"])
    uniform = _uniform_like(best_plan, info, length)
    apply_plan(model, uniform, backend=backend, info=info)
    try:
        uniform_ppl = scored()
    finally:
        remove_plan(model)
    rows.append({"plan": "uniform@best_density", "kv_density": kv_density(uniform, length), "val_ppl": uniform_ppl,
                 "ppl_ratio_vs_dense": uniform_ppl / dense_ppl})

    frame = pd.DataFrame(rows)
    frame.insert(1, "length", length)
    io.write_csv(ctx.stage_dir / "results.csv", frame)
    save_plan(best_plan, ctx.run_dir / "plan.json")
    _log_candidates(ctx, candidates, length)
    ctx.log_metrics({"dense_val_ppl": dense_ppl, "best_val_ppl": best["val_ppl"], "uniform_val_ppl": uniform_ppl,
                     f"best_kv_density@{length}": best["kv_density"],
                     "best_ppl_ratio_vs_dense": best["val_ppl"] / dense_ppl,
                     "uniform_ppl_ratio_vs_dense": uniform_ppl / dense_ppl})
    mlflow.set_tag("selected_plan", best["plan"])
    ctx.log_artifact(ctx.stage_dir / "results.csv")
    ctx.log_artifact(ctx.run_dir / "plan.json")
    print(frame.to_string(index=False), flush=True)
    return {"selected": best["plan"], "length": length, "dense_ppl": dense_ppl, "best_ppl": best["val_ppl"], "uniform_ppl": uniform_ppl}


def _log_candidates(ctx, candidates: list[dict], length: int) -> None:
    """Attach ``val_ppl`` to each candidate's MLflow run when the optimize stage recorded its run id."""
    front = ctx.run_dir / "optimize" / "front.json"
    run_ids = {}
    if front.is_file():
        for entry in json.loads(Path(front).read_text()).get("plans", []):
            if entry.get("mlflow_run_id") and entry.get("plan"):
                run_ids[Path(entry["plan"]).name] = entry["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient()
    for row in candidates:
        ctx.log_metrics({f"val_ppl/{row['plan']}": row["val_ppl"]})
        if row["plan"] in run_ids:
            client.log_metric(run_ids[row["plan"]], "val_ppl", row["val_ppl"])
            client.log_metric(run_ids[row["plan"]], f"kv_density:{length}", row["kv_density"])
