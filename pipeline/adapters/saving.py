"""Save and load an :class:`~pipeline.adapters.attach.AdapterSet`: weights, composition and the base it belongs to.

A saved adapter is a directory with ``adapters.safetensors`` (the set's ``state_dict``) and ``adapter_config.json``
``{format_version, composition, base_fingerprint, adapter_digest}``. It is written to a temporary sibling and moved
into place with ``os.replace``, so a reader never sees half an adapter. The digest (:func:`adapter_digest`) is a
sha256 over the sorted tensor names, dtypes, shapes and bytes; loading recomputes it and refuses a mismatch, and
refuses a base model whose fingerprint differs from the one recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.adapters.attach import AdapterSet, attach_adapters, detach_adapters
from pipeline.adapters.composition import composition_from_dict

FORMAT_VERSION = "moa-adapters/1"
WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_digest(adapter_set: AdapterSet) -> str:
    """16 hex digits of sha256 over the set's tensors (sorted by name: name, dtype, shape, bytes)."""
    return tensors_digest(adapter_set.state_dict())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapters(adapter_set: AdapterSet, directory, *, base_fingerprint: str) -> str:
    """Write ``adapter_set`` to ``directory`` (replacing an earlier adapter there); returns its digest."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or set(os.listdir(directory)) - {WEIGHTS_FILE, CONFIG_FILE}):
        raise ValueError(f"{directory} exists and is not an adapter directory; refusing to replace it")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter_set.state_dict().items()}
    digest = tensors_digest(tensors)
    config = {"format_version": FORMAT_VERSION, "composition": adapter_set.composition.to_dict(),
              "base_fingerprint": str(base_fingerprint), "adapter_digest": digest}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format_version": FORMAT_VERSION})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old / "adapter")
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return digest


def read_adapter_config(directory) -> dict:
    """The ``adapter_config.json`` of a saved adapter; ``ValueError`` if missing, unreadable or of another format."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read adapter config {path}: {err}") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT_VERSION} adapter config")
    return config


def load_adapters(model: torch.nn.Module, directory, *, base_fingerprint: str) -> AdapterSet:
    """Attach the adapter saved in ``directory`` to ``model``, whose base fingerprint the caller gives.

    Refuses (``ValueError``) a fingerprint other than the recorded one, tensors whose digest is not the recorded
    one, and tensors that do not match the composition's parameters exactly (names and shapes)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    if config.get("base_fingerprint") != base_fingerprint:
        raise ValueError(f"adapter in {directory} was trained on base model {config.get('base_fingerprint')!r}, "
                         f"not on this model ({base_fingerprint!r}): fingerprint mismatch")
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from None
    digest = tensors_digest(tensors)
    if digest != config.get("adapter_digest"):
        raise ValueError(f"adapter weights in {directory} have digest {digest}, but {config.get('adapter_digest')} "
                         "was recorded: the file is corrupted or was changed")
    adapter_set = attach_adapters(model, composition_from_dict(config["composition"]))
    try:
        with torch.no_grad():
            adapter_set.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        detach_adapters(model)
        raise ValueError(f"adapter weights in {directory} do not fit its composition: {str(err).splitlines()[0]}") from None
    return adapter_set
