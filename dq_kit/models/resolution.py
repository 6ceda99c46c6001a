"""Resolve a model reference (hub id, folder, config) to a config, an Auto class and a weightless skeleton.

Example:
    >>> import dq_kit as dq
    >>> config = dq.modeling.resolve_config("Qwen/Qwen2-VL-2B-Instruct")   # shipped, works offline
    >>> config.model_type
    'qwen2_vl'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ..errors import ModelNotFoundError, UnsupportedModelError
from ..files import read_json, recover_interrupted

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
_MIRROR_ORGS = ("unsloth",)


def shipped_config_path(hub_id: str) -> Path | None:
    """The config shipped with dq_kit for a hub id (``org/name``), or ``None``.

    Mirrors such as ``unsloth/<name>`` resolve to the shipped original of the same name.

    Example:
        >>> shipped_config_path("Qwen/Qwen2-VL-2B-Instruct").name
        'Qwen--Qwen2-VL-2B-Instruct.json'
    """
    if hub_id.count("/") != 1:
        return None
    exact = SHIPPED_CONFIGS / (hub_id.replace("/", "--") + ".json")
    if exact.is_file():
        return exact
    org, name = hub_id.split("/")
    if org.lower() in _MIRROR_ORGS:
        for candidate in sorted(SHIPPED_CONFIGS.glob("*--*.json")):
            if candidate.stem.split("--", 1)[1].lower() == name.lower():
                return candidate
    return None


def shipped_hub_ids() -> list[str]:
    """Hub ids whose configs ship with dq_kit (usable offline by :func:`dq_kit.estimate_memory`)."""
    return sorted(path.stem.replace("--", "/", 1) for path in SHIPPED_CONFIGS.glob("*--*.json"))


def config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    """Build the right config class from a ``config.json``-style dict."""
    model_type = data.get("model_type")
    if not model_type:
        raise UnsupportedModelError("The config has no `model_type`; dq_kit cannot tell its architecture.")
    try:
        return AutoConfig.for_model(**data)
    except ValueError as exc:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} does not know model_type={model_type!r}. "
            "Upgrade transformers, or pass trust_remote_code=True for a model with custom code."
        ) from exc


def local_or_hub(reference: str | os.PathLike) -> str:
    """The expanded path of an existing local folder, else the reference unchanged (a hub id)."""
    path = Path(os.fspath(reference)).expanduser()
    return os.fspath(path) if path.exists() else os.fspath(reference)


def looks_like_path(reference: str) -> bool:
    """Whether ``reference`` reads as a file-system path rather than a hub id (``owner/name``).

    Example:
        >>> looks_like_path("./my-model"), looks_like_path("Qwen/Qwen2-VL-2B-Instruct")
        (True, False)
    """
    return reference.startswith(("/", ".", "~")) or reference.count("/") != 1 or "\\" in reference


def resolve_config(
    reference: str | os.PathLike | PretrainedConfig | dict,
    *,
    trust_remote_code: bool = False,
    prefer_shipped: bool = False,
    gguf_file: str | None = None,
) -> PretrainedConfig:
    """The config for a hub id, a local folder, a config object or a config dict.

    ``prefer_shipped`` answers from dq_kit's shipped configs before asking the hub (used by the
    memory planner so that it works offline); ``gguf_file`` reads the config from a GGUF file in
    the folder or hub repository.

    Example:
        >>> resolve_config({"model_type": "llama", "hidden_size": 64}).hidden_size
        64
    """
    if isinstance(reference, PretrainedConfig):
        return reference
    if isinstance(reference, dict):
        return config_from_dict(reference)
    text = os.fspath(reference)
    path = Path(text).expanduser()
    if gguf_file is not None:
        return _gguf_config(local_or_hub(text), gguf_file)
    if not path.exists() and looks_like_path(text):
        recover_interrupted(path)  # a save killed while the old folder was moved aside
    if path.is_file():
        hint = (" For a GGUF file, pass its folder (or hub id) and gguf_file=: dq.load(folder, gguf_file=\"model.gguf\")."
                if path.suffix == ".gguf" else "")
        raise ModelNotFoundError(f"{path} is a file; pass the model folder that holds config.json ({path.parent}).{hint}")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json, so it is not a transformers model folder.")
        read_json(path / "config.json", "Model config", UnsupportedModelError)  # a corrupt local file: say so, not "check your network"
        return _load_config(path, trust_remote_code)
    if looks_like_path(text):
        raise ModelNotFoundError(f"No model folder at {text!r}. Check the path, or pass a hub id such as 'Qwen/Qwen2-VL-2B-Instruct'.")
    shipped = shipped_config_path(text)
    if prefer_shipped and shipped is not None:
        return _shipped(shipped)
    try:
        return _load_config(text, trust_remote_code)
    except ModelNotFoundError:
        if shipped is not None:
            return _shipped(shipped)
        raise


def _gguf_config(reference: str, gguf_file: str) -> PretrainedConfig:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise UnsupportedModelError("Reading a GGUF file needs the gguf package: pip install gguf") from None
    if Path(reference).is_dir() and not (Path(reference) / gguf_file).is_file():
        raise ModelNotFoundError(f"No GGUF file {gguf_file!r} in {reference}.")
    try:
        return AutoConfig.from_pretrained(reference, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"transformers cannot read a model config from {gguf_file!r} ({str(exc).splitlines()[0]}): "
                                    "it may be corrupt, or an architecture transformers does not load from GGUF.") from exc


def _shipped(path: Path) -> PretrainedConfig:
    return config_from_dict(json.loads(path.read_text(encoding="utf-8")))


def _load_config(reference: str | Path, trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(reference, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(
            f"Could not get the config of {str(reference)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Check the hub id and your network or hub login, or pass a local folder."
        ) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"{str(reference)!r} needs custom code from its repository. dq_kit does not run it unless you "
                "pass trust_remote_code=True (only do that for a repository you trust)."
            ) from exc
        raise UnsupportedModelError(f"transformers cannot read the config of {str(reference)!r}: {exc}") from exc


def auto_class(config: PretrainedConfig) -> type:
    """``AutoModelForImageTextToText`` for vision-language models, ``AutoModelForCausalLM`` for LMs.

    Example:
        >>> auto_class(resolve_config("Qwen/Qwen2-VL-2B-Instruct")).__name__
        'AutoModelForImageTextToText'
    """
    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) and not auto_map:
        raise UnsupportedModelError(
            f"model_type={config.model_type!r} is an encoder model (masked language modelling): loaded as a causal LM it would "
            "get a new, untrained head and generate noise. dq_kit loads decoder language models and vision-language models."
        )
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in auto_map:
        return transformers.AutoModelForImageTextToText
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
        return transformers.AutoModelForCausalLM
    raise UnsupportedModelError(
        f"model_type={config.model_type!r} is neither an image-text-to-text model nor a causal language model; "
        "dq_kit loads only those two kinds."
    )


def meta_model(config: PretrainedConfig, *, trust_remote_code: bool = False, buffers: bool = False) -> nn.Module:
    """The model skeleton on the meta device: every module and shape, no memory for weights.

    With ``buffers=True`` the buffers (rotary frequencies and the like, small and often not stored in
    checkpoints) are real tensors on the CPU; only the parameters are on the meta device.

    Example:
        >>> model = meta_model(resolve_config("Qwen/Qwen2-VL-2B-Instruct"))
        >>> next(model.parameters()).device.type
        'meta'
        >>> next(meta_model(resolve_config("Qwen/Qwen2-VL-2B-Instruct"), buffers=True).buffers()).device.type
        'cpu'
    """
    if buffers:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return auto_class(config).from_config(config, trust_remote_code=trust_remote_code)


def default_device_map() -> str | dict[str, int]:
    """The first GPU when there is one, else the CPU."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def default_dtype(device_map: Any = None) -> torch.dtype:
    """bf16 on a GPU that supports it, fp16 on older GPUs (T4), fp32 on the CPU."""
    on_cpu = device_map == "cpu" or (isinstance(device_map, dict) and set(map(str, device_map.values())) <= {"cpu"})
    if on_cpu or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def checkpoint_renamer(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """A function from a checkpoint's tensor key to ``(the live model's name, whether the tensor is merged or split)``,
    through transformers' own load-time key mapping (checkpoints of many families name modules
    ``language_model.model.layers.N``; the live model calls them ``model.language_model.layers.N``).

    Example:
        >>> import dq_kit as dq
        >>> rename = checkpoint_renamer(dq.tiny.build_tiny_model("llava"))
        >>> rename("language_model.model.layers.0.mlp.down_proj.weight")
        ('model.language_model.layers.0.mlp.down_proj.weight', False)
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # a transformers without these helpers: keys are used as stored
        return lambda key: (key, False)
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = model.state_dict()

    def rename(key: str) -> tuple[str, bool]:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        return name, converted is not None

    return rename


def live_module_name(rename: Callable[[str], tuple[str, bool]], checkpoint_name: str) -> str:
    """A module name as a checkpoint writes it, in the live model's naming (unchanged where the mapping does not apply).

    Example:
        >>> import dq_kit as dq
        >>> live_module_name(checkpoint_renamer(dq.tiny.build_tiny_model("gemma3")), "language_model.model.layers.1.mlp")
        'model.language_model.layers.1.mlp'
    """
    name, _ = rename(f"{checkpoint_name}.weight")
    return name.removesuffix(".weight")
