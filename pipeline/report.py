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
    lines += adapters_summary(artifacts)
    lines.append(f"MLflow UI on these runs: {ui_command(cfg, run_dir)}")
    return "\n".join(lines)


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
