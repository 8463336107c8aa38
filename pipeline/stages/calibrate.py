"""stage=calibrate: long-context samples at every profile length, answered by the model's own greedy decoding."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors import safe_open  # noqa: E402

from pipeline import io  # noqa: E402
from pipeline.calibration.builder import build_samples, pack, pad_token_id  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.stages.registry import stage  # noqa: E402

SPLIT = "calibration"


@stage("calibrate", config_keys=("calibration",), outputs=("calibrate/",))
def run_calibrate(ctx):
    """Build calibration samples whose answers depend on far-back context, with response-only loss masks."""
    cal = ctx.settings.calibration
    loaded = ctx.load_model()
    model, tokenizer, info = loaded.model, loaded.tokenizer, loaded.info
    lengths = list(cal.lengths)
    too_long = [n for n in lengths if info.max_positions and n > info.max_positions]
    if too_long:
        raise UserError(f"calibration.lengths: {too_long[0]} exceeds the model's {info.max_positions} positions")
    manifest = {"model": info.as_dict(), "config_hash": ctx.config_hash, "lengths": {}}
    tasks = list(cal.tasks)
    for length in lengths:
        path = ctx.artifacts.calibration(length)
        meta_path = ctx.artifacts.calibration_records(length)
        if not ctx.force and io.tensors_saved_for(path, ctx.config_hash) and meta_path.is_file():
            print(f"  length {length}: already built, skipped", flush=True)
            records = ctx.artifacts.load_calibration_records(length)
        else:
            try:
                samples = build_samples(
                    model, tokenizer, tasks=tasks, length=length, count=cal.samples_per_length,
                    max_new_tokens=cal.max_new_tokens, split=SPLIT, seed=cal.seed,
                    progress=lambda items, n=length: ctx.progress(items, desc=f"calibrate N={n}"),
                )
            except ValueError as err:
                raise UserError(f"calibration.lengths: {length} is too short ({err})") from None
            tensors = pack(samples, length, pad_token_id(tokenizer))
            records = [
                {
                    "index": i,
                    "task": s.item.task,
                    "answer": s.item.answer,
                    "response": s.response_text,
                    "correct": s.correct,
                    "prompt_tokens": len(s.prompt_ids),
                    "response_tokens": len(s.response_ids),
                    "answer_tokens": len(s.answer_positions),
                }
                for i, s in enumerate(samples)
            ]
            io.write_text(meta_path, "".join(json.dumps(r) + "\n" for r in records))
            io.save_tensors(path, tensors, metadata={"config_hash": ctx.config_hash, "fingerprint": info.fingerprint, "length": str(length)})
        manifest["lengths"][str(length)] = {
            "file": path.name,
            "samples": len(records),
            "dense_accuracy": sum(r["correct"] for r in records) / max(1, len(records)),
            "tasks": sorted({r["task"] for r in records}),
        }
        ctx.log_metrics(
            {
                f"samples@{length}": len(records),
                f"dense_accuracy@{length}": manifest["lengths"][str(length)]["dense_accuracy"],
                f"mean_response_tokens@{length}": sum(r["response_tokens"] for r in records) / max(1, len(records)),
            }
        )
        ctx.log_artifact(meta_path, artifact_path="calibration")
    manifest_path = ctx.artifacts.calibration_manifest
    io.write_json(manifest_path, manifest)
    ctx.log_artifact(manifest_path, artifact_path="calibration")
    ctx.log_figure(_length_histogram(ctx.artifacts, lengths), "calibration_lengths.png")
    return {"lengths": lengths, "samples": sum(v["samples"] for v in manifest["lengths"].values())}


def _length_histogram(artifacts, lengths: list[int]):
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for length in lengths:
        with safe_open(str(artifacts.calibration(length)), framework="pt") as handle:
            prompts = handle.get_tensor("prompt_lengths").tolist()
            totals = handle.get_tensor("lengths").tolist()
        axis.hist(prompts, bins=20, alpha=0.6, label=f"N={length} prompt")
        axis.hist(totals, bins=20, alpha=0.3, histtype="step", label=f"N={length} prompt+response")
    axis.set_xlabel("tokens")
    axis.set_ylabel("samples")
    axis.set_title("Calibration sample lengths")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
