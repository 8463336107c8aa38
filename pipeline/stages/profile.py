"""stage=profile: average the blockwise attention influence over each profile length's calibration samples.

Per length ``N`` it writes ``profile/influence_<N>.safetensors`` (tensor ``influence`` ``[L, H, nb, nb]``
float32, ``nb = ceil(N / block_size)``) and a heat-map ``profile/long_range_<N>.png``; ``profile/summary.json``
comes last. Work is resumable: after every ``profile.checkpoint_every`` samples the running sum, counts and
elapsed time go to ``profile/.partial/<config hash>/partial_<N>.safetensors``, and a length whose influence file
exists for the same model fingerprint, block size, granularity, dtype and calibration file (SHA-256) is
skipped. Samples longer than the model's positions, or whose loss mask
selects no token, are skipped with a warning and counted (metric ``skipped_samples``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.io import atomic_path, save_tensors, write_json
from pipeline.profile.figures import long_range_heatmap
from pipeline.profile.influence import attention_influence
from pipeline.profile.loss import loss_targets
from pipeline.profile.stats import layer_summaries, long_range_fraction
from pipeline.settings import ProfileSettings
from pipeline.stages.registry import stage

log = logging.getLogger(__name__)



@stage("profile", requires=("calibrate",), config_keys=("sparse", "calibration", "profile"),
       outputs=("profile/",))
def run_profile(ctx):
    """Profile per-head attention influence at every profile length."""
    settings = ctx.settings.profile
    loaded = ctx.load_model()
    ctx.log_params({"block_size": settings.block_size, "granularity": settings.granularity,
                    "profile_lengths": list(settings.lengths), "profile_dtype": settings.dtype})
    if ctx.force:
        for path in ctx.stage_dir.glob("influence_*.safetensors"):
            path.unlink()
    results = {str(n): profile_length(ctx, loaded, n, settings) for n in settings.lengths}
    skipped = sum(r["skipped_samples"] for r in results.values())
    ctx.log_metrics({"skipped_samples": skipped})
    summary = {"model": loaded.info.name, "fingerprint": loaded.info.fingerprint, "block_size": settings.block_size,
               "granularity": settings.granularity, "lengths": results}
    write_json(ctx.artifacts.profile_summary, summary)
    return {"lengths": list(settings.lengths), "skipped_samples": skipped}


def profile_length(ctx, loaded, n: int, settings: ProfileSettings) -> dict:
    """Average influence at length ``n``, resuming from a partial file; returns this length's summary."""
    info = loaded.info
    source = ctx.artifacts.calibration(n)
    samples = ctx.artifacts.load_calibration(n)
    target = ctx.artifacts.influence(n)
    expected = {"fingerprint": str(info.fingerprint), "block_size": str(settings.block_size),
                "granularity": settings.granularity, "length": str(n), "dtype": settings.dtype,
                "calibration_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    done = _metadata(target)
    if done is not None and _matches(done, expected):
        log.info("profile: %s is up to date, skipping length %d", target, n)
        return _length_summary(ctx, load_file(target)["influence"], done, n, settings)

    count = samples["input_ids"].shape[0]
    heads = info.num_kv_heads if settings.granularity == "kv_head" else info.num_heads
    nb = math.ceil(n / settings.block_size)
    # The runner clears .partial/<other config hashes> (and all of it on force=true).
    partial_path = ctx.partial_dir / f"partial_{n}.safetensors"
    state = _load_partial(partial_path, expected) or {
        "total": torch.zeros(info.num_layers, heads, nb, nb, dtype=torch.float64),
        "next": 0, "used": 0, "skipped": 0, "seconds": 0.0,
    }

    model = loaded.model
    device = next(model.parameters()).device
    bar = ctx.progress(total=count, initial=state["next"], desc=f"profile N={n}")
    while state["next"] < count:
        start = time.perf_counter()
        for s in range(state["next"], min(count, state["next"] + settings.checkpoint_every)):
            influence = _sample_influence(model, samples, s, info.max_positions, settings, device, source)
            if influence is None:
                state["skipped"] += 1
            else:
                state["total"][..., : influence.shape[-2], : influence.shape[-1]] += influence.double().cpu()
                state["used"] += 1
            state["next"] = s + 1
            bar.update(1)
        state["seconds"] += time.perf_counter() - start
        _save_partial(partial_path, state, expected)
    bar.close()

    if state["used"] == 0:
        raise UserError(f"no usable calibration sample in {source} ({state['skipped']} skipped, see warnings); "
                        f"re-run stage=calibrate for length {n}")
    mean = (state["total"] / state["used"]).float()
    metadata = {**expected, "model": info.name, "samples": str(state["used"]),
                "skipped_samples": str(state["skipped"]), "seconds": f"{state['seconds']:.3f}",
                "peak_rss_mb": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}"}
    if torch.cuda.is_available():
        metadata["cuda_max_memory_mb"] = f"{torch.cuda.max_memory_allocated() / 2**20:.1f}"
    save_tensors(target, {"influence": mean}, metadata=metadata)
    partial_path.unlink()
    return _length_summary(ctx, mean, metadata, n, settings)


def _sample_influence(model, samples: dict, s: int, max_positions: int, settings: ProfileSettings, device,
                      source: Path) -> torch.Tensor | None:
    """Influence of sample ``s`` truncated to its real length, or None (with a warning) if it is unusable."""
    real = int(samples["lengths"][s])
    if 0 < max_positions < real:
        log.warning("profile: skipping sample %d of %s: %d tokens exceed the model's %d positions",
                    s, source, real, max_positions)
        return None
    mask = samples["loss_mask"][s, :real]
    if loss_targets(mask).numel() == 0:
        log.warning("profile: skipping sample %d of %s: its loss mask selects no response token", s, source)
        return None
    ids = samples["input_ids"][s, :real].to(device)
    # Tail padding is causal-invisible to the real tokens, so the sample is profiled at its real length;
    # blocks past it stay zero.
    return attention_influence(model, ids, mask.to(device), settings.block_size, settings.granularity,
                               settings.torch_dtype)


def _length_summary(ctx, influence: torch.Tensor, metadata: dict[str, str], n: int,
                    settings: ProfileSettings) -> dict:
    """Summary of one finished length (from its file metadata); logs metrics, per-layer rows and the heat-map."""
    min_distance = settings.long_range * n
    fractions = long_range_fraction(influence, settings.block_size, min_distance)  # (L, H)
    layers = layer_summaries(influence, settings.block_size, min_distance)
    summary = {"samples": int(metadata["samples"]), "skipped_samples": int(metadata["skipped_samples"]),
               "seconds": float(metadata["seconds"]), "peak_rss_mb": float(metadata["peak_rss_mb"]),
               "long_range_share": fractions.tolist(), "influence_mass": influence.sum((-1, -2)).tolist(),
               "layers": layers}
    metrics = {f"profile_seconds@{n}": summary["seconds"], f"samples@{n}": summary["samples"],
               f"skipped_samples@{n}": summary["skipped_samples"], f"peak_rss_mb@{n}": summary["peak_rss_mb"]}
    if "cuda_max_memory_mb" in metadata:
        summary["cuda_max_memory_mb"] = float(metadata["cuda_max_memory_mb"])
        metrics[f"cuda_max_memory_mb@{n}"] = summary["cuda_max_memory_mb"]
    ctx.log_metrics(metrics)
    for layer, row in enumerate(layers):
        ctx.log_metrics({f"layer_influence_mass@{n}": row["influence_mass"],
                         f"layer_long_range_share@{n}": row["long_range_share"]}, step=layer)
    figure = long_range_heatmap(fractions, n, min_distance)
    with atomic_path(ctx.artifacts.long_range_figure(n)) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    ctx.log_figure(figure, f"long_range_{n}.png")
    return summary


def _metadata(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _matches(metadata: dict[str, str], expected: dict[str, str]) -> bool:
    return all(metadata.get(k) == v for k, v in expected.items())


def _load_partial(path: Path, expected: dict[str, str]) -> dict | None:
    """Resume state from a partial file written under the same ``expected`` metadata, else None."""
    metadata = _metadata(path)
    if metadata is None or not _matches(metadata, expected):
        return None
    log.info("profile: resuming from %s at sample %s", path, metadata["next"])
    return {"total": load_file(path)["total"], "next": int(metadata["next"]), "used": int(metadata["used"]),
            "skipped": int(metadata["skipped"]), "seconds": float(metadata["seconds"])}


def _save_partial(path: Path, state: dict, expected: dict[str, str]) -> None:
    """Atomically write the running sum and counters, so an interrupted run resumes after the last batch."""
    metadata = {**expected, "next": str(state["next"]), "used": str(state["used"]),
                "skipped": str(state["skipped"]), "seconds": repr(state["seconds"])}
    save_tensors(path, {"total": state["total"]}, metadata=metadata)
