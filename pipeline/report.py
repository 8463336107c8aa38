"""The few lines ``stage=all`` ends with: which plan was selected, what it costs, how it scored, where it is."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd

from pipeline.artifacts import ArtifactError, RunArtifacts

METHOD_ORDER = {"moa": 0, "binary": 1, "uniform": 2}


def final_summary(cfg, run_dir: Path) -> str:
    """A short human summary of the selected plans (one per budget), or what is still missing for one."""
    artifacts = RunArtifacts(run_dir)
    try:
        results = artifacts.load_validation_results()
    except ArtifactError:
        return f"no plan selected yet: {artifacts.validation_results} is missing (stage validate has not run)"
    results["budget"] = ["" if pd.isna(b) else str(b) for b in results["budget"]]
    dense = float(results.loc[results["method"] == "dense", "val_ppl"].iloc[0])
    length = int(results["length"].iloc[0])
    lines = ["", f"Validation perplexity at the unseen length N={length} (dense {dense:.4f}):"]
    first = None
    for budget, rows in results[results["method"] != "dense"].groupby("budget", sort=False):
        moa = rows[rows["method"] == "moa"]
        best = moa[moa["selected"]].iloc[0]
        first = first or (budget, best["plan"])
        lines.append(f"  budget {budget}: selected {best['plan']} ({len(moa)} shortlisted), "
                     f"{artifacts.selected_plan_at(budget)}")
        for _, row in rows.sort_values("method", key=lambda m: m.map(METHOD_ORDER)).iterrows():
            lines.append(f"    {row['method']:<8} {row['plan']:<16} KV density {row['kv_density']:.3f}, attention density "
                         f"{row['attention_density']:.3f}: ppl {row['val_ppl']:.4f} ({row['val_ppl'] / dense:.3f}x dense)"
                         + ("  <- selected" if row["plan"] == best["plan"] else ""))
    lines += [f"Selected plan (budget {first[0]}): {artifacts.selected_plan}  ({first[1]})",
              f"All validation results: {artifacts.validation_results}"]
    lines += evaluation_summary(artifacts)
    lines += adapters_summary(artifacts)
    if artifacts.bench_csv.is_file():
        lines.append(f"Kernel benchmark rows (prefill and decode against dense and FlexAttention): {artifacts.bench_csv}")
    lines.append(f"MLflow UI on these runs: {ui_command(cfg, run_dir)}")
    lines.append(f"  compare plans and baselines there in the experiment {cfg.tracking.experiment}-plans "
                 "(one run per plan; add metric columns with Columns)")
    if cfg.tracking.get("uri"):
        lines.append("Notebooks: pass -p tracking_uri <the server> to papermill (see the README, Notebooks)")
    else:
        lines.append(f"Notebooks: make notebooks RUN_DIR={shlex.quote(str(run_dir))}   "
                     f"(executed copies in {run_dir / 'notebooks'})")
    return "\n".join(lines)


def evaluation_summary(artifacts: RunArtifacts) -> list[str]:
    """Per method and budget, correct answers out of the items at each length (summed over the tasks), with the share
    of answers equal to dense's; then the prefill and decode speed-ups over dense."""
    path = artifacts.eval_results
    if not path.is_file():
        return []
    frame = pd.read_csv(path, dtype={"budget": str}, keep_default_na=False)
    frame["correct"] = (frame["accuracy"] * frame["n"]).round().astype(int)
    frame["agreeing"] = frame["agree_dense"] * frame["n"]
    lengths = sorted(frame["seq_len"].unique())
    tasks = ", ".join(dict.fromkeys(frame["task"]))
    cells = frame.groupby(["method", "budget", "seq_len"], sort=False)[["correct", "n", "agreeing"]].sum()
    speed = frame.groupby(["method", "budget", "seq_len"], sort=False)[["prefill_speedup", "decode_speedup"]].median()
    methods = list(dict.fromkeys(zip(frame["method"], frame["budget"], strict=True)))
    header = f"  {'method':<8} {'budget':<6} " + "".join(f"{n:>14}" for n in lengths)
    lines = ["", f"Evaluation ({tasks}): correct answers of n by prompt length, [share of answers equal to dense's]:",
             header]
    for method, budget in methods:
        row = "".join(f"{_count(cells, (method, budget, n)):>14}" for n in lengths)
        lines.append(f"  {method:<8} {budget:<6} {row}")
    lines += ["Prefill / decode speed-up over dense (median over tasks, methods timed one after another; side by side: "
              "scripts/plan_latency.py):", header]
    for method, budget in methods:
        if method == "dense":
            continue
        row = "".join(f"{_pair(speed, (method, budget, n)):>14}" for n in lengths)
        lines.append(f"  {method:<8} {budget:<6} {row}")
    lines.append(f"All evaluation results (per task, 95% intervals, KL from dense, perplexity, KV bytes): {path}")
    return lines


def _count(cells: pd.DataFrame, key: tuple) -> str:
    """``correct/n``, and for a method other than dense its share of answers equal to dense's; ``-`` if not run."""
    if key not in cells.index:
        return "-"
    cell = cells.loc[key]
    agree = "" if key[0] == "dense" else f" [{cell['agreeing'] / cell['n']:.2f}]"
    return f"{int(cell['correct'])}/{int(cell['n'])}{agree}"


def _pair(speed: pd.DataFrame, key: tuple) -> str:
    if key not in speed.index:
        return "-"
    prefill, decode = speed.loc[key]
    return f"{prefill:.2f} / {decode:.2f}"


def adapters_summary(artifacts: RunArtifacts) -> list[str]:
    """The adapter search's Pareto compositions against the baselines, as test accuracy with its interval."""
    import pandas as pd

    path = artifacts.adapter_results
    if not path.is_file():
        return []
    frame = pd.read_csv(path)
    shown = frame[frame["kind"] != "trial"].sort_values(["kind", "trainable_params"])
    lines = ["", "Adapters (test accuracy, 95% interval, trainable parameters):"]
    for row in shown.itertuples():
        lines.append(f"  {row.name:<16} {row.kind:<8} {row.accuracy:.3f} [{row.acc_lo:.3f}, {row.acc_hi:.3f}]  "
                     f"{int(row.trainable_params):>9,d}  {row.composition}")
    lines.append(f"All adapter results: {path}  (notebook: notebooks/adapter_search.ipynb)")
    return lines


def ui_command(cfg, run_dir: Path) -> str:
    """The command that opens the MLflow UI on this run directory's store (or names the tracking server)."""
    uri = cfg.tracking.get("uri")
    if uri:
        return f"open {uri} in a browser"
    store = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    artifacts = (run_dir.resolve() / "mlartifacts").as_uri()
    return (f"make ui RUN_DIR={shlex.quote(str(run_dir))}   (or: mlflow ui --backend-store-uri {store} "
            f"--default-artifact-root {artifacts})")
