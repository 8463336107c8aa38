"""Heterogeneous Mixture of Adapters: compositions, experts, routers, attach/detach and save/load.

Library code: it imports nothing from Hydra, MLflow or the pipeline stages, and reports bad input as
``ValueError``. See :mod:`pipeline.adapters.attach` for how adapters enter a model.
"""

from pipeline.adapters.attach import (
    AdapterSet,
    adapters_detached,
    attach_adapters,
    base_fingerprint,
    decoder_layers,
    detach_adapters,
)
from pipeline.adapters.composition import (
    EXPERT_KINDS,
    IA3_TARGETS,
    LORA_TARGETS,
    ROUTER_KINDS,
    Composition,
    ExpertSpec,
    RouterSpec,
    composition_from_dict,
    validate_composition,
)
from pipeline.adapters.saving import adapter_digest, load_adapters, save_adapters

__all__ = [
    "EXPERT_KINDS", "IA3_TARGETS", "LORA_TARGETS", "ROUTER_KINDS", "AdapterSet", "Composition", "ExpertSpec",
    "RouterSpec", "adapter_digest", "adapters_detached", "attach_adapters", "base_fingerprint", "composition_from_dict",
    "decoder_layers", "detach_adapters", "load_adapters", "save_adapters", "validate_composition",
]
