"""Sequential (block-at-a-time) analysis for models larger than memory.

The model is built with its parameters on the meta device and split in three parts:

* the **front**: everything that runs before the first decoder layer — token embeddings, and for
  vision-language models the whole vision tower and projector. It is read from the checkpoint once and
  kept (for Llama 3.2 11B Vision: 1.7 GiB of vision tower plus 1 GiB of embeddings, out of 20 GiB).
* the **trunk**: the language decoder layers, each read from the safetensors checkpoint when it is
  needed and freed right after.
* the **head**: the final norm and the output head, read for the KL and the loss gradient.

The model's own ``forward`` runs the front for every calibration sample with the decoder layers
replaced by recorders, which note what each layer receives (hidden states, position embeddings,
attention masks, Mllama's cross-attention states ...) and which layers are called at all (Mllama
skips its cross-attention layers on text-only samples). The calibration set then flows through the
trunk one layer at a time, twice side by side — the 16-bit stream and the all-4-bit stream (front
included) — so local and accumulated activation errors come out exactly as in the whole-model
analysis. For the Fisher sensitivity, the layer inputs are kept, the loss gradient is taken at the
head, and the layers are revisited in reverse order (one at a time) to back-propagate it, like
activation checkpointing at layer granularity; the gradient that reaches the layers' inputs (the
merged image embeddings of Qwen2-VL, the cross-attention states of Mllama) is finally pushed through
the front. Peak memory: the front, one layer, the head, and the calibration activations at every
layer boundary.

Supported: decoder-only language models and the vision-language models whose language model is a
``layers`` stack followed by a final ``norm`` (Qwen2-VL, Qwen2.5-VL, Llama 3.2 Vision, Llava /
Pixtral, Llama, Mistral, Qwen2/3, ...).

Example:
    >>> import dq_kit as dq, tempfile
    >>> path = dq.tiny.save_tiny("qwen2_vl", tempfile.mkdtemp())
    >>> report = dq.analyze(path, dq.default_calibration(n=1), sequential=True, progress=False)
    >>> report.meta["sequential"], bool(report.table["sensitivity"].notna().all())
    (True, True)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..modeling import _looks_like_path, default_dtype, meta_model, resolve_config
from .activations import ActivationProbe, _first_tensor, block_names, swapped
from .checkpoint_reader import Checkpoint
from .report import AnalysisError, QuantReport, build_report
from .sensitivity import FisherAccumulator, kl_sum, sample_labels, top1_agreement

__all__ = ["analyze_sequential"]


# --------------------------------------------------------------------------------------------
# Where the front, the trunk and the head are
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    model: nn.Module
    layers: nn.ModuleList
    layer_names: list[str]
    norm: nn.Module
    norm_name: str
    head_name: str
    embed_name: str

    @classmethod
    def of(cls, model: nn.Module) -> _Layout:
        try:
            decoder = model.get_decoder()
        except (AttributeError, ValueError, NotImplementedError):
            decoder = None
        layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module) or model.get_output_embeddings() is None:
            raise AnalysisError(
                f"sequential mode does not know the layout of {type(model).__name__}: it needs a language model with "
                "a `layers` list, a final `norm` and an output head. Analyse it with sequential=False."
            )
        text = model.config.get_text_config()
        if getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None) not in (None, 1, 1.0):
            raise AnalysisError(f"sequential mode does not apply the logit scaling of {model.config.model_type!r}; use sequential=False.")
        names = {id(module): name for name, module in model.named_modules()}
        layers_name = names[id(layers)]
        return cls(
            model=model,
            layers=layers,
            layer_names=[f"{layers_name}.{index}" for index in range(len(layers))],
            norm=norm,
            norm_name=names[id(norm)],
            head_name=names[id(model.get_output_embeddings())],
            embed_name=names[id(model.get_input_embeddings())],
        )

    def in_trunk(self, name: str) -> bool:
        return any(_under(name, layer) for layer in self.layer_names)

    def in_front(self, name: str) -> bool:
        return not (self.in_trunk(name) or _under(name, self.norm_name) or _under(name, self.head_name))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --------------------------------------------------------------------------------------------
# Reading weights in and out
# --------------------------------------------------------------------------------------------


class _Weights:
    """Puts a module's 16-bit weights from the checkpoint on the device, and back on the meta device."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, aliases: dict[str, str]) -> None:
        self.model, self.checkpoint, self.device, self.dtype, self.aliases = model, checkpoint, device, dtype, aliases

    def load(self, name: str, only: Any = None) -> nn.Module:
        """Materialize the parameters of module ``name`` (those whose full name passes ``only``, if given)."""
        module = self.model.get_submodule(name)
        prefix = f"{name}." if name else ""
        for key, param in list(module.named_parameters()):
            full = prefix + key
            if only is not None and not only(full):
                continue
            source = full if full in self.checkpoint else self.aliases.get(full, full)
            tensor = self.checkpoint.get(source)
            if tensor.shape != param.shape:
                raise AnalysisError(f"Checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}.")
            value = tensor.to(dtype=self.dtype) if tensor.is_floating_point() else tensor
            set_module_tensor_to_device(module, key, self.device, value=value)
        return module

    @staticmethod
    def free(module: nn.Module, only: Any = None, prefix: str = "") -> None:
        for key, _ in list(module.named_parameters()):
            if only is None or only(prefix + key):
                set_module_tensor_to_device(module, key, "meta")


# --------------------------------------------------------------------------------------------
# Recording what the decoder layers receive
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the final norm once every decoder layer call is recorded."""


@dataclass
class _Trace:
    """One calibration sample at the trunk's door: the first layer's input and each layer call's other arguments."""

    hidden: torch.Tensor
    calls: dict[int, tuple[list[Any], Any]]  # layer index -> (flat args/kwargs, pytree spec)
    leaves: list[torch.Tensor] = field(default_factory=list)  # the arguments that depend on front weights

    def arguments(self, index: int) -> tuple[tuple, dict]:
        flat, spec = self.calls[index]
        return tree_unflatten(flat, spec)


@contextlib.contextmanager
def _recording(layout: _Layout) -> Iterator[list[tuple[int, torch.Tensor, tuple, dict]]]:
    """Replace every decoder layer by a recorder that returns its input, and the final norm by a stop."""
    calls: list[tuple[int, torch.Tensor, tuple, dict]] = []

    def recorder(index: int):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append((index, hidden_states, args, kwargs))
            return hidden_states

        return forward

    def stop(*args: Any, **kwargs: Any) -> None:
        raise _Stop

    for index, layer in enumerate(layout.layers):
        layer.forward = recorder(index)
    layout.norm.forward = stop
    try:
        yield calls
    finally:
        for layer in layout.layers:
            del layer.forward
        del layout.norm.forward


def _record(layout: _Layout, inputs: dict[str, Any], index: int, grad: bool) -> _Trace:
    """Run the model's forward up to the final norm on one sample and return what reached the layers."""
    with _recording(layout) as calls, torch.set_grad_enabled(grad):
        try:
            layout.model(**inputs, use_cache=False)
        except _Stop:
            pass
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
            raise AnalysisError(
                f"The model failed on calibration sample {index} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                "Check that the processor belongs to this model and that the sample fits it."
            ) from exc
    if not calls:
        raise AnalysisError(f"No decoder layer of {type(layout.model).__name__} ran on calibration sample {index}.")
    order = [call[0] for call in calls]
    if order != sorted(set(order)):
        raise AnalysisError(f"sequential mode needs each decoder layer called at most once, in order; the model called {order}.")
    first = calls[0][1]
    if any(call[1].shape != first.shape for call in calls):
        raise AnalysisError("sequential mode expects the decoder layers to take and return hidden states of one shape.")
    trace = _Trace(hidden=first, calls={})
    seen: set[int] = set()
    for layer, _, args, kwargs in calls:
        flat, spec = tree_flatten((args, kwargs))
        for value in flat:
            if isinstance(value, torch.Tensor) and value.requires_grad and id(value) not in seen:
                seen.add(id(value))
                trace.leaves.append(value)
        trace.calls[layer] = (flat, spec)
    return trace


def _detached(trace: _Trace, track: bool) -> _Trace:
    """The trace cut from the front's graph; with ``track`` the front-dependent tensors become leaves that collect gradients."""
    mapping = {id(t): (t.detach().requires_grad_(True) if track else t.detach()) for t in trace.leaves}
    calls = {layer: ([mapping.get(id(v), v) for v in flat], spec) for layer, (flat, spec) in trace.calls.items()}
    hidden = trace.hidden.detach()
    return _Trace(hidden=hidden, calls=calls, leaves=[mapping[id(t)] for t in trace.leaves] if track else [])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _checkpoint_folder(reference: str | os.PathLike) -> Path:
    """A local model folder as is; a hub id downloaded (config, processor and safetensors files only)."""
    path = Path(os.fspath(reference)).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(os.fspath(reference)):
        raise AnalysisError(f"sequential=True needs a model folder or a hub id; {os.fspath(reference)!r} is neither.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(os.fspath(reference), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except Exception as exc:  # huggingface_hub raises many kinds (offline, gated, not found, HTTP)
        raise AnalysisError(
            f"Could not fetch {os.fspath(reference)!r} for the sequential analysis ({type(exc).__name__}: {exc}). "
            "Download it first (huggingface_hub.snapshot_download, or `hf download`) and pass the folder."
        ) from exc


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
    from . import (
        _bar,
        _base_meta,
        _block_layers,
        _finite_rows,
        _kl_meta,
        _prepare,
        measure_weight,
        model_inputs,
        quantizable_modules,
    )

    started = time.perf_counter()
    if isinstance(model, nn.Module):
        raise AnalysisError(
            "sequential=True reads 16-bit weights block by block from a checkpoint folder: pass the folder path, "
            "not a loaded model (a loaded model is analysed with sequential=False)."
        )
    if "sensitivity" in metrics and estimator != "fisher":
        raise AnalysisError("Leave-one-out needs the whole model in memory; use estimator='fisher' with sequential=True.")
    path = _checkpoint_folder(model)
    config = resolve_config(path)
    skeleton = meta_model(config, buffers=True).eval()
    layout = _Layout.of(skeleton)
    checkpoint = Checkpoint(path, skeleton)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = default_dtype("cpu" if device.type == "cpu" else None)
    for name, _ in list(skeleton.named_buffers()):
        set_module_tensor_to_device(skeleton, name, device)
    weights_io = _Weights(skeleton, checkpoint, device, dtype, {f"{layout.head_name}.weight": f"{layout.embed_name}.weight"})
    if processor is None:
        from ..loading import load_processor

        processor = load_processor(path, config)

    infos = quantizable_modules(skeleton)
    settings = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant}
    need_forward = bool({"activation", "sensitivity"} & set(metrics))
    fisher_wanted = "sensitivity" in metrics
    measure_local = "activation" in metrics
    meta = _base_meta(skeleton, settings, metrics, estimator, sequential=True)
    weights: dict[str, dict[str, float]] = {}
    issues: dict[str, list[str]] = {}
    module_acts: dict[str, dict[str, float]] = {}
    block_acts: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    front_names = [info.name for info in infos if layout.in_front(info.name)]
    all_blocks = block_names(skeleton, [info.name for info in infos])
    front_blocks = {name: inside for name, inside in all_blocks.items() if layout.in_front(name)}
    trunk_blocks = {name: [n for n in all_blocks.get(name, [])] for name in layout.layer_names}

    def measure(name: str, weight: torch.Tensor) -> torch.Tensor:
        deq, row, problem = measure_weight(weight, **settings)
        weights[name] = row
        if problem:
            issues[name] = [problem]
        return deq

    samples = _prepare(calibration, processor, config, max_length, base_dir) if need_forward else []

    # 1. The front: weights in memory for the whole run, one recording per sample and stream.
    tick = time.perf_counter()
    front = weights_io.load("", only=layout.in_front)
    front_deq = {name: measure(name, skeleton.get_submodule(name).weight) for name in front_names}
    front_params = {name: skeleton.get_submodule(name).weight for name in front_names}
    track = fisher_wanted and bool(front_names)
    traces16: list[_Trace] = []
    tracesq: list[_Trace] = []
    front_probe = ActivationProbe(skeleton, front_deq, front_blocks if measure_local else {}, local=measure_local)
    if need_forward:
        for param in skeleton.parameters():
            param.requires_grad_(False)
        for param in front_params.values():
            param.requires_grad_(track)
        with front_probe:
            for index, sample in enumerate(_bar(samples, progress, "Sequential: front (embeddings, vision)")):
                inputs = model_inputs(sample, device, dtype)
                front_probe.new_sample()
                front_probe.mode = "reference" if measure_local else "off"
                traces16.append(_detached(_record(layout, inputs, index, grad=track), track))
                front_probe.mode = "quantized" if measure_local else "off"
                with torch.no_grad(), swapped(skeleton, front_deq):
                    tracesq.append(_detached(_record(layout, inputs, index, grad=False), False))
        results = front_probe.results()
        module_acts.update(results["modules"])
        block_acts.update(results["blocks"])
    if not track:
        _Weights.free(front, only=layout.in_front)
    timings["front_s"] = time.perf_counter() - tick

    # 2. The trunk, one layer at a time: weight metrics, then the 16-bit and 4-bit streams.
    tick = time.perf_counter()
    h16 = [trace.hidden for trace in traces16]
    hq = [trace.hidden for trace in tracesq]
    saved_inputs: list[list[torch.Tensor | None]] = []
    for position, block_name in enumerate(_bar(layout.layer_names, progress, "Sequential: layers")):
        block = weights_io.load(block_name)
        relative = {name[len(block_name) + 1:]: measure(name, block.get_submodule(name[len(block_name) + 1:]).weight)
                    for name in trunk_blocks[block_name]}
        if need_forward:
            if fisher_wanted:
                saved_inputs.append(list(h16))
            probe = ActivationProbe(block, relative, {"": list(relative)} if measure_local else {}, local=measure_local)
            with torch.no_grad(), probe:
                for index in range(len(samples)):
                    if position not in traces16[index].calls:
                        continue
                    args, kwargs = traces16[index].arguments(position)
                    probe.new_sample()
                    probe.mode = "reference" if measure_local else "off"
                    h16[index] = _first_tensor(block(h16[index], *args, **kwargs))
                    args, kwargs = tracesq[index].arguments(position)
                    probe.mode = "quantized" if measure_local else "off"
                    with swapped(block, relative):
                        hq[index] = _first_tensor(block(hq[index], *args, **kwargs))
            results = probe.results()
            module_acts.update({f"{block_name}.{name}": values for name, values in results["modules"].items()})
            if measure_local and relative:
                block_acts[block_name] = results["blocks"][""]
        del relative
        _Weights.free(block)
    timings["layers_s"] = time.perf_counter() - tick

    kl_outcome: dict[str, Any] = {"kl": 0.0, "top1": 0, "num_tokens": 0, "nonfinite_positions": 0}
    sensitivities: dict[str, dict[str, float]] = {}
    grads: list[torch.Tensor] = []
    if need_forward:
        # 3. The head: KL of the 4-bit stream, and the loss gradient for the Fisher pass.
        tick = time.perf_counter()
        norm = weights_io.load(layout.norm_name)
        head = weights_io.load(layout.head_name)
        generator = torch.Generator().manual_seed(seed)
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
        _Weights.free(norm)
        _Weights.free(head)
        del h16, hq, tracesq
        timings["head_s"] = time.perf_counter() - tick
        meta.update(_kl_meta(samples, kl_outcome))

    if fisher_wanted:
        # 4. Backward through the layers in reverse, one at a time, accumulating squared weight gradients.
        tick = time.perf_counter()
        scores: dict[str, float] = {}
        pairs = list(zip(range(len(layout.layer_names)), layout.layer_names, saved_inputs, strict=True))[::-1]
        for position, block_name, inputs in _bar(pairs, progress, "Sequential: Fisher backward"):
            block = weights_io.load(block_name)
            params = {name[len(block_name) + 1:]: block.get_submodule(name[len(block_name) + 1:]).weight for name in trunk_blocks[block_name]}
            for param in block.parameters():
                param.requires_grad_(False)
            for param in params.values():
                param.requires_grad_(True)
            fisher = FisherAccumulator(params, {name: measure_weight(param, **settings)[0] for name, param in params.items()})
            for index in range(len(samples)):
                if position not in traces16[index].calls:
                    continue
                args, kwargs = traces16[index].arguments(position)
                x = inputs[index].detach().requires_grad_(True)
                out = _first_tensor(block(x, *args, **kwargs))
                out.backward(grads[index])
                fisher.accumulate()
                grads[index] = x.grad
            scores.update({f"{block_name}.{name}": value for name, value in fisher.scores(kl_outcome["num_tokens"]).items()})
            del fisher, params
            _Weights.free(block)
        # 5. The front: replay each sample with gradients and push in what reached the layers' inputs.
        if track:
            fisher = FisherAccumulator(front_params, front_deq)
            for index, sample in enumerate(_bar(samples, progress, "Sequential: Fisher backward, front")):
                trace = _record(layout, model_inputs(sample, device, dtype), index, grad=True)
                stored = traces16[index]
                outputs = [trace.hidden] if trace.hidden.requires_grad else []
                gradients = [grads[index]] if trace.hidden.requires_grad else []
                for live, leaf in zip(trace.leaves, stored.leaves, strict=True):
                    if leaf.grad is not None:
                        outputs.append(live)
                        gradients.append(leaf.grad)
                if outputs:
                    torch.autograd.backward(outputs, gradients)
                fisher.accumulate()
            scores.update(fisher.scores(kl_outcome["num_tokens"]))
            del fisher
            _Weights.free(front, only=layout.in_front)
        sensitivities["sensitivity"] = scores
        timings["fisher_backward_s"] = time.perf_counter() - tick

    if "weight" not in metrics:
        weights = {}
    activations = {"modules": module_acts, "blocks": block_acts} if "activation" in metrics else None
    timings["total_s"] = time.perf_counter() - started
    meta["timing"] = timings
    blocks = {**front_blocks, **{name: inside for name, inside in trunk_blocks.items() if inside}}
    report = build_report(infos, weights, activations, sensitivities, issues, _block_layers(blocks, infos), meta, double_quant)
    if sensitivities:
        report.meta["sensitivity_sum"] = float(report.table["sensitivity"].sum())
    return report
