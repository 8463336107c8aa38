"""The few lines ``stage=all`` ends with: which plan was selected, what it costs, how it scored, where it is."""

from __future__ import annotations

import shlex
from pathlib import Path

from pipeline.artifacts import ArtifactError, RunArtifacts


def final_summary(cfg, run_dir: Path) -> str:
    """A short human summary of the selected plan, or what is still missing for one."""
    artifacts = RunArtifacts(run_dir)
    try:
        results = artifacts.load_validation_results()
    except ArtifactError:
        return f"no plan selected yet: {artifacts.validation_results} is missing (stage validate has not run)"
    rows = results.set_index("plan")
    candidates = results[results["plan"].str.startswith("plan_")]
    best = candidates.loc[candidates["val_ppl"].idxmin()]
    dense = rows.loc["dense", "val_ppl"]
    uniform = results[results["plan"].str.startswith("uniform")]
    length = int(best["length"])
    lines = [
        "",
        f"Selected plan: {artifacts.selected_plan}  ({best['plan']}, best of {len(candidates)} front plans)",
        f"  at the unseen validation length N={length}: KV density {best['kv_density']:.3f}"
        + (f", attention density {best['attention_density']:.3f}" if "attention_density" in best else ""),
        f"  validation perplexity {best['val_ppl']:.4f}: {best['val_ppl'] / dense:.3f}x dense ({dense:.4f})"
        + (f", uniform window at the same KV density {uniform['val_ppl'].iloc[0]:.4f} "
           f"({uniform['val_ppl'].iloc[0] / dense:.3f}x dense)" if len(uniform) else ""),
        f"  results per candidate: {artifacts.validation_results}",
        f"MLflow UI on these runs: {ui_command(cfg, run_dir)}",
    ]
    return "\n".join(lines)


def ui_command(cfg, run_dir: Path) -> str:
    """The command that opens the MLflow UI on this run directory's store (or names the tracking server)."""
    uri = cfg.tracking.get("uri")
    if uri:
        return f"open {uri} in a browser"
    store = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    artifacts = (run_dir.resolve() / "mlartifacts").as_uri()
    return (f"make ui RUN_DIR={shlex.quote(str(run_dir))}   (or: mlflow ui --backend-store-uri {store} "
            f"--default-artifact-root {artifacts})")
