"""``dq.add_lora``: LoRA adapters on chosen towers and module kinds, for 4-bit, dynamic and 16-bit models.

Targets are exact full module names taken from the registry (``dq.registry.linear_modules``), so
the same call works for every family and never depends on PEFT's suffix matching.

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="dynamic")
    >>> peft_model = dq.add_lora(model, r=8, vision=False)          # doctest: +ELLIPSIS
    trainable params: ...
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from ..errors import DQError
from ..models.registry import ModuleInfo, linear_modules
from ..quant.corrections import has_corrections, plain_layers, strip_corrections
from ..quant.verification import is_quantized
from .cpu_repacking import make_4bit_trainable

_ATTENTION_GROUPS = {"vision_attention", "language_attention", "cross_attention"}
_MLP_GROUPS = {"vision_mlp", "language_mlp", "projector"}
_VISION_TOWERS = {"vision", "projector"}


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def lora_targets(
    model: nn.Module,
    vision: bool = True,
    language: bool = True,
    attention: bool = True,
    mlp: bool = True,
    target_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Full names of the Linear modules :func:`add_lora` would adapt (the output head never).

    The vision side is the vision encoder plus the projector (the projector counts as an MLP);
    cross-attention layers count as language attention. ``target_modules`` narrows the choice to
    names ending in one of the given suffixes (``["q_proj", "v_proj"]``) or fully matching a regex.

    Example:
        >>> import dq_kit as dq
        >>> lora_targets(dq.tiny.build_tiny_model("qwen2_vl"), language=False, mlp=False)
        ['model.visual.blocks.0.attn.qkv', 'model.visual.blocks.0.attn.proj', 'model.visual.blocks.1.attn.qkv', 'model.visual.blocks.1.attn.proj']
    """

    def chosen(info: ModuleInfo) -> bool:
        tower_ok = (vision and info.tower in _VISION_TOWERS) or (language and info.tower == "language")
        kind_ok = (attention and info.group in _ATTENTION_GROUPS) or (mlp and info.group in _MLP_GROUPS)
        return tower_ok and kind_ok and (target_modules is None or _matches(info.name, target_modules))

    return [info.name for info in linear_modules(model) if chosen(info)]


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.0,
    vision: bool = True,
    language: bool = True,
    attention: bool = True,
    mlp: bool = True,
    target_modules: str | Sequence[str] | None = None,
    gradient_checkpointing: bool = True,
    seed: int = 0,
    init: str = "correction",
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model on the chosen towers and module kinds; print the trainable count.

    On a model that carries low-rank error corrections (``dq.load(..., plan=plan, report=report)``
    with ``plan.corrections``), ``init="correction"`` (default) starts the trainable adapter from
    them: a corrected module gets rank ``max(r, correction rank)``, its first components hold the
    correction and the rest start as in standard LoRA (B = 0), so step 0 is the corrected model, not
    plain NF4; corrected modules outside the selection keep their correction, frozen, in the same
    adapter. ``init="standard"`` drops the corrections and starts today's QLoRA init on NF4.

    Works alike on 4-bit (``Linear4bit``) and 16-bit layers of a dynamic model. A quantized model
    goes through PEFT's ``prepare_model_for_kbit_training`` first (base weights frozen; its
    non-4-bit parameters are upcast to fp32, as PEFT does for QLoRA) and
    :func:`make_4bit_trainable`. Gradient checkpointing
    (non-reentrant) and input gradients are switched on.

    Args:
        model: a model from :func:`dq_kit.load` (any precision).
        r, alpha, dropout: LoRA rank, scaling numerator (``alpha / r``) and dropout.
        vision, language: adapt the vision side (encoder + projector) and/or the language model.
        attention, mlp: adapt attention (self- and cross-attention) and/or MLP layers.
        target_modules: optional narrowing, see :func:`lora_targets`.
        gradient_checkpointing: trade compute for activation memory while training.
        seed: seeds the adapters' random initialisation (the global RNG is left untouched).
        init: ``"correction"`` or ``"standard"`` (see above; the same on a model without corrections).

    Raises:
        DQError: the selection matches no module, or the model already carries adapters.

    Example:
        >>> import dq_kit as dq
        >>> model, _ = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="4bit", processor=False)
        >>> peft_model = dq.add_lora(model, r=4, mlp=False)       # doctest: +ELLIPSIS
        trainable params: ...
        >>> sorted(peft_model.peft_config["default"].target_modules)[0]
        'model.layers.0.self_attn.k_proj'
    """
    if init not in ("correction", "standard"):
        raise DQError(f"init must be 'correction' or 'standard', got {init!r}.")
    if isinstance(model, PeftModel) and not has_corrections(model):
        raise DQError("The model already has LoRA adapters; pass the base model, or keep training this one.")
    with plain_layers(model) as plain:
        targets = lora_targets(plain, vision=vision, language=language, attention=attention, mlp=mlp, target_modules=target_modules)
        groups = sorted({info.group for info in linear_modules(plain)})
    if not targets:
        raise DQError(
            f"add_lora selected no module (vision={vision}, language={language}, attention={attention}, mlp={mlp}, "
            f"target_modules={target_modules!r}). This model's Linear groups are: {', '.join(groups)}. "
            "Switch on at least one tower and one module kind present in the model."
        )
    model, corrections = strip_corrections(model)  # validated above: from here on the model changes
    if init == "standard":
        corrections = {}
    checkpoint_kwargs = {"use_reentrant": False}
    if any(is_quantized(module) for module in model.modules()):
        make_4bit_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        model.enable_input_require_grads()
    # trained modules get max(r, correction rank); frozen ones (outside the selection) exactly the correction's rank
    ranks = {name: max(r, int(a.shape[0])) if name in targets else int(a.shape[0]) for name, (a, _) in corrections.items()}
    patterns = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(set(targets) | set(corrections)), bias="none",
        task_type="CAUSAL_LM", rank_pattern=patterns, alpha_pattern={key: alpha * rank / r for key, rank in patterns.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    _start_from(peft_model, corrections, frozen=set(corrections) - set(targets))
    peft_model.print_trainable_parameters()
    return peft_model


def _start_from(peft_model: PeftModel, corrections: dict[str, tuple[torch.Tensor, torch.Tensor]], frozen: set[str]) -> None:
    """Put each correction in the leading components of its module's adapter (B·A·scale = correction);
    modules in ``frozen`` (outside the user's selection) keep it without training it."""
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, (a, b) in corrections.items():
            layer = inner.get_submodule(name)
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            rank = a.shape[0]
            lora_a[:rank].copy_(a.to(lora_a.dtype))
            lora_b.zero_()
            lora_b[:, :rank].copy_((b.float() / layer.scaling["default"]).to(lora_b.dtype))
            if name in frozen:
                lora_a.requires_grad_(False)
                lora_b.requires_grad_(False)
