"""A digest of the source code a stage runs: its module and every project module it imports, transitively.

It goes into the stage's resume key, so artifacts made by older code are not reused after that code changes,
while a change to an unrelated module (say the benchmark harness, or the MLflow logging) does not redo
calibration.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util

PROJECT_PACKAGES = ("pipeline", "kernels")
# Modules that log, orchestrate or report, but shape no artifact: a change to them redoes nothing.
NOT_RESULT_CODE = frozenset({"pipeline.tracking", "pipeline.plan_runs", "pipeline.context", "pipeline.report",
                             "pipeline.runner", "pipeline.code_digest"})
# Modules whose own source counts but whose imports are not followed: the settings checks import every section's
# vocabulary (task names, backends, the adapter search space) only to validate values; the stages that use those
# modules import them themselves. Following them would make the adapter library part of calibration's key.
SOURCE_ONLY = frozenset({"pipeline.settings"})


@functools.cache
def source_digest(module: str) -> str:
    """SHA-256 (12 hex digits) over the sources of ``module`` and its project imports, in a stable order."""
    digest = hashlib.sha256()
    for name in sorted(_closure(module)):
        digest.update(name.encode())
        digest.update(_source(name))
    return digest.hexdigest()[:12]


def _closure(root: str) -> set[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RESULT_CODE or _origin(name) is None:
            continue
        seen.add(name)
        if name not in SOURCE_ONLY:
            todo.extend(_project_imports(name))
    return seen


@functools.cache
def _origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _source(module: str) -> bytes:
    with open(_origin(module), "rb") as handle:
        return handle.read()


def _project_imports(module: str) -> list[str]:
    """Project modules named by any import statement in ``module`` (including imports inside functions)."""
    tree = ast.parse(_source(module))
    package = module if _origin(module).endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]  # ``from pkg import module``
    names = set()
    for name in found:
        parts = name.split(".")
        if parts[0] in PROJECT_PACKAGES:
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # parents' __init__ run too
    return sorted(names)
