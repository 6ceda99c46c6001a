"""``dq.analyze`` on a model held whole in memory: the 4-bit round trip of every weight, one calibration
pass (16-bit forward + backward for Fisher, all-4-bit forward) and, on request, exact leave-one-out.

Example:
    >>> import dq_kit as dq
    >>> model = dq.tiny.build_tiny_model("qwen2_vl")
    >>> report = dq.analyze(model, dq.tiny.tiny_processor("qwen2_vl"), dq.default_calibration(n=2), progress=False)
    >>> {"weight_error", "act_accum_error", "sensitivity"} <= set(report.table.columns)
    True
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arguments import processor_second
from ..data.calibration import CalibrationSample
from ..errors import AnalysisError
from ..progress import progress_bar
from ..quant.loading import load
from ..quant.memory import estimate_memory
from ..quant.task_memory import available_bytes
from ..units import human_bytes
from .activations import ActivationProbe, block_names, swapped
from .common import (
    METRICS,
    base_meta,
    check_correction_options,
    check_finite_weights,
    check_options,
    check_weights_in_memory,
    device_dtype,
    finite_rows,
    forward_logits,
    kl_meta,
    model_inputs,
    prepare_samples,
    quantizable_modules,
    tower_and_layer_of_blocks,
)
from .corrections import DEFAULT_RANKS, fit_corrections
from .report import FULL_SENSITIVITY, QuantReport, build_report
from .sensitivity import FisherAccumulator, kl_sum, sample_labels, spearman, top1_agreement
from .sequential import analyze_sequential
from .weights import QuantizedWeights, weight_metrics

__all__ = ["analyze", "leave_one_out"]


def analyze(
    model: nn.Module | str | os.PathLike,
    processor: Any = None,
    calibration: Iterable[Any] | None = None,
    metrics: Sequence[str] = METRICS,
    quant_type: str = "nf4",
    blocksize: int = 64,
    *,
    double_quant: bool = True,
    estimator: str = "fisher",
    sequential: bool | str = "auto",
    corrections: bool = False,
    ranks: Sequence[int] = DEFAULT_RANKS,
    max_length: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    base_dir: str | os.PathLike | None = None,
) -> QuantReport:
    """Measure how 4-bit quantization (bitsandbytes NF4/FP4) affects every quantizable Linear of a model.

    Args:
        model: a 16-bit model (``dq.load(path, quant="16bit")``), or a local folder / hub id, which is
            loaded in 16-bit (or streamed block by block with ``sequential=True``). Not modified.
        processor: the model's processor (VLM) or tokenizer (LM); loaded from the folder when
            ``model`` is a path. Second, as in every dq_kit function (the older order
            ``analyze(model, calibration, processor)`` still works, with a ``FutureWarning``).
        calibration: strings, chat samples ``{"messages": [...], "images": [...]}`` or model-input
            dicts (see :mod:`dq_kit.data.calibration`); ``None`` uses :func:`dq_kit.default_calibration`.
        metrics: any of ``"weight"`` (weight error of the exact 4-bit round trip), ``"activation"``
            (local and accumulated output error of every Linear and block) and ``"sensitivity"``
            (KL to the 16-bit model's next-token distribution, in nats per scored token).
        quant_type: ``"nf4"`` or ``"fp4"``; ``blocksize`` and ``double_quant`` as in the 4-bit load.
        estimator: ``"fisher"`` (one forward+backward per sample: ½·Σ F⊙ΔW² with the Fisher of the
            model's own predictions), ``"loo"`` (exact leave-one-out KL, one forward per module and
            sample) or ``"both"`` (``sensitivity`` is Fisher, ``sensitivity_loo`` the exact value and
            ``meta["spearman_fisher_loo"]`` their rank correlation).
        sequential: ``True`` holds one language-model layer at a time, reading 16-bit weights from
            the safetensors checkpoint (``model`` must then be a folder, or a hub id, which is
            downloaded); peak memory is about one layer, the embeddings and vision tower, and the
            calibration activations. Same numbers as the whole-model analysis (see
            :mod:`dq_kit.analysis.sequential`). ``"auto"`` (default) analyses a folder or hub id
            sequentially when the predicted whole-model need (:func:`dq_kit.estimate_memory` with
            ``task="analyze"``) exceeds the free device memory, and says so; a loaded model is
            analysed whole.
        corrections: also fit, for every quantizable Linear, the activation-weighted low-rank
            correction of its 4-bit error (see :mod:`dq_kit.analysis.corrections`) and record its
            bf16 factors (``report.corrections``), the module's KL under the full Fisher quadratic
            form (``sensitivity_full``) and, per rank of ``ranks``, the part of it the correction
            removes (``gain_r<rank>`` columns), so that :func:`dq_kit.plan` can choose NF4 + correction. Needs
            the ``"sensitivity"`` metric with the Fisher estimator; costs one extra no-grad pass
            over the calibration set per group of modules whose input second moments fit in 1 GiB.
        ranks: the correction menu (each capped at ``min(in, out)``); default ``(4, 8, 16, 32, 64)``.
        max_length: truncate text-only calibration samples to this many tokens.
        seed: seed of the Fisher label sampling.
        progress: show ``tqdm`` progress bars (default: the global ``DQ_PROGRESS`` setting, see :mod:`dq_kit.progress`).
        base_dir: folder that relative image paths in ``calibration`` are resolved against.

    Returns:
        A :class:`QuantReport` with one row per quantizable Linear (the output head is never
        quantized and is not listed), per-block activation errors, and metadata including the
        measured KL of uniform 4-bit vs 16-bit (``report.meta["kl_uniform"]``).

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> report = dq.analyze(model, tok, ["A red circle.", "Two blue squares."], progress=False)
        >>> bool(report.worst(1)["module"].str.startswith("model.layers").all())
        True
    """
    started = time.perf_counter()
    processor, calibration = processor_second(processor, calibration, "analyze")
    metrics = check_options(metrics, quant_type, blocksize, estimator)
    ranks = check_correction_options(corrections, ranks, metrics, estimator)
    if sequential == "auto":
        sequential = _sequential_needed(model, corrections)
    elif not isinstance(sequential, bool):
        raise AnalysisError(f"sequential must be True, False or 'auto', got {sequential!r}.")
    if sequential:
        return analyze_sequential(
            model, calibration, processor, metrics, quant_type, blocksize,
            double_quant=double_quant, estimator=estimator, max_length=max_length, seed=seed,
            progress=progress, base_dir=base_dir, ranks=ranks,
        )
    if isinstance(model, (str, os.PathLike)):
        model, loaded_processor = load(model, quant="16bit", processor=processor is None)
        processor = processor if processor is not None else loaded_processor
    if not isinstance(model, nn.Module):
        raise AnalysisError(f"analyze expects a model (nn.Module) or a model folder, got {type(model).__name__}.")
    infos = quantizable_modules(model)
    modules = dict(model.named_modules())
    settings = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)

    weight_rows, issues = {}, {}
    need_forward = bool({"activation", "sensitivity"} & set(metrics))
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    check_weights_in_memory(model)
    check_finite_weights({info.name: modules[info.name].weight for info in infos})
    dequantized = QuantizedWeights(quant_type, blocksize, double_quant)  # packed 4-bit, dequantized per module on use
    for info in progress_bar(infos, progress, "Weights: 4-bit round trip"):
        weight = modules[info.name].weight
        weight_rows[info.name] = weight_metrics(weight, dequantized.add(info.name, weight))
    timings["weights_s"] = time.perf_counter() - tick
    if "weight" not in metrics:
        weight_rows = {}

    meta = base_meta(model, settings, metrics, estimator, sequential=False)
    activations = None
    sensitivities: dict[str, dict[str, float]] = {}
    blocks: dict[str, list[str]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gains: dict[str, dict[int, float]] = {}
    if need_forward:
        samples = prepare_samples(calibration, processor, model.config, max_length, base_dir)
        blocks = block_names(model, [info.name for info in infos])
        if ranks:
            tick = time.perf_counter()
            factors = _fit(model, samples, dequantized, ranks, issues, progress)
            timings["corrections_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        outcome = _calibration_pass(model, samples, dequantized, blocks, metrics, estimator, seed, progress, factors, ranks)
        timings["calibration_pass_s"] = time.perf_counter() - tick
        if "activation" in metrics:
            activations = outcome["activations"]
        num_tokens = outcome["num_tokens"]
        meta.update(kl_meta(samples, outcome))
        if "sensitivity" in metrics:
            if estimator in ("fisher", "both"):
                sensitivities["sensitivity"] = outcome["fisher"].scores(num_tokens)
                if ranks:
                    sensitivities[FULL_SENSITIVITY] = outcome["fisher"].full_scores(num_tokens)
                    gains = outcome["fisher"].gains(num_tokens)
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
    block_layers = tower_and_layer_of_blocks(blocks, infos)
    timings["total_s"] = time.perf_counter() - started
    meta["timing"] = timings
    report = build_report(infos, weight_rows, activations, sensitivities, issues, block_layers, meta, double_quant,
                          corrections=factors, gains=gains, ranks=ranks)
    if sensitivities:
        report.meta["sensitivity_sum"] = float(report.table["sensitivity"].sum())
    return report



def _sequential_needed(model: Any, corrections: bool) -> bool:
    """``sequential="auto"``: whether the whole-model analysis of a folder or hub id would not fit in free memory."""
    if isinstance(model, nn.Module):
        return False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        estimate = estimate_memory(model, task="analyze", corrections=corrections, device=device)
    except Exception:  # noqa: BLE001 - an unreadable reference or an unusual config: the whole-model load says what is wrong
        return False
    free = available_bytes(device)
    need = estimate.task_memory.total_bytes
    if free is None or need <= free:
        return False
    folder = Path(os.fspath(model)).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        warnings.warn(f"The whole-model analysis of {os.fspath(model)} needs about {human_bytes(need)} but {human_bytes(free)} is free, "
                      "and the folder has no safetensors files to stream layer by layer: analysing it whole.", stacklevel=3)
        return False
    warnings.warn(f"The whole-model analysis of {os.fspath(model)} needs about {human_bytes(need)} on the {device} but "
                  f"{human_bytes(free)} is free: analysing it layer by layer instead (sequential=True; same numbers).", stacklevel=3)
    return True


def _fit(
    model: nn.Module,
    samples: list[CalibrationSample],
    dequantized: Mapping[str, torch.Tensor],
    ranks: tuple[int, ...],
    issues: dict[str, list[str]],
    progress: bool | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Correction factors of every weight, from 16-bit no-grad passes over the calibration set."""
    device, dtype = device_dtype(model)
    modules = dict(model.named_modules())
    linears = {name: modules[name] for name in dequantized}

    def run() -> None:
        with torch.no_grad():
            for index, sample in enumerate(samples):
                forward_logits(model, model_inputs(sample, device, dtype), index, torch.zeros_like(sample.score_mask))  # inputs only

    def delta(name: str) -> torch.Tensor:
        return linears[name].weight.detach().float() - dequantized[name].float()

    was_training = model.training
    model.eval()
    try:
        factors, notes = fit_corrections(linears, delta, run, ranks, progress=progress)
    finally:
        model.train(was_training)
    for name, lines in notes.items():
        issues.setdefault(name, []).extend(lines)
    return factors


def _calibration_pass(
    model: nn.Module,
    samples: list[CalibrationSample],
    dequantized: Mapping[str, torch.Tensor],
    blocks: dict[str, list[str]],
    metrics: Sequence[str],
    estimator: str,
    seed: int,
    progress: bool | None,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ranks: Sequence[int] = (),
) -> dict[str, Any]:
    """Per sample: a 16-bit forward (+ backward for Fisher, which also scores the corrections) and an all-4-bit forward, with hooks."""
    fisher_wanted = "sensitivity" in metrics and estimator in ("fisher", "both")
    device, dtype = device_dtype(model)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in dequantized}
    fisher = FisherAccumulator(weights, dequantized, factors, ranks)
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
        with probe, fisher.consuming_gradients() if fisher_wanted else contextlib.nullcontext():
            for index, sample in enumerate(progress_bar(samples, progress, "Calibration: 16-bit vs 4-bit")):
                inputs = model_inputs(sample, device, dtype)
                mask = sample.score_mask.to(device)
                probe.new_sample()
                probe.mode = "reference" if "activation" in metrics else "off"
                with torch.set_grad_enabled(fisher_wanted):
                    logits = forward_logits(model, inputs, index, mask).float()
                    finite = finite_rows(logits.detach())
                    logits = logits[finite]
                    ref_logp = torch.log_softmax(logits.detach(), dim=-1)
                    if fisher_wanted and len(logits):
                        labels = sample_labels(ref_logp, generator)
                        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
                        fisher.accumulate()  # gradients the hooks did not consume (none while they are attached)
                del logits
                probe.mode = "quantized" if "activation" in metrics else "off"
                with torch.no_grad(), swapped(model, dequantized):
                    q_logits = forward_logits(model, inputs, index, mask).float()[finite]
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
    model: nn.Module, samples: list[CalibrationSample], dequantized: Mapping[str, torch.Tensor], progress: bool | None = None
) -> dict[str, float]:
    """Exact sensitivity: mean per-token KL to the 16-bit model with only one module in 4-bit, for each module.

    Example:
        >>> import dq_kit as dq
        >>> from dq_kit.data.calibration import prepare_calibration
        >>> from dq_kit.analysis.weights import quantize_roundtrip
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> name = "model.layers.0.mlp.down_proj"
        >>> deq = {name: quantize_roundtrip(model.get_submodule(name).weight)}
        >>> leave_one_out(model, prepare_calibration(["A red circle."], tok), deq, progress=False)[name] > 0
        True
    """
    device, dtype = device_dtype(model)
    totals = dict.fromkeys(dequantized, 0.0)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, sample in enumerate(progress_bar(samples, progress, "Leave-one-out KL")):
                inputs = model_inputs(sample, device, dtype)
                mask = sample.score_mask.to(device)
                ref_logp = torch.log_softmax(forward_logits(model, inputs, index, mask).float(), dim=-1)
                finite = finite_rows(ref_logp)
                ref_logp = ref_logp[finite]
                for name, deq in dequantized.items():
                    with swapped(model, {name: deq}):
                        totals[name] += float(kl_sum(ref_logp, forward_logits(model, inputs, index, mask)[finite]))
                tokens += int(finite.sum())
    finally:
        model.train(was_training)
    return {name: total / tokens if tokens else float("nan") for name, total in totals.items()}
