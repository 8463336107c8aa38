"""Train head gates on a run (:mod:`pipeline.profile.gates`) and score the full-or-streaming split they give.

The training samples come from the calibration task generators under a split of their own (``gates``), answered
greedily by the dense model, so they share no seed stream with calibration, validation or evaluation; the gates are
trained on the final hidden states at the positions that predict the response tokens. From the trained gates the
script builds one full-or-streaming plan per length: the heads with the largest gates full, the others streaming
with ``--window`` (default: the run's binary split's window), as many full as fit the KV density of the run's
selected plan at that length (``--budget``). It then scores dense, the selected plan, the evaluation's binary split
and the gate split on the evaluation's items at each length (``evaluate.tasks``, seed ``evaluate.seed``,
``--items`` per task) in the evaluation's dtype, and prints every item's result.

``--profile-gates`` scores the gates that ``stage=profile`` trained (``profile/gates.json``) instead.

Results under ``<run_dir>/gates/``: ``gates.json`` (the trained gates; a second call with the same training
settings reuses them), ``gate_plan_<budget>_<N>.json`` and ``gate_eval.csv``.

    .venv/bin/python scripts/gate_heads.py --lengths 2048 --items 6 -- run_dir=runs/smollm2
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import io
from pipeline.calibration.builder import build_samples, chat_ids, end_token_ids
from pipeline.errors import UserError
from pipeline.evaluation.generation import timed_greedy
from pipeline.evaluation.harness import eval_items
from pipeline.evaluation.response_loss import loss_targets
from pipeline.evaluation.scoring import is_correct
from pipeline.plan import Plan, load_plan, plan_kv_density, save_plan
from pipeline.profile.gates import gate_plan, train_gates
from pipeline.script_run import add_overrides, open_run
from pipeline.settings import DTYPES
from pipeline.sparse_runtime import plan_applied_if
from pipeline.stages.optimize import binary_builder

METHODS = ("dense", "moa", "binary", "gates")
TRAINING_SPLIT = "gates"
TRAINING_TASKS = ["hidden_number", "multi_doc_qa", "var_tracking", "kv_lines"]


def training_samples(model, tokenizer, length: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` samples of the training split at ``length``: ``(input_ids [n], response positions [T])``."""
    samples = build_samples(model, tokenizer, tasks=TRAINING_TASKS, length=length, count=count, max_new_tokens=48,
                            split=TRAINING_SPLIT, seed=seed, progress=lambda r: tqdm(r, desc=f"samples at {length}"))
    out = []
    for sample in samples:
        ids = torch.tensor(sample.prompt_ids + sample.response_ids)  # (n,) unpadded
        mask = torch.zeros(ids.numel(), dtype=torch.uint8)
        mask[len(sample.prompt_ids):] = 1
        out.append((ids, loss_targets(mask) - 1))  # positions whose hidden state predicts a response token
    return out


def score(model, tokenizer, items: dict[str, list], plan: Plan | None, eos: set[int], new: int) -> dict[str, str]:
    """Per task, one character per item: 1 correct, 0 not."""
    marks = {}
    with plan_applied_if(model, plan, backend="auto"):
        for task, task_items in items.items():
            texts = [tokenizer.decode(timed_greedy(model, chat_ids(tokenizer, item.prompt), new, eos).response_ids,
                                      skip_special_tokens=True) for item in tqdm(task_items, desc=task, leave=False)]
            marks[task] = "".join("1" if is_correct(t, item.answer) else "0" for t, item in zip(texts, task_items, strict=True))
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-length", type=int, default=2048, help="token length of the training samples")
    parser.add_argument("--train-samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--l1", type=float, default=0.05, help="weight of the mean gate in the loss")
    parser.add_argument("--window", type=int, default=None,
                        help="streaming window (default: the selected plan's binary window)")
    parser.add_argument("--budget", default="0.5", help="the budget label of the selected plan to match")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048], help="evaluation lengths")
    parser.add_argument("--items", type=int, default=6, help="evaluation items per task and length")
    parser.add_argument("--profile-gates", action="store_true",
                        help="use the gates stage=profile trained (profile/gates.json) instead of training new ones")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to score")
    add_overrides(parser)
    args = parser.parse_args()
    try:
        run = open_run(args.overrides)
        settings, run_dir, artifacts, loaded = run.settings, run.run_dir, run.artifacts, run.loaded
        budget = args.budget
        selected = artifacts.selected_plan_at(budget)
        if not selected.is_file():
            raise UserError(f"{selected}: no selected plan at budget {budget}; run stage=validate first")
        plan = load_plan(selected, loaded.info)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tokenizer = loaded.model, loaded.tokenizer
    window = args.window or int(plan.solver.get("streaming_window") or 256)
    out_dir = run_dir / "gates"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = {"train_length": args.train_length, "train_samples": args.train_samples, "steps": args.steps,
           "lr": args.lr, "l1": args.l1, "window": window, "sink": plan.sink, "fingerprint": loaded.info.fingerprint}
    gates_path = out_dir / "gates.json"
    stored = io.read_json(gates_path) if gates_path.is_file() else None
    if args.profile_gates:
        gates = artifacts.load_head_gates()
        if gates is None:
            print(f"error: {artifacts.head_gates} is missing: run stage=profile with profile.gate_steps > 0",
                  file=sys.stderr)
            return 2
        window = int(io.read_json(artifacts.head_gates)["settings"]["window"])
        print(f"using the gates of {artifacts.head_gates} (streaming window {window})")
    elif stored and stored["settings"] == key:
        gates = np.array(stored["gates"])
        print(f"reusing the gates of {gates_path}")
    else:
        samples = training_samples(model, tokenizer, args.train_length, args.train_samples, settings.calibration.seed)
        gates = train_gates(model, samples, sink=plan.sink, window=window, steps=args.steps, lr=args.lr, l1=args.l1)
        io.write_json(gates_path, {"settings": key, "gates": gates.round(5).tolist()})
    print("gates by layer (KV heads):")
    for layer, row in enumerate(gates):
        print(f"  {layer:2d}: " + " ".join(f"{g:.2f}" for g in row))
    dtype = settings.evaluate.compute_dtype(settings.model.dtype, settings.run.torch_device())
    model.to(DTYPES[dtype])
    eos = end_token_ids(model, tokenizer)
    binary_at = binary_builder(SimpleNamespace(artifacts=artifacts, settings=settings), loaded.info)
    binary_template = load_plan(artifacts.binary_plan(budget), loaded.info)
    rows = []
    for length in args.lengths:
        density = plan_kv_density(plan, length)
        split = gate_plan(plan, gates, length, density, window)
        save_plan(split, out_dir / f"gate_plan_{budget}_{length}.json")
        binary = binary_at(binary_template, length, density)
        items = eval_items(tokenizer, list(settings.evaluate.tasks), length, args.items,
                           settings.evaluate.max_new_tokens, settings.evaluate.seed)
        methods = {"dense": None, "moa": plan, "binary": binary, "gates": split}
        for name in args.methods:
            method_plan = methods[name]
            marks = score(model, tokenizer, items, method_plan, eos, settings.evaluate.max_new_tokens)
            kv = 1.0 if method_plan is None else plan_kv_density(method_plan, length)
            correct = sum(m.count("1") for m in marks.values())
            print(f"{length} {name:7s} kv {kv:.3f}  {correct}/{sum(len(m) for m in marks.values())}  "
                  + " / ".join(marks.values()), flush=True)
            rows.append({"seq_len": length, "method": name, "kv_density": kv, "correct": correct,
                         **{task: m for task, m in marks.items()}})
    io.write_csv(out_dir / "gate_eval.csv", pd.DataFrame(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
