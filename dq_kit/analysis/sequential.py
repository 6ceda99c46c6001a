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
    >>> report = dq.analyze(path, calibration=dq.default_calibration(n=1), sequential=True, progress=False)
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

from ..errors import AnalysisError
from ..models.resolution import default_dtype, looks_like_path, meta_model, resolve_config
from ..progress import progress_bar
from ..quant.loading import load_processor
from .activations import ActivationProbe, block_names, first_tensor, swapped
from .common import (
    base_meta,
    check_finite_weights,
    finite_rows,
    kl_meta,
    measure_weight,
    model_inputs,
    prepare_samples,
    quantizable_modules,
    sample_errors,
    tower_and_layer_of_blocks,
)
from .corrections import InputMoments, fit_corrections, fit_from_moments
from .report import FULL_SENSITIVITY, QuantReport, build_report
from .safetensors_reader import Checkpoint
from .sensitivity import FisherAccumulator, kl_sum, sample_labels, top1_agreement

__all__ = ["analyze_sequential"]


# --------------------------------------------------------------------------------------------
# Where the front, the layers and the head are
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where a model's decoder layers, final norm and output head are; everything else is the front."""

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
        layers = getattr(decoder, "layers", None)
        # the norm after the last layer (LFM2 names it embedding_norm)
        norm = next((getattr(decoder, name) for name in _FINAL_NORMS if isinstance(getattr(decoder, name, None), nn.Module)), None)
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


_FINAL_NORMS = ("norm", "embedding_norm")
_INJECTED = "_dq_injected"  # the recorded call's key for what the forward added before this layer


class _Stop(Exception):
    """Raised by the final norm once every decoder layer call is recorded."""


@dataclass
class _Trace:
    """One calibration sample at the trunk's door: the first layer's input and each layer call's other arguments."""

    hidden: torch.Tensor
    calls: dict[int, tuple[list[Any], Any]]  # layer index -> (flat args/kwargs, pytree spec)
    leaves: list[torch.Tensor] = field(default_factory=list)  # the arguments that depend on front weights

    def inputs(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
        """Layer ``index``'s hidden-state input given the previous layer's output, and its other arguments.

        What the model's forward adds to the hidden states between two layers (Qwen3-VL's DeepStack
        visual features after the first language layers) is recorded with the call and added here.
        """
        flat, spec = self.calls[index]
        args, kwargs = tree_unflatten(flat, spec)
        injected = kwargs.pop(_INJECTED, None)
        return (hidden if injected is None else hidden + injected), args, kwargs


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
    with _recording(layout) as calls, torch.set_grad_enabled(grad), sample_errors(index), contextlib.suppress(_Stop):
        layout.model(**inputs, use_cache=False)
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
    previous = first
    for layer, hidden, args, kwargs in calls:
        if hidden is not previous:  # the layers are recorders returning their input: anything else was added in between
            kwargs = {**kwargs, _INJECTED: hidden - previous}
            previous = hidden
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
    if looks_like_path(os.fspath(reference)):
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
    progress: bool | None,
    base_dir: str | os.PathLike | None,
    ranks: tuple[int, ...] = (),
) -> QuantReport:
    """Block-at-a-time :func:`dq_kit.analyze` of a checkpoint folder or hub id (see the module docstring);
    with ``ranks``, corrections are fitted as the 16-bit stream passes each layer."""
    started = time.perf_counter()
    if isinstance(model, nn.Module):
        raise AnalysisError(
            "sequential=True reads 16-bit weights block by block from a checkpoint folder: pass the folder path, "
            "not a loaded model (a loaded model is analysed with sequential=False)."
        )
    if "sensitivity" in metrics and estimator != "fisher":
        raise AnalysisError("Leave-one-out needs the whole model in memory; use estimator='fisher' with sequential=True.")
    path = _checkpoint_folder(model)
    run = _Run(path, metrics, {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant}, seed, progress, ranks)
    if processor is None:
        processor = load_processor(path, run.config)
    need_forward = bool({"activation", "sensitivity"} & set(metrics))
    samples = prepare_samples(calibration, processor, run.config, max_length, base_dir) if need_forward else []
    traces16, tracesq = run.front(samples)
    h16, hq, saved_inputs = run.layers(samples, traces16, tracesq)
    if need_forward:
        grads = run.head(samples, h16, hq)
        del h16, hq, tracesq
        if run.fisher:
            grads = run.fisher_layers(samples, traces16, saved_inputs, grads)
            run.fisher_front(samples, traces16, grads)
    return run.report(estimator, started)


class _Run:
    """One sequential analysis: the front, then the layers one by one, the head, and back for the Fisher."""

    def __init__(self, path: Path, metrics: Sequence[str], settings: dict[str, Any], seed: int, progress: bool | None,
                 ranks: tuple[int, ...] = ()) -> None:
        self.config = resolve_config(path)
        self.skeleton = meta_model(self.config, buffers=True).eval()
        self.layout = _Layout.of(self.skeleton)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = default_dtype("cpu" if self.device.type == "cpu" else None)
        for name, _ in list(self.skeleton.named_buffers()):
            set_module_tensor_to_device(self.skeleton, name, self.device)
        aliases = {f"{self.layout.head_name}.weight": f"{self.layout.embed_name}.weight"}  # tied output head
        self.io = _Weights(self.skeleton, Checkpoint(path, self.skeleton), self.device, self.dtype, aliases)
        self.metrics, self.settings, self.seed, self.progress = metrics, settings, seed, progress
        self.local = "activation" in metrics
        self.fisher = "sensitivity" in metrics
        self.infos = quantizable_modules(self.skeleton)
        names = [info.name for info in self.infos]
        self.front_names = [name for name in names if self.layout.in_front(name)]
        self.front_blocks = {block: inside for block, inside in block_names(self.skeleton, names).items() if self.layout.in_front(block)}
        self.layer_linears = {layer: [name for name in names if _under(name, layer)] for layer in self.layout.layer_names}
        self.track_front = self.fisher and bool(self.front_names)  # the front has weights a gradient must reach
        self.front_deq: dict[str, torch.Tensor] = {}
        self.weights: dict[str, dict[str, float]] = {}
        self.issues: dict[str, list[str]] = {}
        self.module_acts: dict[str, dict[str, float]] = {}
        self.block_acts: dict[str, dict[str, float]] = {}
        self.scores: dict[str, float] = {}
        self.ranks = ranks
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gains: dict[str, dict[int, float]] = {}
        self.full_scores: dict[str, float] = {}
        self.kl: dict[str, Any] = {"kl": 0.0, "top1": 0, "num_tokens": 0, "nonfinite_positions": 0}
        self.samples: list[Any] = []
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        tick = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - tick

    def _measure(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        check_finite_weights({name: weight})
        deq, self.weights[name] = measure_weight(weight, **self.settings)
        return deq

    def _mode(self, mode: str) -> str:
        return mode if self.local else "off"

    def front(self, samples: list[Any]) -> tuple[list[_Trace], list[_Trace]]:
        """Read the front; per sample, record what reaches the layers with 16-bit and with 4-bit front weights."""
        self.samples = samples
        traces16: list[_Trace] = []
        tracesq: list[_Trace] = []
        with self._timed("front_s"):
            front = self.io.load("", only=self.layout.in_front)
            self.front_deq = {name: self._measure(name, front.get_submodule(name).weight) for name in self.front_names}
            if samples:
                for param in front.parameters():
                    param.requires_grad_(False)
                for name in self.front_names:
                    front.get_submodule(name).weight.requires_grad_(self.track_front)
                if self.ranks and self.front_names:
                    self._fit_front(front, samples)
                probe = ActivationProbe(front, self.front_deq, self.front_blocks if self.local else {}, local=self.local)
                with probe:
                    for index, sample in enumerate(progress_bar(samples, self.progress, "Sequential: front (embeddings, vision)")):
                        inputs = model_inputs(sample, self.device, self.dtype)
                        probe.new_sample()
                        probe.mode = self._mode("reference")
                        traces16.append(_detached(_record(self.layout, inputs, index, grad=self.track_front), self.track_front))
                        probe.mode = self._mode("quantized")
                        with torch.no_grad(), swapped(front, self.front_deq):
                            tracesq.append(_detached(_record(self.layout, inputs, index, grad=False), False))
                results = probe.results()
                self.module_acts.update(results["modules"])
                self.block_acts.update(results["blocks"])
            if not self.track_front:
                _Weights.free(front, only=self.layout.in_front)
        return traces16, tracesq

    def _fit_front(self, front: nn.Module, samples: list[Any]) -> None:
        """Corrections of the front's Linears (vision tower, projector), from no-grad 16-bit front passes."""
        linears = {name: front.get_submodule(name) for name in self.front_names if name not in self.issues}

        def run() -> None:
            with torch.no_grad():
                for index, sample in enumerate(samples):
                    _record(self.layout, model_inputs(sample, self.device, self.dtype), index, grad=False)

        def delta(name: str) -> torch.Tensor:
            return linears[name].weight.detach().float() - self.front_deq[name].float()

        factors, notes = fit_corrections(linears, delta, run, self.ranks, progress=self.progress)
        self.factors.update(factors)
        for name, lines in notes.items():
            self.issues.setdefault(name, []).extend(lines)

    def _fit_layer(self, layer_name: str, layer: nn.Module, position: int, relative: dict[str, torch.Tensor],
                   h16: list[torch.Tensor], traces16: list[_Trace]) -> None:
        """Corrections of one layer's Linears from its 16-bit inputs (a pass of its own, so that nothing
        else running inside the layer, such as the activation probe's 4-bit replay, is recorded)."""
        linears = {name: layer.get_submodule(name) for name in relative if f"{layer_name}.{name}" not in self.issues}

        def delta(name: str) -> torch.Tensor:
            return linears[name].weight.detach().float() - relative[name].float()

        with torch.no_grad(), InputMoments(linears) as moments:
            for index, trace in enumerate(traces16):
                if position in trace.calls:
                    hidden, args, kwargs = trace.inputs(position, h16[index])
                    layer(hidden, *args, **kwargs)
        factors, notes = fit_from_moments(moments, delta, self.ranks)
        self.factors.update({f"{layer_name}.{name}": value for name, value in factors.items()})
        for name, lines in notes.items():
            self.issues.setdefault(f"{layer_name}.{name}", []).extend(lines)

    def layers(self, samples: list[Any], traces16: list[_Trace], tracesq: list[_Trace]) -> tuple[list, list, list]:
        """Each layer once, in order: weight metrics, then the 16-bit and the 4-bit stream through it."""
        h16 = [trace.hidden for trace in traces16]
        hq = [trace.hidden for trace in tracesq]
        saved_inputs: list[list[torch.Tensor]] = []
        with self._timed("layers_s"):
            for position, layer_name in enumerate(progress_bar(self.layout.layer_names, self.progress, "Sequential: layers")):
                layer = self.io.load(layer_name)
                relative = {_relative(name, layer_name): self._measure(name, self.skeleton.get_submodule(name).weight)
                            for name in self.layer_linears[layer_name]}
                if samples:
                    if self.fisher:
                        saved_inputs.append(list(h16))
                    if self.ranks:
                        self._fit_layer(layer_name, layer, position, relative, h16, traces16)
                    probe = ActivationProbe(layer, relative, {"": list(relative)} if self.local else {}, local=self.local)
                    with torch.no_grad(), probe:
                        for index in range(len(samples)):
                            if position not in traces16[index].calls:
                                continue  # the model skips this layer for this sample (Mllama cross-attention, text only)
                            probe.new_sample()
                            probe.mode = self._mode("reference")
                            hidden, args, kwargs = traces16[index].inputs(position, h16[index])
                            h16[index] = first_tensor(layer(hidden, *args, **kwargs))
                            probe.mode = self._mode("quantized")
                            hidden, args, kwargs = tracesq[index].inputs(position, hq[index])
                            with swapped(layer, relative):
                                hq[index] = first_tensor(layer(hidden, *args, **kwargs))
                    results = probe.results()
                    self.module_acts.update({f"{layer_name}.{name}": values for name, values in results["modules"].items()})
                    if self.local and relative:
                        self.block_acts[layer_name] = results["blocks"][""]
                del relative
                _Weights.free(layer)
        return h16, hq, saved_inputs

    def head(self, samples: list[Any], h16: list[torch.Tensor], hq: list[torch.Tensor]) -> list[torch.Tensor]:
        """KL and top-1 of the 4-bit stream against the 16-bit one; the loss gradient at the last layer's output."""
        grads: list[torch.Tensor] = []
        with self._timed("head_s"):
            norm = self.io.load(self.layout.norm_name)
            head = self.io.load(self.layout.head_name)
            generator = torch.Generator().manual_seed(self.seed)
            for index, sample in enumerate(progress_bar(samples, self.progress, "Sequential: output head")):
                mask = sample.score_mask.to(self.device)
                hidden = h16[index].detach().requires_grad_(self.fisher)
                with torch.set_grad_enabled(self.fisher):
                    logits = head(norm(hidden))[0][mask].float()
                    finite = finite_rows(logits.detach())
                    logits = logits[finite]
                    ref_logp = torch.log_softmax(logits.detach(), dim=-1)
                    if self.fisher:
                        if len(logits):
                            labels = sample_labels(ref_logp, generator)
                            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward(inputs=[hidden])
                        grads.append(hidden.grad if hidden.grad is not None else torch.zeros_like(hidden))
                with torch.no_grad():
                    q_logits = head(norm(hq[index]))[0][mask].float()[finite]
                self.kl["kl"] += float(kl_sum(ref_logp, q_logits))
                self.kl["top1"] += top1_agreement(ref_logp, q_logits)
                self.kl["num_tokens"] += int(finite.sum())
                self.kl["nonfinite_positions"] += int((~finite).sum())
            _Weights.free(norm)
            _Weights.free(head)
        return grads

    def fisher_layers(self, samples: list[Any], traces16: list[_Trace], saved_inputs: list, grads: list) -> list[torch.Tensor]:
        """Back through the layers in reverse, one at a time; returns the gradient at the first layer's input."""
        names = self.layout.layer_names
        with self._timed("fisher_layers_s"):
            for position in progress_bar(range(len(names) - 1, -1, -1), self.progress, "Sequential: Fisher backward", total=len(names)):
                layer = self.io.load(names[position])
                for param in layer.parameters():
                    param.requires_grad_(False)
                params = {_relative(name, names[position]): self.skeleton.get_submodule(name).weight for name in self.layer_linears[names[position]]}
                for param in params.values():
                    param.requires_grad_(True)
                prefix = f"{names[position]}."
                factors = {name[len(prefix):]: value for name, value in self.factors.items() if name.startswith(prefix)}
                fisher = FisherAccumulator(params, {name: measure_weight(param, **self.settings)[0] for name, param in params.items()},
                                           factors, self.ranks)
                for index in range(len(samples)):
                    if position not in traces16[index].calls:
                        continue
                    x = saved_inputs[position][index].detach().requires_grad_(True)
                    hidden, args, kwargs = traces16[index].inputs(position, x)
                    first_tensor(layer(hidden, *args, **kwargs)).backward(grads[index])
                    fisher.accumulate()
                    grads[index] = x.grad
                self.scores.update({f"{names[position]}.{name}": value for name, value in fisher.scores(self.kl["num_tokens"]).items()})
                self.gains.update({f"{names[position]}.{name}": value for name, value in fisher.gains(self.kl["num_tokens"]).items()})
                self.full_scores.update({f"{names[position]}.{name}": v for name, v in fisher.full_scores(self.kl["num_tokens"]).items()})
                del fisher, params
                _Weights.free(layer)
        return grads

    def fisher_front(self, samples: list[Any], traces16: list[_Trace], grads: list[torch.Tensor]) -> None:
        """Replay the front with gradients and push in what reached the layers' inputs (image embeddings, cross-attention states)."""
        if not self.track_front:
            return
        with self._timed("fisher_front_s"):
            front = self.skeleton
            fisher = FisherAccumulator({name: front.get_submodule(name).weight for name in self.front_names}, self.front_deq,
                                       {name: self.factors[name] for name in self.front_names if name in self.factors}, self.ranks)
            for index, sample in enumerate(progress_bar(samples, self.progress, "Sequential: Fisher backward, front")):
                trace = _record(self.layout, model_inputs(sample, self.device, self.dtype), index, grad=True)
                outputs = [trace.hidden] if trace.hidden.requires_grad else []
                gradients = [grads[index]] if trace.hidden.requires_grad else []
                for live, leaf in zip(trace.leaves, traces16[index].leaves, strict=True):
                    if leaf.grad is not None:
                        outputs.append(live)
                        gradients.append(leaf.grad)
                if outputs:
                    torch.autograd.backward(outputs, gradients)
                fisher.accumulate()
            self.scores.update(fisher.scores(self.kl["num_tokens"]))
            self.gains.update(fisher.gains(self.kl["num_tokens"]))
            self.full_scores.update(fisher.full_scores(self.kl["num_tokens"]))
            _Weights.free(front, only=self.layout.in_front)

    def report(self, estimator: str, started: float) -> QuantReport:
        meta = base_meta(self.skeleton, self.settings, self.metrics, estimator, sequential=True)
        if self.samples:
            meta.update(kl_meta(self.samples, self.kl))
        weights = self.weights if "weight" in self.metrics else {}
        activations = {"modules": self.module_acts, "blocks": self.block_acts} if self.local else None
        sensitivities = {"sensitivity": self.scores} if self.fisher else {}
        if self.fisher and self.ranks:
            sensitivities[FULL_SENSITIVITY] = self.full_scores
        self.timings["total_s"] = time.perf_counter() - started
        meta["timing"] = self.timings
        blocks = {**self.front_blocks, **{name: inside for name, inside in self.layer_linears.items() if inside}}
        report = build_report(self.infos, weights, activations, sensitivities, self.issues, tower_and_layer_of_blocks(blocks, self.infos),
                              meta, self.settings["double_quant"], corrections=self.factors, gains=self.gains, ranks=self.ranks)
        if sensitivities:
            report.meta["sensitivity_sum"] = float(report.table["sensitivity"].sum())
        return report


def _relative(name: str, parent: str) -> str:
    return name[len(parent) + 1:]
