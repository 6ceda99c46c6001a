"""Sequential (block-at-a-time) analysis for models larger than memory.

The model is built on the meta device; each transformer block's 16-bit weights are read from the
safetensors checkpoint when the block is needed and freed right after. The calibration set flows
through twice side by side — the 16-bit stream and the all-4-bit stream — so local and accumulated
activation errors come out exactly as in the whole-model analysis. For the Fisher sensitivity, the
block inputs are kept, the loss gradient is taken at the output head, and the blocks are revisited
in reverse order (one at a time) to back-propagate it, like activation checkpointing at block
granularity. Peak memory: one block, the embeddings / output head, and the calibration activations
of every block boundary.

Supported: decoder-only language models whose decoder has ``embed_tokens``, ``layers`` and ``norm``
(Llama, Mistral, Qwen2, Qwen3, ...) with one attention type. Vision-language models are analysed
whole (``sequential=False``).

Example:
    >>> import dq_kit as dq, tempfile
    >>> path = dq.tiny.save_tiny("llama", tempfile.mkdtemp())
    >>> report = dq.analyze(path, ["A red circle on a blue background."], sequential=True, progress=False)
    >>> report.meta["sequential"]
    True
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modeling import auto_class, default_dtype, meta_model, resolve_config
from .activations import ActivationProbe, swapped
from .report import AnalysisError, QuantReport, build_report
from .sensitivity import FisherAccumulator, kl_sum, sample_labels, top1_agreement

__all__ = ["Checkpoint", "analyze_sequential"]


class Checkpoint:
    """Lazy reader of a safetensors checkpoint folder (single file or sharded with an index).

    Example:
        >>> import dq_kit as dq, tempfile
        >>> ckpt = Checkpoint(dq.tiny.save_tiny("llama", tempfile.mkdtemp()))
        >>> ckpt.get("model.norm.weight").shape
        torch.Size([64])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)
        else:
            raise AnalysisError(
                f"{self.path} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json); "
                "sequential mode reads 16-bit weights from one. Re-save the model with save_pretrained()."
            )

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk."""
        from safetensors import safe_open

        if name not in self.files:
            raise AnalysisError(f"The checkpoint at {self.path} has no tensor {name!r}.")
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


class _Stop(Exception):
    """Raised by the catcher once the first block's inputs are recorded."""


class _Catcher(nn.Module):
    def __init__(self, store: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.store = store

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise AnalysisError("sequential mode expects decoder blocks called with keyword arguments after the hidden states.")
        self.store.append((hidden_states.detach(), kwargs))
        raise _Stop


def _materialize(model: nn.Module, name: str, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
                 aliases: dict[str, str]) -> nn.Module:
    module = model.get_submodule(name)
    module.to_empty(device=device)
    prefix = f"{name}." if name else ""
    with torch.no_grad():
        for key, param in module.named_parameters():
            full = prefix + key
            source = full if full in checkpoint else aliases.get(full)
            if source is None or source not in checkpoint:
                raise AnalysisError(f"The checkpoint at {checkpoint.path} has no weight for {full!r}; it does not match the config.")
            tensor = checkpoint.get(source)
            if tensor.shape != param.shape:
                raise AnalysisError(f"Checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}.")
            param.copy_(tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype))
    return module


def _free(module: nn.Module) -> None:
    module.to_empty(device="meta")


def analyze_sequential(
    model: Any,
    calibration: Iterable[Any] | None,
    processor: Any,
    metrics: Sequence[str],
    quant_type: str,
    blocksize: int,
    *,
    double_quant: bool,
    estimator: str,
    max_length: int | None,
    seed: int,
    progress: bool,
    base_dir: str | os.PathLike | None,
) -> QuantReport:
    """Block-at-a-time :func:`dq_kit.analyze` of a checkpoint folder (see the module docstring)."""
    from . import _bar, _base_meta, _block_layers, _finite_rows, _kl_meta, _prepare, measure_weight, quantizable_modules

    started = time.perf_counter()
    if isinstance(model, nn.Module):
        raise AnalysisError(
            "sequential=True reads 16-bit weights block by block from a checkpoint folder: pass the folder path, "
            "not a loaded model (a loaded model is analysed with sequential=False)."
        )
    if "sensitivity" in metrics and estimator != "fisher":
        raise AnalysisError("Leave-one-out needs the whole model in memory; use estimator='fisher' with sequential=True.")
    path = Path(os.fspath(model)).expanduser()
    if not path.is_dir():
        raise AnalysisError(f"sequential=True needs a local model folder; {str(model)!r} is not one (download it first).")
    config = resolve_config(path)
    from transformers import AutoModelForCausalLM

    if auto_class(config) is not AutoModelForCausalLM:
        raise AnalysisError(
            f"sequential mode supports decoder-only language models; {config.model_type!r} is a vision-language model. "
            "Analyse it with sequential=False (on a GPU with device_map='auto' if it is large)."
        )
    if len(set(getattr(config, "layer_types", None) or ["full"])) > 1:
        raise AnalysisError(f"sequential mode supports models with one attention type; {config.model_type!r} mixes {set(config.layer_types)}.")
    skeleton = meta_model(config).eval()
    decoder = skeleton.get_decoder()
    if not all(hasattr(decoder, attr) for attr in ("embed_tokens", "layers", "norm")):
        raise AnalysisError(f"sequential mode does not know the layout of {type(skeleton).__name__} (needs embed_tokens, layers, norm).")
    names = {id(module): name for name, module in skeleton.named_modules()}
    decoder_name, layers_name = names[id(decoder)], names[id(decoder.layers)]
    head_name = names[id(skeleton.get_output_embeddings())]
    embed_name = names[id(decoder.embed_tokens)]
    aliases = {f"{head_name}.weight": f"{embed_name}.weight"} if getattr(config, "tie_word_embeddings", False) else {}
    checkpoint = Checkpoint(path)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = default_dtype("cpu" if device.type == "cpu" else None)
    if processor is None:
        from ..loading import load_processor

        processor = load_processor(path, config)

    infos = quantizable_modules(skeleton)
    info_by_name = {info.name: info for info in infos}
    settings = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    need_forward = bool({"activation", "sensitivity"} & set(metrics))
    fisher_wanted = "sensitivity" in metrics
    meta = _base_meta(skeleton, settings, metrics, estimator, sequential=True)
    weights: dict[str, dict[str, float]] = {}
    issues: dict[str, list[str]] = {}
    module_acts: dict[str, dict[str, float]] = {}
    block_acts: dict[str, dict[str, float]] = {}
    blocks: dict[str, list[str]] = {}
    timings: dict[str, float] = {}

    samples = _prepare(calibration, processor, config, max_length, base_dir) if need_forward else []
    # 1. Block-0 inputs of every sample, via a catcher in place of the first block.
    h16: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []
    if need_forward:
        tick = time.perf_counter()
        embed = _materialize(skeleton, embed_name, checkpoint, device, dtype, aliases)
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is not None:
            decoder.rotary_emb = type(rotary)(config=decoder.config).to(device)
        store: list[tuple[torch.Tensor, dict[str, Any]]] = []
        first = decoder.layers[0]
        decoder.layers[0] = _Catcher(store)
        try:
            with torch.no_grad():
                for sample in _bar(samples, progress, "Sequential: embedding calibration"):
                    inputs = {k: v.to(device) for k, v in sample.inputs.items() if k in ("input_ids", "attention_mask")}
                    try:
                        decoder(**inputs, use_cache=False)
                    except _Stop:
                        pass
        finally:
            decoder.layers[0] = first
            _free(embed)
        h16 = [hidden for hidden, _ in store]
        kwargs = [kw for _, kw in store]
        timings["embedding_s"] = time.perf_counter() - tick
    hq = [h.clone() for h in h16]
    saved_inputs: list[list[torch.Tensor]] = []

    # 2. Forward through the blocks, one at a time: weight metrics, 16-bit and 4-bit streams.
    tick = time.perf_counter()
    layer_names = [f"{layers_name}.{index}" for index in range(len(decoder.layers))]
    for block_name in _bar(layer_names, progress, "Sequential: blocks"):
        block = _materialize(skeleton, block_name, checkpoint, device, dtype, aliases)
        linears = [name for name in info_by_name if name.startswith(block_name + ".")]
        blocks[block_name] = linears
        relative: dict[str, torch.Tensor] = {}
        for name in linears:
            deq, row, problem = measure_weight(block.get_submodule(name[len(block_name) + 1:]).weight, **settings)
            weights[name] = row
            if problem:
                issues[name] = [problem]
            relative[name[len(block_name) + 1:]] = deq
        if need_forward:
            if fisher_wanted:
                saved_inputs.append(h16)
            probe = ActivationProbe(block, relative, {"": list(relative)}, local="activation" in metrics)
            with torch.no_grad(), probe:
                out16, outq = [], []
                for index in range(len(samples)):
                    probe.new_sample()
                    probe.mode = "reference"
                    out16.append(block(h16[index], **kwargs[index]))
                    probe.mode = "quantized"
                    with swapped(block, relative):
                        outq.append(block(hq[index], **kwargs[index]))
            h16, hq = out16, outq
            results = probe.results()
            module_acts.update({f"{block_name}.{name}": values for name, values in results["modules"].items()})
            block_acts[block_name] = results["blocks"][""]
        del relative
        _free(block)
    timings["blocks_s"] = time.perf_counter() - tick

    kl_outcome: dict[str, Any] = {"kl": 0.0, "top1": 0, "num_tokens": 0, "nonfinite_positions": 0}
    sensitivities: dict[str, dict[str, float]] = {}
    if need_forward:
        # 3. Output head: KL of the 4-bit stream, and the loss gradient for the Fisher pass.
        tick = time.perf_counter()
        norm = _materialize(skeleton, names[id(decoder.norm)], checkpoint, device, dtype, aliases)
        head = _materialize(skeleton, head_name, checkpoint, device, dtype, aliases)
        generator = torch.Generator().manual_seed(seed)
        grads: list[torch.Tensor] = []
        for index, sample in enumerate(_bar(samples, progress, "Sequential: output head")):
            mask = sample.score_mask.to(device)
            hidden = h16[index].detach().requires_grad_(fisher_wanted)
            with torch.set_grad_enabled(fisher_wanted):
                logits = head(norm(hidden))[0][mask].float()
                finite = _finite_rows(logits.detach())
                logits = logits[finite]
                ref_logp = torch.log_softmax(logits.detach(), dim=-1)
                if fisher_wanted:
                    if len(logits):
                        labels = sample_labels(ref_logp, generator)
                        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward(inputs=[hidden])
                    grads.append(hidden.grad if hidden.grad is not None else torch.zeros_like(hidden))
            with torch.no_grad():
                q_logits = head(norm(hq[index]))[0][mask].float()[finite]
            kl_outcome["kl"] += float(kl_sum(ref_logp, q_logits))
            kl_outcome["top1"] += top1_agreement(ref_logp, q_logits)
            kl_outcome["num_tokens"] += int(finite.sum())
            kl_outcome["nonfinite_positions"] += int((~finite).sum())
        _free(norm)
        _free(head)
        del h16, hq
        timings["head_s"] = time.perf_counter() - tick
        meta.update(_kl_meta(samples, kl_outcome))

    if fisher_wanted:
        # 4. Backward through the blocks in reverse, one at a time, accumulating squared weight gradients.
        tick = time.perf_counter()
        scores: dict[str, float] = {}
        for block_name, inputs in _bar(list(zip(layer_names, saved_inputs, strict=True))[::-1], progress, "Sequential: Fisher backward"):
            block = _materialize(skeleton, block_name, checkpoint, device, dtype, aliases)
            relative_names = [name[len(block_name) + 1:] for name in blocks[block_name]]
            params = {name: block.get_submodule(name).weight for name in relative_names}
            for param in block.parameters():
                param.requires_grad_(False)
            for param in params.values():
                param.requires_grad_(True)
            fisher = FisherAccumulator(params)
            for index in range(len(samples)):
                x = inputs[index].detach().requires_grad_(True)
                out = block(x, **kwargs[index])
                out.backward(grads[index])
                fisher.accumulate()
                grads[index] = x.grad
            deltas = {}
            for name, param in params.items():
                deq, _, _ = measure_weight(param, **settings)
                deltas[name] = deq - param.detach()
            scores.update({f"{block_name}.{name}": value for name, value in fisher.scores(deltas, kl_outcome["num_tokens"]).items()})
            del fisher, deltas, params
            _free(block)
        sensitivities["sensitivity"] = scores
        timings["fisher_backward_s"] = time.perf_counter() - tick

    if "weight" not in metrics:
        weights = {}
    activations = {"modules": module_acts, "blocks": block_acts} if "activation" in metrics else None
    timings["total_s"] = time.perf_counter() - started
    meta["timing"] = timings
    report = build_report(infos, weights, activations, sensitivities, issues, _block_layers(blocks, infos), meta, double_quant)
    if sensitivities:
        report.meta["sensitivity_sum"] = float(report.table["sensitivity"].sum())
    return report
