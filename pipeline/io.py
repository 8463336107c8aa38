"""Atomic artifact writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Artifacts get the mode an ordinary ``open()`` would give (0666 minus the umask), not mkstemp's private 0600.
_FILE_MODE = 0o666 & ~_process_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | os.PathLike, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def save_tensors(target: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomic ``safetensors.torch.save_file``."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def tensors_saved_for(path: str | os.PathLike, config_hash: str) -> bool:
    """True when the safetensors file at ``path`` exists and was saved with metadata ``config_hash``."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("config_hash") == config_hash


def write_parquet(target: str | os.PathLike, frame) -> None:
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(target: str | os.PathLike, frame) -> None:
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
