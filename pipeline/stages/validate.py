"""stage=validate: score every candidate plan on held-out samples at an unseen length and pick the best."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from pipeline import io
from pipeline.calibration.builder import build_samples, pack, pad_token_id
from pipeline.errors import UserError
from pipeline.evaluation.perplexity import perplexity
from pipeline.plan import Plan, load_plan, plan_attention_density, plan_kv_density, save_plan
from pipeline.sparse_runtime import plan_applied
from pipeline.stages.registry import stage

SPLIT = "validation"


def heldout_samples(ctx, length: int) -> dict:
    """Held-out samples (disjoint seed stream) answered greedily by the dense model; built once, then reused."""
    path = ctx.artifacts.heldout(length)
    if not ctx.force and io.tensors_saved_for(path, ctx.config_hash):
        return load_file(str(path))
    loaded = ctx.load_model()
    calibration = ctx.settings.calibration
    samples = build_samples(
        loaded.model, loaded.tokenizer, tasks=list(calibration.tasks), length=length,
        count=ctx.settings.validate.samples, max_new_tokens=calibration.max_new_tokens, split=SPLIT,
        seed=calibration.seed,
        progress=lambda items: ctx.progress(items, desc=f"held-out N={length}"),
    )
    tensors = pack(samples, length, pad_token_id(loaded.tokenizer))
    io.save_tensors(path, tensors, metadata={"config_hash": ctx.config_hash})
    return tensors


def _uniform_like(plan: Plan, info, length: int) -> Plan:
    """The uniform plan (one span for every head) with the same KV density as ``plan`` at ``length``."""
    target = plan_kv_density(plan, length)
    span = max(plan.min_span, round(target * length) - plan.sink)
    return Plan.uniform(info, span / length, sink=plan.sink, min_span=plan.min_span, block_size=plan.block_size,
                        granularity=plan.granularity, lengths=[length])


def _row(name: str, plan: Plan | None, length: int, ppl: float, dense_ppl: float) -> dict:
    return {"plan": name,
            "kv_density": 1.0 if plan is None else plan_kv_density(plan, length),
            "attention_density": 1.0 if plan is None else plan_attention_density(plan, length),
            "val_ppl": ppl, "ppl_ratio_vs_dense": ppl / dense_ppl}


@stage("validate", requires=("optimize",), config_keys=("sparse", "calibration", "profile", "validate"),
       outputs=("plan.json", "validate/"))
def run_validate(ctx):
    """Response-masked perplexity of every Pareto plan at an unseen length; the best becomes run_dir/plan.json."""
    artifacts = ctx.artifacts
    plan_paths = artifacts.candidate_plans()
    if not plan_paths:
        raise UserError(f"no candidate plans under {artifacts.plans_dir}: run stage=optimize first")
    length = ctx.settings.validate.length
    data = heldout_samples(ctx, length)
    loaded = ctx.load_model()
    model, info = loaded.model, loaded.info
    backend = ctx.settings.validate.backend
    scored = lambda: perplexity(model, data["input_ids"], data["loss_mask"], data["lengths"])  # noqa: E731

    def scored_with(plan: Plan) -> float:
        with plan_applied(model, plan, backend=backend, info=info):
            return scored()

    dense_ppl = scored()
    rows = [_row("dense", None, length, dense_ppl, dense_ppl)]
    plans = {path.name: _load(path, info) for path in plan_paths}
    for name, plan in ctx.progress(plans.items(), desc="validate plans"):
        rows.append(_row(name, plan, length, scored_with(plan), dense_ppl))
    candidates = rows[1:]
    best = min(candidates, key=lambda r: (r["val_ppl"], r["kv_density"]))
    best_plan = plans[best["plan"]]
    uniform = _uniform_like(best_plan, info, length)
    rows.append(_row("uniform@best_density", uniform, length, scored_with(uniform), dense_ppl))
    uniform_ppl = rows[-1]["val_ppl"]

    frame = pd.DataFrame(rows)
    frame.insert(1, "length", length)
    io.write_csv(artifacts.validation_results, frame)
    save_plan(best_plan, artifacts.selected_plan)
    _log_candidates(ctx, candidates, length)
    ctx.log_metrics({"dense_val_ppl": dense_ppl, "best_val_ppl": best["val_ppl"], "uniform_val_ppl": uniform_ppl,
                     f"best_kv_density@{length}": best["kv_density"],
                     "best_ppl_ratio_vs_dense": best["val_ppl"] / dense_ppl,
                     "uniform_ppl_ratio_vs_dense": uniform_ppl / dense_ppl})
    ctx.set_tags({"selected_plan": best["plan"]})
    ctx.log_artifact(artifacts.validation_results)
    ctx.log_artifact(artifacts.selected_plan)
    print(frame.to_string(index=False), flush=True)
    return {"selected": best["plan"], "length": length, "dense_ppl": dense_ppl, "best_ppl": best["val_ppl"], "uniform_ppl": uniform_ppl}


def _log_candidates(ctx, candidates: list[dict], length: int) -> None:
    """Attach ``val_ppl`` to each candidate's MLflow run when the optimize stage recorded its run id."""
    run_ids = {Path(entry["plan"]).name: entry["mlflow_run_id"] for entry in ctx.artifacts.load_front().get("plans", [])
               if entry.get("mlflow_run_id") and entry.get("plan")}
    for row in candidates:
        ctx.log_metrics({f"val_ppl/{row['plan']}": row["val_ppl"]})
        if row["plan"] in run_ids:
            ctx.logger(run_ids[row["plan"]]).log_metrics({"val_ppl": row["val_ppl"],
                                                          f"kv_density@{length}": row["kv_density"],
                                                          f"attention_density@{length}": row["attention_density"]})


def _load(path: Path, info) -> Plan:
    try:
        return load_plan(path, info)
    except ValueError as err:
        raise UserError(str(err)) from None
