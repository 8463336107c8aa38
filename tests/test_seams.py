"""Project-wide seams: stages go through the artifacts module and their context, names have one home, docs resolve."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.artifacts import ArtifactError, RunArtifacts

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("pipeline", "kernels", "scripts") for p in (REPO / folder).rglob("*.py"))
STAGES = sorted((REPO / "pipeline" / "stages").glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stages_log_only_through_their_context(path):
    """No stage imports mlflow: tracking goes through StageContext's explicit client and run ids."""
    for node in ast.walk(_tree(path)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n.split(".")[0] == "mlflow" for n in names), f"{path.name} imports mlflow"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stages_name_artifacts_through_the_artifacts_module(path):
    """No stage joins a path under ``run_dir`` or ``stage_dir`` by hand (``x / "name"``)."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left = ast.unparse(node.left)
            assert not re.search(r"\b(run_dir|stage_dir)$", left), f"{path.name}:{node.lineno} builds {ast.unparse(node)}"


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in _tree(path).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("name", ["GRANULARITIES", "DTYPES", "PREFILL_BACKENDS", "DECODE_BACKENDS", "spans_for",
                                  "kv_density", "attention_density", "profile_lengths", "load_loss_table"])
def test_a_name_has_one_home(name):
    homes = Counter(str(p.relative_to(REPO)) for p in SOURCES if name in _top_level_names(p))
    assert len(homes) <= 1, f"{name} is defined in {sorted(homes)}"


def test_loaders_name_the_missing_file_and_the_stage_that_makes_it(tmp_path):
    artifacts = RunArtifacts(tmp_path)
    cases = [(lambda: artifacts.load_calibration(512), "calibration_512.safetensors", "stage=calibrate"),
             (lambda: artifacts.load_influence(512, 64), "influence_512.safetensors", "stage=profile"),
             (artifacts.load_loss_table, "loss_table.parquet", "stage=rules"),
             (artifacts.load_front, "front.json", "stage=optimize"),
             (artifacts.load_validation_results, "results.csv", "stage=validate"),
             (artifacts.load_bench, "kernels.csv", "stage=benchmark")]
    for load, file, stage in cases:
        with pytest.raises(ArtifactError, match=rf"{re.escape(file)}.*{stage}"):
            load()


def test_documented_layout_is_the_artifacts_module(tmp_path):
    """Every path in docs/artifacts.md's table is one the artifacts module produces, and the other way round."""
    doc = (REPO / "docs" / "artifacts.md").read_text()
    artifacts = RunArtifacts(tmp_path)
    produced = [artifacts.calibration(512), artifacts.calibration_records(512), artifacts.calibration_manifest,
                artifacts.influence(512), artifacts.long_range_figure(512), artifacts.profile_summary,
                artifacts.loss_table, artifacts.head_scaling, artifacts.candidate_plan(0), artifacts.front,
                artifacts.heldout(512), artifacts.validation_results, artifacts.selected_plan, artifacts.bench_csv,
                artifacts.binary_plan("0.5"), artifacts.selected_plan_at("0.5"), artifacts.eval_results,
                artifacts.adapter_results, artifacts.optuna_db]
    assert f"`{artifacts.adapter_weights('<name>').relative_to(tmp_path)}/`" in doc
    for path in produced:
        documented = str(path.relative_to(tmp_path)).replace("512", "<N>").replace("plan_0", "plan_<i>") \
            .replace("0.5", "<budget>")
        assert f"`{documented}`" in doc, f"{documented} is not in docs/artifacts.md"


def test_docs_links_resolve_and_no_internal_doc_is_named():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "DESIGN.md" not in text, f"{page.name} points users at a file they do not have"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
