"""Dynamic 4-bit checkpoints: ``dq.save`` writes them, and the plan they carry is recovered on load.

A folder written by :func:`save` holds safetensors weights, a ``config.json`` whose
``quantization_config.llm_int8_skip_modules`` lists the 16-bit modules by exact full name (so plain
``transformers`` reloads the same dynamic model), ``dq_plan.json``, optionally ``dq_report.json``,
the processor, a model card ``README.md`` and, for a plan with low-rank corrections, the PEFT
adapter ``dq_correction/`` (``peft.PeftModel.from_pretrained(base, f"{path}/dq_correction")``).

Published transformers-4 era dynamic checkpoints carry substring-style skip lists (``["visual",
"lm_head"]``) that transformers 5 no longer matches as intended; :func:`plan_from_checkpoint`
expands them to exact names and :func:`prequantized_config` hands transformers a config with them.

Example:
    >>> import tempfile, dq_kit as dq
    >>> model = dq.quantize(dq.tiny.build_tiny_model("llama"))
    >>> path = dq.save(model, tempfile.mkdtemp() + "/tiny-dynamic")
    >>> sorted(p.name for p in path.iterdir())[:3]
    ['README.md', 'config.json', 'dq_plan.json']
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import DQError, PlanError, UnsupportedModelError
from ..files import Output, atomic_directory, atomic_write_text, read_json, write_json
from ..models import registry
from ..models.resolution import meta_model
from ..units import human_bytes
from .corrections import (
    ADAPTER_NAME,
    base_linears,
    base_model,
    has_corrections,
    plain_layers,
    read_factors,
    report_factors,
    save_correction_adapter,
)
from .memory import MemoryEstimate, estimate_memory, loaded_bytes
from .plan import Plan, live_patterns, selects_any
from .verification import is_quantized, verify

PLAN_FILE = "dq_plan.json"
REPORT_FILE = "dq_report.json"
CARD_FILE = "README.md"
CHECKPOINT = Output("model checkpoint", marker="config.json")


# ---- saving -------------------------------------------------------------------------------------


def save(
    model: PreTrainedModel,
    path: str | os.PathLike,
    plan: Plan | None = None,
    report: Any = None,
    processor: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint folder that plain transformers reloads as the same model.

    A 4-bit model is saved quantized (bitsandbytes serialisation) with the exact skip list in its
    config; a 16-bit model is saved as is, and its plan (if any) makes ``dq.load(path)`` quantize it
    dynamically on load. The folder is written next to ``path`` and renamed into place, so ``path``
    holds either the previous checkpoint or the complete new one, never half of one.

    Args:
        model: a transformers model (16-bit, or 4-bit from ``dq.load`` / ``dq.quantize``), or the
            PEFT model they return for a plan with corrections (its adapter goes to ``dq_correction/``).
        path: the checkpoint folder; an existing checkpoint there is replaced, anything else refused.
        plan: the model's plan; default ``model.dq_plan``, else read off the model's modules.
        report: anything with a ``save(path)`` method (a ``QuantReport``, a ``ComparisonResult``),
            stored as ``dq_report.json``; its ``summary`` table or ``metrics`` dict goes into the model card.
        processor: the processor or tokenizer to save alongside.
        overwrite: replace whatever ``path`` holds, even a folder that is not a checkpoint.

    Returns:
        The checkpoint folder.

    Example:
        >>> import tempfile, transformers, dq_kit as dq
        >>> model = dq.quantize(dq.tiny.build_tiny_model("qwen2_vl"))
        >>> path = dq.save(model, tempfile.mkdtemp() + "/ckpt", processor=dq.tiny.tiny_processor("qwen2_vl"))
        >>> reloaded = transformers.AutoModelForImageTextToText.from_pretrained(path, device_map="cpu")
        >>> type(reloaded.model.visual.blocks[0].attn.qkv).__name__
        'Linear4bit'
    """
    if adapters := sorted(set(getattr(base_model(model), "peft_config", None) or {}) - {ADAPTER_NAME}):
        raise DQError(
            f"This model carries LoRA adapter(s) {adapters} (dq.add_lora); dq.save writes the quantized model alone. Save the "
            "adapter with dq.save_adapter(peft_model, path), or merge it and save the result: "
            "dq.save(dq.requantize(dq.merge_to_16bit(peft_model)), path)."
        )
    corrected = has_corrections(model)
    if not isinstance(base_model(model), PreTrainedModel) or (not corrected and not isinstance(model, PreTrainedModel)):
        raise DQError(f"dq.save needs a transformers model, got {type(model).__name__} (merge or unwrap adapters first).")
    if corrected and base_model(model) is model:
        raise DQError("This model's low-rank corrections belong to the PEFT model dq.quantize / dq.load returned: save that one.")
    quantized = any(is_quantized(module) for module in model.modules())
    with plain_layers(model) as plain:
        plan = plan or getattr(plain, "dq_plan", None) or (_plan_of(plain) if quantized else None)
        if plan is not None:
            plan.check(plain)
    if plan is not None and quantized:
        verify(model, plan)
    if plan is not None and plan.corrections and not corrected and not report_factors(report):
        raise PlanError(
            f"The plan corrects {len(plan.corrections)} module(s) but neither the model nor report= carries the factors: "
            "pass the report from dq.analyze(..., corrections=True)."
        )
    with atomic_directory(path, CHECKPOINT, overwrite) as folder:  # refuses a foreign target before anything is written
        with plain_layers(model) as plain:
            plain.save_pretrained(folder)
        if corrected:
            save_correction_adapter(model, folder, Path(path).expanduser().resolve())
        if quantized:
            _write_exact_skip_list(folder / "config.json", plan)
        if processor is not None:
            processor.save_pretrained(folder)
        if plan is not None:
            plan.save(folder / PLAN_FILE)
        if report is not None:
            report.save(folder / REPORT_FILE)
        atomic_write_text(folder / CARD_FILE, model_card(base_model(model), plan, report))
    return Path(path).expanduser()


def _write_exact_skip_list(config_file: Path, plan: Plan) -> None:
    """Make the saved config list the 16-bit modules by exact name, whatever the model was loaded with."""
    data = read_json(config_file, "Model config")
    data["quantization_config"]["llm_int8_skip_modules"] = plan.skip_modules
    write_json(config_file, data)


def _plan_of(model: PreTrainedModel) -> Plan:
    """The plan a 4-bit model was built with, read off its modules (for models loaded without dq_kit)."""
    heads = set(registry.always_16bit(model))
    kept = [info.name for info in registry.linear_modules(model) if not is_quantized(model.get_submodule(info.name))]
    settings = _bnb_4bit_settings(model.config) or {}
    return Plan(
        keep=tuple(set(kept) - heads),
        fixed=tuple(heads),
        model_type=model.config.model_type,
        family=registry.family_of(model.config).name,
        identity=registry.model_identity(model.config),
        quant_type=settings.get("bnb_4bit_quant_type", "nf4"),
        double_quant=bool(settings.get("bnb_4bit_use_double_quant", True)),
        source="model",
    )


# ---- model card ---------------------------------------------------------------------------------


def model_card(model: PreTrainedModel, plan: Plan | None, report: Any = None) -> str:
    """Markdown model card: sizes (16-bit, NF4, this plan, measured), kept modules, provenance, metrics.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.quantize(dq.tiny.build_tiny_model("llama"))
        >>> [line for line in model_card(model, model.dq_plan).splitlines() if line.startswith("# ")][0]
        '# llama — dynamic 4-bit (dq_kit)'
    """
    skeleton = _skeleton(model.config)
    quantized = any(is_quantized(module) for module in model.modules())
    name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    lines = [
        "---",
        "library_name: transformers",
        "tags: [dq_kit, bitsandbytes, 4-bit, dynamic-quantization]",
        *([f"base_model: {name}"] if "/" in name and not os.path.isabs(name) else []),
        "---",
        "",
        f"# {name} — {'dynamic 4-bit' if quantized else '16-bit'} (dq_kit)",
        "",
    ]
    if plan is None:
        lines += ["16-bit weights without a quantization plan.", ""]
    else:
        estimate = estimate_memory(skeleton, plan)
        settings = f"{plan.quant_type.upper()}{' + double quantization' if plan.double_quant else ''}"
        lines += [
            f"Family **{plan.family or registry.family_of(model.config).name}** (model_type `{model.config.model_type}`), "
            f"plan source **{plan.source}**, {settings}: {len(plan.keep)} module(s) kept in 16-bit besides the output head.",
            "",
            *([] if quantized else ["The weights here are 16-bit; `dq.load(path)` quantizes them with `dq_plan.json` on load.", ""]),
            *_size_table(estimate, loaded_bytes(model), model.dtype),
            "",
            "## Modules kept in 16-bit",
            "",
            *([f"- `{module}`{_reason(plan, module)}" for module in plan.keep] or ["- none (plain NF4 apart from the output head)"]),
            f"- output head (always): {', '.join(f'`{head}`' for head in plan.fixed) or 'none'}",
            "",
        ]
    metrics = _metrics_markdown(report)
    if metrics:
        lines += ["## Quality", "", *metrics, ""]
    auto = "AutoModelForImageTextToText" if registry.family_of(model.config).kind == "vlm" else "AutoModelForCausalLM"
    lines += [
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("<this folder or repo>", device_map="auto")',
        "# or, verified against dq_plan.json:",
        "import dq_kit as dq",
        'model, processor = dq.load("<this folder or repo>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _size_table(estimate: MemoryEstimate, measured: int, dtype: torch.dtype) -> list[str]:
    rows = [
        ("16-bit (estimate, 2 bytes per parameter)", estimate.bytes_16bit),
        ("NF4 on every Linear but the output head (estimate)", estimate.bytes_4bit),
        (f"this plan (estimate, {estimate.plan_overhead:+.1%} over NF4)", estimate.bytes_plan),
        (f"this model as saved (measured, live dtype {str(dtype).removeprefix('torch.')})", measured),
    ]
    return ["| Description | Size |", "|---|---|", *(f"| {label} | {human_bytes(size)} |" for label, size in rows)]


def _reason(plan: Plan, module: str) -> str:
    reason = plan.reasons.get(module)
    return f" — {', '.join(f'{k}: {v}' for k, v in reason.items())}" if reason else ""


def _metrics_markdown(report: Any) -> list[str]:
    """A markdown table of ``report.summary`` (a DataFrame) or ``report.metrics`` (a dict), if present."""
    summary = getattr(report, "summary", None)
    if summary is not None and hasattr(summary, "columns"):
        header = [str(c) for c in summary.columns]
        body = [[_cell(v) for v in row] for row in summary.itertuples(index=False)]
    elif isinstance(getattr(report, "metrics", None), dict):
        header, body = ["metric", "value"], [[str(k), _cell(v)] for k, v in report.metrics.items()]
    else:
        return []
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in body)]


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


# ---- loading ------------------------------------------------------------------------------------


def plan_from_checkpoint(
    config: PretrainedConfig, skeleton: nn.Module, reference: str | os.PathLike | None = None
) -> Plan | None:
    """The plan a checkpoint carries: its ``dq_plan.json`` (folders written by :func:`save`), else
    the exact modules its bitsandbytes 4-bit ``llm_int8_skip_modules`` meant, else ``None``.

    Skip lists of published transformers-4 era checkpoints are substrings (``"visual"``); they are
    expanded with :meth:`Plan.from_patterns`, which warns. Patterns that match no Linear module
    (names from older module layouts) are dropped with a warning, as transformers ignores them too.

    Args:
        config: the checkpoint's config (``dq_kit.models.resolution.resolve_config(path)``).
        skeleton: the model built from it on the meta device (``dq_kit.models.resolution.meta_model(config)``).
        reference: the checkpoint folder or hub id, to find ``dq_plan.json`` (also in the hub cache).

    Raises:
        UnsupportedModelError: the checkpoint is quantized with something other than bitsandbytes 4-bit.

    Example:
        >>> import dq_kit as dq
        >>> skeleton = dq.tiny.build_tiny_model("qwen2_vl")
        >>> config = dq.tiny.tiny_config("qwen2_vl")
        >>> config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True,
        ...                               "llm_int8_skip_modules": ["merger", "lm_head"]}
        >>> plan_from_checkpoint(config, skeleton).keep        # warns: "merger" matches only as a substring
        ('model.visual.merger.mlp.0', 'model.visual.merger.mlp.2')
    """
    saved = checkpoint_file(reference, PLAN_FILE) if reference is not None else None
    if saved is not None:
        return Plan.load(saved)
    settings = _bnb_4bit_settings(config)
    if settings is None:
        return None
    patterns = settings.get("llm_int8_skip_modules")
    if patterns is None:
        plan = Plan.uniform(skeleton)
    else:
        names = [info.name for info in registry.linear_modules(skeleton)]
        # published skip lists may name modules as the checkpoint stores them: from_patterns translates those
        live = live_patterns(skeleton, names, patterns)
        usable = [pattern for pattern, translated in zip(patterns, live, strict=True) if selects_any(translated, names)]
        if len(usable) < len(patterns):
            warnings.warn(
                f"The checkpoint's skip list names {sorted(set(patterns) - set(usable))!r}, which match no Linear module of "
                f"this {config.model_type} model (older module names?); ignoring them.",
                stacklevel=2,
            )
        plan = Plan.from_patterns(skeleton, usable) if usable else Plan.uniform(skeleton)
    return replace(
        plan,
        quant_type=settings.get("bnb_4bit_quant_type", "nf4"),
        double_quant=bool(settings.get("bnb_4bit_use_double_quant", False)),
        source="checkpoint",
    )


def prequantized_config(
    config: PretrainedConfig, plan: Plan | None, stored: Plan | None, dtype: torch.dtype
) -> PretrainedConfig | None:
    """For a checkpoint whose weights are already 4-bit, a copy of ``config`` whose skip list is the
    plan's exact module names (pass it as ``from_pretrained(..., config=...)``); ``None`` for a
    16-bit checkpoint.

    A 4-bit checkpoint loads only as it was saved, so a ``plan`` other than the ``stored`` one (or a
    16-bit load, ``plan=None``) raises :class:`PlanError`.

    Example:
        >>> import dq_kit as dq
        >>> prequantized_config(dq.tiny.tiny_config("llama"), None, None, torch.float32) is None
        True
    """
    settings = _bnb_4bit_settings(config)
    if settings is None:
        return None
    if plan is None:
        raise PlanError(
            "This checkpoint is already quantized (bitsandbytes 4-bit), so it cannot load in 16-bit. "
            "Load it with quant='dynamic' (its own plan), or load the 16-bit original."
        )
    if stored is not None and set(plan.skip_modules) != set(stored.skip_modules):
        changed = sorted(set(plan.skip_modules) ^ set(stored.skip_modules))
        raise PlanError(
            f"This checkpoint is already quantized and keeps {len(stored.skip_modules)} module(s) in 16-bit; the requested "
            f"plan differs on {len(changed)} module(s) (e.g. {changed[0]!r}). A 4-bit checkpoint loads only as saved: pass "
            "plan=None with quant='dynamic', or load the 16-bit original with this plan."
        )
    config = copy.deepcopy(config)
    config.quantization_config = {
        **settings,
        "llm_int8_skip_modules": plan.skip_modules,
        "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
    }
    return config


def saved_report_factors(reference: str | os.PathLike, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Correction factors of the report saved in a checkpoint (``dq_report.json`` and its
    ``.corrections.safetensors``), checked against ``model``; ``None`` when there are none.

    Example:
        >>> import dq_kit as dq
        >>> saved_report_factors(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), dq.tiny.build_tiny_model("llama")) is None
        True
    """
    report_file = checkpoint_file(reference, REPORT_FILE)
    if report_file is None:
        return None
    name = (read_json(report_file, "Report").get("meta") or {}).get("corrections_file")
    if not name:
        return None
    shapes = {key: (layer.out_features, layer.in_features) for key, layer in base_linears(model).items()}
    return read_factors(checkpoint_file(reference, name) or Path(report_file).parent / name, shapes)


def checkpoint_file(reference: str | os.PathLike, filename: str) -> str | None:
    """Path of ``filename`` in a local folder or a hub repository (downloaded or cached), else ``None``.

    Example:
        >>> import dq_kit as dq
        >>> checkpoint_file(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), "missing.json") is None
        True
    """
    from transformers.utils import cached_file

    return cached_file(
        os.fspath(reference), filename, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
    )


def _bnb_4bit_settings(config: PretrainedConfig) -> dict[str, Any] | None:
    """The checkpoint's bitsandbytes 4-bit quantization config as a dict; ``None`` if it has none."""
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return None
    settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    method = str(settings.get("quant_method", "")).rsplit(".", 1)[-1].lower()
    if method not in ("bitsandbytes", "bits_and_bytes") or not settings.get("load_in_4bit"):
        kind = "bitsandbytes 8-bit" if settings.get("load_in_8bit") else (method or "an unknown method")
        raise UnsupportedModelError(
            f"This checkpoint is quantized with {kind}; dq_kit loads 16-bit checkpoints and bitsandbytes 4-bit ones."
        )
    return settings


def _skeleton(config: PretrainedConfig) -> nn.Module:
    """The unquantized model on the meta device (for size estimates of a 4-bit model)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return meta_model(config)
