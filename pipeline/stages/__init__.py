"""Pipeline stages. Each module registers itself with :func:`pipeline.stages.registry.stage`."""

import importlib
import importlib.util

_STAGE_MODULES = ("calibrate", "profile", "rules", "optimize", "validate", "evaluate", "benchmark", "adapters")


def load_all() -> None:
    """Import every stage module that exists; stages not yet written are simply absent from the registry."""
    for name in _STAGE_MODULES:
        module = f"pipeline.stages.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
