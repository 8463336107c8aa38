"""stage=validate: score a shortlist of each budget's front on held-out samples at an unseen length; pick the best.

Beside the shortlisted plans it scores two baselines at the selected plan's KV density at that length: the binary
split solved again there (:func:`pipeline.optimize.baselines.binary_plan_at`) and a uniform window. ``validate/results.csv`` has one row per scored plan (``plan, method, budget, length,
kv_density, attention_density, val_ppl, ppl_ratio_vs_dense, selected``); ``validate/selected_<budget>.json`` is
each budget's choice (:func:`select`) and ``plan.json`` the first budget's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from pipeline import io
from pipeline.calibration.builder import build_samples, pack, pad_token_id
from pipeline.errors import UserError
from pipeline.evaluation.perplexity import perplexity
from pipeline.optimize.baselines import uniform_window_plan
from pipeline.plan import Plan, load_plan, plan_attention_density, plan_kv_density, save_plan
from pipeline.settings import budget_label
from pipeline.sparse_runtime import plan_applied
from pipeline.stages.optimize import binary_builder
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


def _row(name: str, method: str, budget: str, plan: Plan | None, length: int, ppl: float, dense_ppl: float) -> dict:
    return {"plan": name, "method": method, "budget": budget,
            "kv_density": 1.0 if plan is None else plan_kv_density(plan, length),
            "attention_density": 1.0 if plan is None else plan_attention_density(plan, length),
            "val_ppl": ppl, "ppl_ratio_vs_dense": ppl / dense_ppl}


def shortlist(entries: list[dict], lengths: list[int], size: int) -> list[dict]:
    """The ``size`` front plans nearest the front's ideal point, the compromise plans: ranked by the largest ratio,
    over the profile lengths, of a plan's influence loss to the least loss any plan of ``entries`` reaches at that
    length (then by the sum of those ratios). A plan that is best at one length is often far from best at the
    others; the plans in between validate better (README, Validation)."""
    if not entries:
        return []
    ideal = {n: min(e[f"influence_loss@{n}"] for e in entries) for n in lengths}

    def key(entry):
        ratios = [entry[f"influence_loss@{n}"] / max(ideal[n], 1e-12) for n in lengths]
        return max(ratios), sum(ratios)
    return sorted(entries, key=key)[:size]


def select(rows: list[dict], tie_tolerance: float) -> dict:
    """The plan validation keeps from ``rows`` (scored shortlist rows, in compromise order): the first whose held-out
    perplexity is within ``tie_tolerance`` (relative) of the least. Perplexities a few tenths of a percent apart
    swap places between CPUs (README, Validation), so a strict minimum would pick another plan on another machine;
    within the tolerance the front's own ranking decides."""
    least = min(row["val_ppl"] for row in rows)
    return next(row for row in rows if row["val_ppl"] <= least * (1.0 + tie_tolerance))


@stage("validate", requires=("optimize",), config_keys=("sparse", "calibration", "profile", "optimize", "validate"),
       outputs=("plan.json", "validate/"))
def run_validate(ctx):
    """Per budget: perplexity of a shortlist of front plans, the binary baseline and a uniform window at an unseen
    length; the best plan of each budget is selected, the first budget's becomes run_dir/plan.json."""
    artifacts, settings = ctx.artifacts, ctx.settings
    front = [e for e in artifacts.load_front().get("plans", []) if "budget" in e]
    if not front:
        raise UserError(f"{artifacts.front} lists no plans: run stage=optimize first")
    length = settings.validate.length
    data = heldout_samples(ctx, length)
    loaded = ctx.load_model()
    model, info = loaded.model, loaded.info
    backend = settings.validate.backend
    lengths = sorted(settings.profile.lengths)
    scored = lambda: perplexity(model, data["input_ids"], data["loss_mask"], data["lengths"])  # noqa: E731

    def scored_with(plan: Plan) -> float:
        with plan_applied(model, plan, backend=backend, info=info):
            return scored()

    binary_at = binary_builder(ctx, info)
    dense_ppl = scored()
    rows = [_row("dense", "dense", "", None, length, dense_ppl, dense_ppl)]
    selected, selected_plans = {}, {}
    for budget in (budget_label(b) for b in settings.optimize.budgets):
        entries = [e for e in front if e["budget"] == budget]
        chosen = shortlist([e for e in entries if e["method"] == "moa"], lengths, settings.validate.shortlist)
        plans = {Path(e["plan"]).name: _load(artifacts.plans_dir / Path(e["plan"]).name, info) for e in chosen}
        scored_rows = [_row(name, "moa", budget, plan, length, scored_with(plan), dense_ppl)
                       for name, plan in ctx.progress(plans.items(), desc=f"validate budget {budget}")]
        best = select(scored_rows, settings.validate.tie_tolerance)
        best_plan = plans[best["plan"]]
        # The baselines at the selected plan's KV density at this length: the binary split solved again here, and
        # one uniform window.
        binary = binary_at(_load(artifacts.binary_plan(budget), info), length, best["kv_density"])
        uniform = uniform_window_plan(info, best["kv_density"], length, sink=best_plan.sink,
                                      min_span=best_plan.min_span, block_size=best_plan.block_size,
                                      granularity=best_plan.granularity)
        scored_rows += [_row(f"binary_{budget}", "binary", budget, binary, length, scored_with(binary), dense_ppl),
                        _row(f"uniform_{budget}", "uniform", budget, uniform, length, scored_with(uniform),
                             dense_ppl)]
        rows += scored_rows
        selected[budget] = best
        selected_plans[budget] = best_plan
        save_plan(best_plan, artifacts.selected_plan_at(budget))
        _plan_run(ctx, best).set_tags({"selected": "true"})
        _log_candidates(ctx, front, scored_rows, length)

    frame = pd.DataFrame(rows)
    frame.insert(3, "length", length)
    frame["selected"] = [any(row is best for best in selected.values()) for row in rows]
    io.write_csv(artifacts.validation_results, frame)
    first = next(iter(selected))
    save_plan(selected_plans[first], artifacts.selected_plan)
    _plan_run(ctx, rows[0]).log_metrics({"val_ppl": dense_ppl})
    metrics = {"dense_val_ppl": dense_ppl}
    for budget, best in selected.items():
        uniform_ppl = frame[(frame["method"] == "uniform") & (frame["budget"] == budget)]["val_ppl"].iloc[0]
        metrics.update({f"best_val_ppl@{budget}": best["val_ppl"], f"uniform_val_ppl@{budget}": uniform_ppl,
                        f"best_kv_density@{budget}": best["kv_density"],
                        f"best_ppl_ratio_vs_dense@{budget}": best["val_ppl"] / dense_ppl})
    ctx.log_metrics(metrics)
    ctx.set_tags({"selected_plan": selected[first]["plan"],
                  **{f"selected_plan:{b}": r["plan"] for b, r in selected.items()}})
    ctx.log_artifact(artifacts.validation_results)
    ctx.log_artifact(artifacts.selected_plan)
    print(frame.to_string(index=False), flush=True)
    return {"selected": {b: r["plan"] for b, r in selected.items()}, "length": length, "dense_ppl": dense_ppl,
            "best_ppl": {b: r["val_ppl"] for b, r in selected.items()}}


def _log_candidates(ctx, front: list[dict], rows: list[dict], length: int) -> None:
    """Attach ``val_ppl`` (and the densities at the validation length) to each scored plan's optimize-stage run."""
    run_ids = {Path(entry["plan"]).name: entry["mlflow_run_id"] for entry in front if entry.get("mlflow_run_id")}
    for row in rows:
        ctx.log_metrics({f"val_ppl/{row['plan']}": row["val_ppl"]})
        _plan_run(ctx, row).log_metrics({"val_ppl": row["val_ppl"], f"kv_density@{length}": row["kv_density"],
                                         f"attention_density@{length}": row["attention_density"]})
        if row["plan"] in run_ids:
            ctx.logger(run_ids[row["plan"]]).log_metrics({"val_ppl": row["val_ppl"],
                                                          f"kv_density@{length}": row["kv_density"],
                                                          f"attention_density@{length}": row["attention_density"]})


def _plan_run(ctx, row: dict):
    """The plans-experiment run of a results row: its plan file's, or the method's (dense, and the baselines rebuilt
    at this length)."""
    if row["method"] in ("dense", "binary", "uniform"):
        return ctx.plan_runs.for_method(row["method"], row["budget"])
    return ctx.plan_runs.for_file(ctx.artifacts.plans_dir / row["plan"], method=row["method"], budget=row["budget"])


def _load(path: Path, info) -> Plan:
    try:
        return load_plan(path, info)
    except ValueError as err:
        raise UserError(str(err)) from None
