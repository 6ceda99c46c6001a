"""Activation error: each Linear's and each block's output with 16-bit vs 4-bit weights.

Two flavours, both relative Frobenius errors ``||Y_q - Y|| / ||Y||`` summed over the calibration set:

* **local** — only this module (or block) quantized, fed the 16-bit model's inputs; measures the
  damage the module does on its own.
* **accumulated** — the whole model quantized, so the error carried from earlier layers is
  included; this is the curve the published per-layer analyses show.

:class:`ActivationProbe` installs forward hooks; the caller runs the 16-bit forward in
``"reference"`` mode and then the all-4-bit forward (weights swapped with :func:`swapped`) in
``"quantized"`` mode, one calibration sample at a time.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    >>> dq = {n: quantize_roundtrip(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    >>> probe = ActivationProbe(model, dq, blocks={})
    >>> with probe:
    ...     probe.mode = "reference"; _ = model(torch.randn(8, 64))
    ...     probe.mode = "quantized"
    ...     with swapped(model, dq): _ = model(torch.randn(8, 64))
    >>> sorted(probe.results()["modules"]["0"])
    ['act_accum_error', 'act_local_error', 'nonfinite_samples']
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .weights import quantize_roundtrip

__all__ = ["ActivationProbe", "block_names", "first_tensor", "quantize_roundtrip", "swapped"]

_BLOCK_NAME = re.compile(r"^(.*\.)?(?:blocks|layers|layer|h)\.\d+$")


def block_names(model: nn.Module, linear_names: list[str]) -> dict[str, list[str]]:
    """Transformer blocks (``...layers.N`` / ``...blocks.N``) that hold quantizable Linears, with those Linears.

    Example:
        >>> import dq_kit as dq
        >>> model = dq.tiny.build_tiny_model("llama")
        >>> names = [m.name for m in dq.registry.linear_modules(model)][:-1]
        >>> list(block_names(model, names))
        ['model.layers.0', 'model.layers.1']
    """
    blocks: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        if _BLOCK_NAME.match(name):
            inside = [linear for linear in linear_names if linear.startswith(name + ".")]
            if inside:
                blocks[name] = inside
    return blocks


@contextlib.contextmanager
def swapped(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, each named Linear runs with ``weights[name]`` in place of its weight.

    The weight is looked up as the module's forward starts and put back as it ends, so a lazy
    mapping (:class:`dq_kit.analysis.weights.QuantizedWeights`) holds one dequantized weight at a
    time. For forwards without gradients (a backward pass would see the restored weight).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> before = lin.weight.detach().clone()
        >>> with swapped(nn.Sequential(lin), {"0": torch.zeros(2, 2)}):
        ...     float((lin(torch.ones(1, 2)) - lin.bias).abs().sum().detach())
        0.0
        >>> torch.equal(lin.weight, before)
        True
    """
    modules = dict(model.named_modules()) if weights else {}
    saved: dict[int, list[torch.Tensor]] = defaultdict(list)

    def swap_in(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            saved[id(module)].append(module.weight.data)
            module.weight.data = weights[name]

        return hook

    def put_back(module: nn.Module, args: tuple, output: Any) -> None:
        module.weight.data = saved[id(module)].pop()

    handles = []
    try:
        for name in weights:
            handles.append(modules[name].register_forward_pre_hook(swap_in(name)))
            handles.append(modules[name].register_forward_hook(put_back, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Renamed(Mapping[str, torch.Tensor]):
    """A view of ``source`` under other names (``{new name: source name}``), looked up lazily."""

    def __init__(self, source: Mapping[str, torch.Tensor], names: dict[str, str]) -> None:
        self.source, self.names = source, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source[self.names[name]]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The hidden states in a module's output: the tensor itself, the first of a tuple, or ``last_hidden_state``.

    Example:
        >>> first_tensor((torch.ones(2), None)).shape
        torch.Size([2])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


class _Accumulator:
    """Sums of squared errors and squared reference norms for one module or block."""

    __slots__ = ("accum_err", "accum_ref", "local_err", "local_ref", "nonfinite")

    def __init__(self) -> None:
        self.local_err = self.local_ref = self.accum_err = self.accum_ref = 0.0
        self.nonfinite = 0

    def add(self, kind: str, approx: torch.Tensor, reference: torch.Tensor) -> None:
        approx, reference = approx.detach().float(), reference.detach().float()
        if not (torch.isfinite(approx).all() and torch.isfinite(reference).all()):
            self.nonfinite += 1
            return
        err = float((approx - reference).pow(2).sum())
        ref = float(reference.pow(2).sum())
        if kind == "local":
            self.local_err += err
            self.local_ref += ref
        else:
            self.accum_err += err
            self.accum_ref += ref

    def result(self) -> dict[str, float]:
        def ratio(err: float, ref: float) -> float:
            return (err / ref) ** 0.5 if ref > 0 else float("nan")

        return {
            "act_local_error": ratio(self.local_err, self.local_ref),
            "act_accum_error": ratio(self.accum_err, self.accum_ref),
            "nonfinite_samples": self.nonfinite,
        }


class ActivationProbe:
    """Forward hooks that measure local and accumulated output error of Linears and blocks.

    Args:
        model: the 16-bit model (or, in sequential mode, one block).
        dequantized: ``{linear name: 4-bit round-trip weight}`` for every quantizable Linear.
        blocks: ``{block name: [linear names inside]}`` (see :func:`block_names`); ``{}`` for none.
        local: also measure local errors (an extra matmul per Linear and a re-run per block).

    Set ``probe.mode`` to ``"reference"`` (16-bit weights; stores outputs and measures local error),
    ``"quantized"`` (4-bit weights swapped in; compares with the stored outputs) or ``"off"``.
    """

    def __init__(
        self,
        model: nn.Module,
        dequantized: Mapping[str, torch.Tensor],
        blocks: Mapping[str, list[str]],
        *,
        local: bool = True,
    ) -> None:
        self.model = model
        self.dequantized = dequantized
        self.blocks = blocks
        self.local = local
        self.mode = "off"
        self._busy = False
        self._reference: dict[str, torch.Tensor] = {}
        self._stats: dict[str, _Accumulator] = defaultdict(_Accumulator)
        self._handles: list[Any] = []

    def __enter__(self) -> ActivationProbe:
        modules = dict(self.model.named_modules())
        for name in self.dequantized:
            self._handles.append(modules[name].register_forward_hook(self._linear_hook(name)))
        for name in self.blocks:
            self._handles.append(modules[name].register_forward_hook(self._block_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reference.clear()
        self.mode = "off"

    def new_sample(self) -> None:
        """Forget the stored reference outputs of the previous sample."""
        self._reference.clear()

    def _compare(self, name: str, output: torch.Tensor) -> None:
        reference = self._reference.pop(name, None)
        if reference is not None and reference.shape == output.shape:
            self._stats[name].add("accum", output, reference)

    def _linear_hook(self, name: str):
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            if self._busy or self.mode == "off":
                return
            if self.mode == "quantized":
                self._compare(name, output)
                return
            self._reference[name] = output.detach()
            if self.local:
                with torch.no_grad():
                    approx = F.linear(args[0].detach(), self.dequantized[name], module.bias)
                self._stats[name].add("local", approx, output)

        return hook

    def _block_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._busy or self.mode == "off":
                return
            tensor = first_tensor(output)
            if tensor is None:
                return
            if self.mode == "quantized":
                self._compare(name, tensor)
                return
            self._reference[name] = tensor.detach()
            if self.local:
                self._busy = True
                try:
                    with torch.no_grad(), swapped(module, self._relative(name)):
                        approx = first_tensor(module.forward(*args, **kwargs))
                finally:
                    self._busy = False
                if approx is not None:
                    self._stats[name].add("local", approx, tensor)

        return hook

    def _relative(self, block: str) -> Mapping[str, torch.Tensor]:
        prefix = f"{block}." if block else ""
        return _Renamed(self.dequantized, {name[len(prefix):]: name for name in self.blocks[block]})

    def results(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{"modules": {name: metrics}, "blocks": {name: metrics}}`` accumulated so far."""
        modules = {name: self._stats[name].result() for name in self.dequantized}
        blocks = {name: self._stats[name].result() for name in self.blocks}
        return {"modules": modules, "blocks": blocks}
