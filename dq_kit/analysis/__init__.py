"""``dq.analyze``: where 4-bit quantization hurts a model — weight error, activation error and output sensitivity.

Example:
    >>> import dq_kit as dq
    >>> model = dq.tiny.build_tiny_model("qwen2_vl")
    >>> report = dq.analyze(model, dq.default_calibration(n=2), dq.tiny.tiny_processor("qwen2_vl"), progress=False)
    >>> {"weight_error", "act_accum_error", "sensitivity"} <= set(report.table.columns)
    True
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import registry
from ..calibration import CalibrationSample, default_calibration, image_token_ids, prepare_calibration
from .activations import ActivationProbe, block_names, swapped
from .report import AnalysisError, QuantReport, build_report
from .sensitivity import FisherAccumulator, kl_sum, sample_labels, spearman, top1_agreement
from .weights import quantize_roundtrip, weight_metrics

__all__ = ["AnalysisError", "QuantReport", "analyze"]

METRICS = ("weight", "activation", "sensitivity")
ESTIMATORS = ("fisher", "loo", "both")


def analyze(
    model: nn.Module | str | os.PathLike,
    calibration: Iterable[Any] | None = None,
    processor: Any = None,
    metrics: Sequence[str] = METRICS,
    quant_type: str = "nf4",
    blocksize: int = 64,
    *,
    double_quant: bool = True,
    estimator: str = "fisher",
    sequential: bool = False,
    max_length: int | None = None,
    seed: int = 0,
    progress: bool = True,
    base_dir: str | os.PathLike | None = None,
) -> QuantReport:
    """Measure how 4-bit quantization (bitsandbytes NF4/FP4) affects every quantizable Linear of a model.

    Args:
        model: a 16-bit model (``dq.load(path, quant="16bit")``), or a local folder / hub id, which is
            loaded in 16-bit (or streamed block by block with ``sequential=True``). Not modified.
        calibration: strings, chat samples ``{"messages": [...], "images": [...]}`` or model-input
            dicts (see :mod:`dq_kit.calibration`); ``None`` uses :func:`dq_kit.default_calibration`.
        processor: the model's processor (VLM) or tokenizer (LM); loaded from the folder when
            ``model`` is a path.
        metrics: any of ``"weight"`` (weight error of the exact 4-bit round trip), ``"activation"``
            (local and accumulated output error of every Linear and block) and ``"sensitivity"``
            (KL to the 16-bit model's next-token distribution, in nats per scored token).
        quant_type: ``"nf4"`` or ``"fp4"``; ``blocksize`` and ``double_quant`` as in the 4-bit load.
        estimator: ``"fisher"`` (one forward+backward per sample: ½·Σ F⊙ΔW² with the Fisher of the
            model's own predictions), ``"loo"`` (exact leave-one-out KL, one forward per module and
            sample) or ``"both"`` (``sensitivity`` is Fisher, ``sensitivity_loo`` the exact value and
            ``meta["spearman_fisher_loo"]`` their rank correlation).
        sequential: hold one language-model layer at a time, reading 16-bit weights from the
            safetensors checkpoint (``model`` must then be a folder, or a hub id, which is
            downloaded); peak memory is about one layer, the embeddings and vision tower, and the
            calibration activations. Same numbers as the whole-model analysis (see
            :mod:`dq_kit.analysis.sequential`).
        max_length: truncate text-only calibration samples to this many tokens.
        seed: seed of the Fisher label sampling.
        progress: show ``tqdm`` progress bars.
        base_dir: folder that relative image paths in ``calibration`` are resolved against.

    Returns:
        A :class:`QuantReport` with one row per quantizable Linear (the output head is never
        quantized and is not listed), per-block activation errors, and metadata including the
        measured KL of uniform 4-bit vs 16-bit (``report.meta["kl_uniform"]``).

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> report = dq.analyze(model, ["A red circle.", "Two blue squares."], tok, progress=False)
        >>> bool(report.worst(1)["module"].str.startswith("model.layers").all())
        True
    """
    started = time.perf_counter()
    metrics = _check_options(metrics, quant_type, blocksize, estimator)
    if sequential:
        from .sequential import analyze_sequential

        return analyze_sequential(
            model, calibration, processor, metrics, quant_type, blocksize,
            double_quant=double_quant, estimator=estimator, max_length=max_length, seed=seed,
            progress=progress, base_dir=base_dir,
        )
    if isinstance(model, (str, os.PathLike)):
        from ..loading import load

        model, loaded_processor = load(model, quant="16bit", processor=processor is None)
        processor = processor if processor is not None else loaded_processor
    if not isinstance(model, nn.Module):
        raise AnalysisError(f"analyze expects a model (nn.Module) or a model folder, got {type(model).__name__}.")
    infos = quantizable_modules(model)
    modules = dict(model.named_modules())
    settings = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)

    weight_rows, issues, dequantized = {}, {}, {}
    need_forward = bool({"activation", "sensitivity"} & set(metrics))
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    for info in _bar(infos, progress, "Weights: 4-bit round trip"):
        weight = modules[info.name].weight
        deq, row, problem = measure_weight(weight, **settings)
        weight_rows[info.name] = row
        if problem:
            issues[info.name] = [problem]
        if need_forward:
            dequantized[info.name] = deq
    timings["weights_s"] = time.perf_counter() - tick
    if "weight" not in metrics:
        weight_rows = {}

    meta = _base_meta(model, settings, metrics, estimator, sequential=False)
    activations = None
    sensitivities: dict[str, dict[str, float]] = {}
    blocks: dict[str, list[str]] = {}
    if need_forward:
        samples = _prepare(calibration, processor, model.config, max_length, base_dir)
        blocks = block_names(model, [info.name for info in infos])
        tick = time.perf_counter()
        outcome = _calibration_pass(model, samples, dequantized, blocks, metrics, estimator, seed, progress)
        timings["calibration_pass_s"] = time.perf_counter() - tick
        if "activation" in metrics:
            activations = outcome["activations"]
        num_tokens = outcome["num_tokens"]
        meta.update(_kl_meta(samples, outcome))
        if "sensitivity" in metrics:
            if estimator in ("fisher", "both"):
                sensitivities["sensitivity"] = outcome["fisher"].scores(num_tokens)
            if estimator in ("loo", "both"):
                tick = time.perf_counter()
                loo = leave_one_out(model, samples, dequantized, progress)
                timings["leave_one_out_s"] = time.perf_counter() - tick
                sensitivities["sensitivity_loo" if estimator == "both" else "sensitivity"] = loo
            if estimator == "both":
                names = list(dequantized)
                meta["spearman_fisher_loo"] = spearman(
                    [sensitivities["sensitivity"][n] for n in names], [sensitivities["sensitivity_loo"][n] for n in names]
                )
    block_layers = _block_layers(blocks, infos)
    timings["total_s"] = time.perf_counter() - started
    meta["timing"] = timings
    report = build_report(infos, weight_rows, activations, sensitivities, issues, block_layers, meta, double_quant)
    if sensitivities:
        report.meta["sensitivity_sum"] = float(report.table["sensitivity"].sum())
    return report


# --------------------------------------------------------------------------------------------
# Pieces shared with the sequential mode
# --------------------------------------------------------------------------------------------


def quantizable_modules(model: nn.Module) -> list[registry.ModuleInfo]:
    """Linear modules a 4-bit load quantizes (all but the output head); errors on 4-bit or empty models.

    Example:
        >>> import dq_kit as dq
        >>> len(quantizable_modules(dq.tiny.build_tiny_model("llama")))
        14
    """
    from ..verification import is_quantized

    heads = set(registry.output_head_names(model))
    modules = dict(model.named_modules())
    quantized = [name for name, module in modules.items() if isinstance(module, nn.Linear) and is_quantized(module)]
    if quantized:
        raise AnalysisError(
            f"The model already has {len(quantized)} quantized layer(s) (e.g. {quantized[0]!r}); analyze needs the "
            "16-bit model: load it with dq.load(path, quant='16bit')."
        )
    infos = [info for info in registry.linear_modules(model) if info.name not in heads]
    if not infos:
        raise AnalysisError(
            f"The {type(model).__name__} model has no quantizable Linear layer (only the output head, or none at all): "
            "there is nothing for 4-bit quantization to change."
        )
    return infos


def measure_weight(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, dict[str, float], str | None]:
    """4-bit round trip of one weight, its metrics, and a problem description if it is not finite.

    A weight with NaN/inf values is reported (metrics NaN) and treated as unquantized downstream.

    Example:
        >>> deq, row, problem = measure_weight(torch.randn(64, 64), "nf4", 64, True)
        >>> problem is None and row["weight_rel_error"] < 0.12
        True
    """
    weight = weight.detach()
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        row = {column: float("nan") for column in ("weight_error", "weight_rel_error", "weight_max_abs_error",
                                                    "weight_outlier_ratio", "weight_kurtosis")}
        return weight, row, f"weight has {bad} non-finite value(s); left unquantized in the analysis"
    deq = quantize_roundtrip(weight, quant_type, blocksize, double_quant)
    return deq, weight_metrics(weight, deq), None


def _check_options(metrics: Sequence[str], quant_type: str, blocksize: int, estimator: str) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise AnalysisError(f"Unknown metric(s) {unknown!r}; choose from {METRICS}.")
    if quant_type not in ("nf4", "fp4"):
        raise AnalysisError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise AnalysisError(f"blocksize must be a power of two from 32 to 4096 (bitsandbytes uses 64), got {blocksize!r}.")
    if estimator not in ESTIMATORS:
        raise AnalysisError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    return metrics


def _bar(iterable: Iterable[Any], progress: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _prepare(calibration: Any, processor: Any, config: Any, max_length: int | None, base_dir: Any) -> list[CalibrationSample]:
    _check_fit(processor, config)
    if calibration is None:
        has_images = processor is not None and getattr(processor, "image_processor", None) is not None
        calibration = default_calibration(images=has_images)
    return prepare_calibration(calibration, processor, config, base_dir=base_dir, max_length=max_length)


def _check_fit(processor: Any, config: Any) -> None:
    """Refuse a processor that cannot belong to the model (image processor on a text model, other image token)."""
    if processor is None or getattr(processor, "image_processor", None) is None:
        return
    if getattr(config, "vision_config", None) is None:
        raise AnalysisError(
            f"The processor ({type(processor).__name__}) handles images but the {config.model_type!r} model is text-only: "
            "the processor does not belong to this model. Pass the model's tokenizer (dq.load returns the matching pair)."
        )
    wanted = {getattr(config, attr) for attr in ("image_token_id", "image_token_index") if isinstance(getattr(config, attr, None), int)}
    if wanted and not wanted & image_token_ids(processor):
        raise AnalysisError(
            f"The processor's image token is not the model's (image token id {sorted(wanted)[0]}): the processor "
            f"({type(processor).__name__}) does not belong to this {config.model_type!r} model."
        )


def _finite_rows(ref_logp: torch.Tensor) -> torch.Tensor:
    """Positions whose 16-bit distribution is finite (non-finite ones are counted, not scored)."""
    return torch.isfinite(ref_logp).all(dim=-1)


def _base_meta(model: Any, settings: dict[str, Any], metrics: Sequence[str], estimator: str, *, sequential: bool) -> dict[str, Any]:
    from .. import __version__
    from ..memory import footprint_bytes

    config = model.config
    heads = registry.output_head_names(model)
    quantizable = {info.name for info in registry.linear_modules(model)} - set(heads)
    return {
        "model_type": config.model_type,
        "family": registry.family_of(config).name,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "output_heads": heads,
        "bytes_16bit": footprint_bytes(model, set()),
        "bytes_4bit": footprint_bytes(model, quantizable, double_quant=settings.get("double_quant", True)),
        **settings,
        "metrics": list(metrics),
        "estimator": estimator if "sensitivity" in metrics else None,
        "sequential": sequential,
        "dq_kit_version": __version__,
        "torch_version": torch.__version__,
    }


def _kl_meta(samples: list[CalibrationSample], outcome: dict[str, Any]) -> dict[str, Any]:
    tokens = outcome["num_tokens"]
    return {
        "calibration_samples": len(samples),
        "calibration_tokens": sum(s.num_tokens for s in samples),
        "scored_tokens": tokens,
        "kl_uniform": outcome["kl"] / tokens if tokens else float("nan"),
        "top1_agreement": outcome["top1"] / tokens if tokens else float("nan"),
        "nonfinite_positions": outcome["nonfinite_positions"],
    }


def _block_layers(blocks: dict[str, list[str]], infos: list[registry.ModuleInfo]) -> dict[str, tuple[str, int | None]]:
    by_name = {info.name: info for info in infos}
    return {block: (by_name[linears[0]].tower, by_name[linears[0]].layer) for block, linears in blocks.items()}


def model_inputs(sample: CalibrationSample, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The sample's tensors on ``device``, floating ones (pixel values) in the model's ``dtype``."""
    out = {}
    for key, value in sample.inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        out[key] = value
    return out


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return weight.device, floating


@contextlib.contextmanager
def sample_errors(index: int) -> Iterator[None]:
    """Turn the model's own failure on calibration sample ``index`` into an :class:`AnalysisError` that says what to check."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
        raise AnalysisError(
            f"The model failed on calibration sample {index} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check that the processor belongs to this model (load both with dq.load) and that the sample fits it."
        ) from exc


def _forward_logits(model: nn.Module, inputs: dict[str, Any], index: int) -> torch.Tensor:
    with sample_errors(index):
        return model(**inputs, use_cache=False).logits[0]


def _calibration_pass(
    model: nn.Module,
    samples: list[CalibrationSample],
    dequantized: dict[str, torch.Tensor],
    blocks: dict[str, list[str]],
    metrics: Sequence[str],
    estimator: str,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Per sample: a 16-bit forward (+ backward for Fisher) and an all-4-bit forward, with hooks."""
    fisher_wanted = "sensitivity" in metrics and estimator in ("fisher", "both")
    device, dtype = _device_dtype(model)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in dequantized}
    fisher = FisherAccumulator(weights, dequantized)
    generator = torch.Generator().manual_seed(seed)
    probe = ActivationProbe(model, dequantized, blocks if "activation" in metrics else {}, local="activation" in metrics)
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    kl, top1, tokens, skipped = 0.0, 0, 0, 0
    try:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(fisher_wanted)
        with probe:
            for index, sample in enumerate(_bar(samples, progress, "Calibration: 16-bit vs 4-bit")):
                inputs = model_inputs(sample, device, dtype)
                mask = sample.score_mask.to(device)
                probe.new_sample()
                probe.mode = "reference" if "activation" in metrics else "off"
                with torch.set_grad_enabled(fisher_wanted):
                    logits = _forward_logits(model, inputs, index)[mask].float()
                    finite = _finite_rows(logits.detach())
                    logits = logits[finite]
                    ref_logp = torch.log_softmax(logits.detach(), dim=-1)
                    if fisher_wanted and len(logits):
                        labels = sample_labels(ref_logp, generator)
                        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
                        fisher.accumulate()
                del logits
                probe.mode = "quantized" if "activation" in metrics else "off"
                with torch.no_grad(), swapped(model, dequantized):
                    q_logits = _forward_logits(model, inputs, index)[mask].float()[finite]
                kl += float(kl_sum(ref_logp, q_logits))
                top1 += top1_agreement(ref_logp, q_logits)
                tokens += int(finite.sum())
                skipped += int((~finite).sum())
    finally:
        for param in model.parameters():
            param.requires_grad_(flags[id(param)])
            param.grad = None
        model.train(was_training)
    return {"activations": probe.results(), "fisher": fisher, "kl": kl, "top1": top1, "num_tokens": tokens, "nonfinite_positions": skipped}


def leave_one_out(
    model: nn.Module, samples: list[CalibrationSample], dequantized: dict[str, torch.Tensor], progress: bool = True
) -> dict[str, float]:
    """Exact sensitivity: mean per-token KL to the 16-bit model with only one module in 4-bit, for each module.

    Example:
        >>> import dq_kit as dq
        >>> from dq_kit.calibration import prepare_calibration
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> name = "model.layers.0.mlp.down_proj"
        >>> deq = {name: quantize_roundtrip(model.get_submodule(name).weight)}
        >>> leave_one_out(model, prepare_calibration(["A red circle."], tok), deq, progress=False)[name] > 0
        True
    """
    device, dtype = _device_dtype(model)
    totals = dict.fromkeys(dequantized, 0.0)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, sample in enumerate(_bar(samples, progress, "Leave-one-out KL")):
                inputs = model_inputs(sample, device, dtype)
                mask = sample.score_mask.to(device)
                ref_logp = torch.log_softmax(_forward_logits(model, inputs, index)[mask].float(), dim=-1)
                finite = _finite_rows(ref_logp)
                ref_logp = ref_logp[finite]
                for name, deq in dequantized.items():
                    with swapped(model, {name: deq}):
                        totals[name] += float(kl_sum(ref_logp, _forward_logits(model, inputs, index)[mask][finite]))
                tokens += int(finite.sum())
    finally:
        model.train(was_training)
    return {name: total / tokens if tokens else float("nan") for name, total in totals.items()}
