"""The evaluation lines of the summary ``stage=all`` ends with, on a hand-written results table."""

from __future__ import annotations

import pandas as pd

from pipeline.artifacts import RunArtifacts
from pipeline.report import evaluation_summary


def _row(method, budget, task, seq_len, n, correct, agree, prefill=1.0, decode=1.0):
    return {"method": method, "budget": budget, "plan_id": method, "task": task, "seq_len": seq_len, "n": n,
            "accuracy": correct / n, "acc_lo": 0.0, "acc_hi": 1.0, "agree_dense": agree / n, "kl_dense": 0.0,
            "ppl": 10.0, "prefill_ms": 1.0, "decode_ms_per_token": 1.0, "kv_bytes": 1, "kv_density": 0.5,
            "attention_density": 0.6, "prefill_speedup": prefill, "decode_speedup": decode}


def test_counts_are_summed_over_tasks_per_length_and_a_missing_cell_is_a_dash(tmp_path):
    rows = [
        _row("dense", "", "passkey", 2048, 3, 3, 3), _row("dense", "", "var_tracking", 2048, 3, 2, 3),
        _row("dense", "", "passkey", 512, 3, 3, 3), _row("dense", "", "var_tracking", 512, 3, 3, 3),
        # 512 after 2048 in the file: columns still go by length
        _row("moa", "0.5", "passkey", 2048, 3, 1, 2, prefill=1.2, decode=0.8),
        _row("moa", "0.5", "var_tracking", 2048, 3, 2, 1, prefill=1.4, decode=1.0),
        _row("moa", "0.5", "passkey", 512, 3, 3, 3), _row("moa", "0.5", "var_tracking", 512, 3, 3, 3),
        _row("uniform", "0.25", "passkey", 512, 3, 0, 1), _row("uniform", "0.25", "var_tracking", 512, 3, 1, 0),
    ]
    artifacts = RunArtifacts(tmp_path)
    artifacts.eval_results.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(artifacts.eval_results, index=False)
    lines = evaluation_summary(artifacts)
    assert lines[1].startswith("Evaluation (passkey, var_tracking)")
    counts = [line for line in lines if line.startswith("  ")]
    assert counts[0].split() == ["method", "budget", "512", "2048"]
    assert counts[1].split() == ["dense", "6/6", "5/6"]
    assert counts[2].split() == ["moa", "0.5", "6/6", "[1.00]", "3/6", "[0.50]"]  # 1 + 2 correct, 2 + 1 agree
    assert counts[3].split() == ["uniform", "0.25", "1/6", "[0.17]", "-"]
    speed = lines[lines.index(next(line for line in lines if line.startswith("Prefill / decode"))) + 2:]
    assert speed[0].split() == ["moa", "0.5", "1.00", "/", "1.00", "1.30", "/", "0.90"]  # medians over the tasks
    assert speed[1].split() == ["uniform", "0.25", "1.00", "/", "1.00", "-"]
    assert str(artifacts.eval_results) in lines[-1]


def test_no_evaluation_no_lines(tmp_path):
    assert evaluation_summary(RunArtifacts(tmp_path)) == []
