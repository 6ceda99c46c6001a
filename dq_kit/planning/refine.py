"""Measured refinement of a plan: choose the modules kept in 16-bit by *measured* calibration KL, in context.

Independent per-module scores (Fisher, output-space Fisher, leave-one-out) rank modules one at a
time at the 16-bit point. On a real 135M LM they plateau at about half of the KL gap closed at +10%
footprint: the damage of 4-bit quantization is not additive, and which module matters depends on
which others are already restored. This module measures instead, on the calibration set only:

1. **In-context exact checks.** Starting from uniform 4-bit (plus any forced modules), restore one
   candidate group (fused q/k/v or gate/up share a decision) to 16-bit and measure the calibration
   KL to the 16-bit model. The shortlist is the report's best candidates by score per byte and by
   score (``candidates`` of each).
2. **Lazy greedy in context.** Repeatedly take the candidate with the best measured KL reduction
   per byte *given the modules already restored*: a stale bound is re-measured in the current
   context before it is accepted (diminishing returns make the stale value an upper bound), so only
   a few forward passes are spent per pick.
3. **Measured final check.** The greedy plan, the knapsack on the single-restore gains and the
   report-only plan of :func:`dq_kit.plan` (with ``fuse=False`` also the fused report plan) are all
   measured; the lowest calibration KL wins, so the refined plan is never worse than the unrefined
   one on calibration data.

Measured on SmolLM2-135M (``benchmarks/quality.py``, held-out chats): granularity mattered more than
the measurement. Letting q, k and v (and gate, up) be chosen one by one (``fuse=False``; with
grouped-query attention k/v are a third of q) closed 48.5% of the held-out KL gap at +10% against
36.5% with fused decisions, for the same Fisher scores; the measured greedy (4+4 candidates, 16
calibration chats) did not beat that report plan on calibration KL, so the refined plan was the
unfused report plan. On the tiny demo Qwen2-VL and Mllama the measured checks did change plans
(+7 points at +10% on the demo model). bitsandbytes stores every projection separately, so nothing
requires fusing unless a serving engine fuses them.

Every measurement is a no-grad forward pass with the exact bitsandbytes round trip of each weight
swapped in (the same numbers as the quantized model, see :func:`dq_kit.analysis.weights.quantize_roundtrip`).
Forward passes reuse the cached outputs of the blocks that run before the first restored module,
and only the scored positions go through the output head. Measurements are memoised, so planning
several budgets with one :class:`Refiner` shares them.

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.analysis import analyze
    >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
    >>> texts = ["A red circle on a blue background.", "Two green squares and a yellow triangle."]
    >>> report = analyze(model, tok, texts, progress=False)
    >>> plan = refine_plan(model, report, 0.5, texts, tok, progress=False)
    >>> plan.source
    'refined'
"""

from __future__ import annotations

import heapq
import inspect
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..analysis.activations import block_names, swapped
from ..analysis.common import device_dtype, model_inputs, prepare_samples
from ..analysis.sensitivity import kl_sum
from ..analysis.weights import quantize_roundtrip
from ..data.calibration import CalibrationSample
from ..errors import PlanError
from ..models import registry
from ..progress import progress_bar
from ..quant.memory import estimate_memory
from ..quant.plan import Plan
from .knapsack import Item, select_within
from .options import PlanOptions
from .report_plan import candidate_items, expand_patterns, extra_bytes, plan_from_report

__all__ = ["Refiner", "refine_plan"]


def refine_plan(
    model: nn.Module,
    report: Any,
    budget: float | None = 0.10,
    calibration: Iterable[Any] | None = None,
    processor: Any = None,
    *,
    budget_bytes: int | None = None,
    keep: Iterable[str] = (),
    quantize: Iterable[str] = (),
    preset: bool = False,
    candidates: int = 24,
    fuse: bool = False,
    score: str = "sensitivity",
    max_length: int | None = None,
    progress: bool | None = None,
) -> Plan:
    """A plan for ``budget`` chosen by measured calibration KL (see the module docstring).

    Args:
        model: the 16-bit model ``report`` was made from (not modified).
        report: its :class:`dq_kit.QuantReport` (sizes and the scores that shortlist candidates).
        budget, budget_bytes, keep, quantize, preset, fuse, score: as in :func:`dq_kit.plan` (``score``
            only shortlists candidates and gives the report-only plan that the measurement is checked against).
        calibration: calibration samples (any form :func:`dq_kit.analyze` accepts; ideally the same
            set the report was made with). ``None`` uses :func:`dq_kit.default_calibration`.
        processor: the model's processor or tokenizer.
        candidates: shortlist size (top groups by score per byte, plus top groups by score).
        max_length: truncate text-only samples to this many tokens.
        progress: show a progress bar over the measurements (default: the global ``DQ_PROGRESS`` setting).

    Returns:
        A :class:`Plan` with ``source="refined"``; ``reasons`` give each kept module's measured KL
        reduction in context (``measured_gain``) and the plan's calibration KL.

    Example:
        >>> plan = refine_plan(model, report, 0.10, calibration, processor)   # doctest: +SKIP
    """
    refiner = Refiner(model, report, calibration, processor, max_length=max_length, progress=progress)
    return refiner.plan(
        budget,
        budget_bytes=budget_bytes,
        keep=keep,
        quantize=quantize,
        preset=preset,
        candidates=candidates,
        fuse=fuse,
        score=score,
    )


class Refiner:
    """Measures calibration KL of partially quantized versions of one model; plans by measurement.

    Build it once per model and calibration set; :meth:`plan` for several budgets shares every
    measurement. :meth:`kl` gives the calibration KL of any set of modules kept in 16-bit.

    Example:
        >>> import dq_kit as dq
        >>> from dq_kit.analysis import analyze
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> report = analyze(model, tok, ["A red circle."], progress=False)
        >>> refiner = Refiner(model, report, ["A red circle."], tok, progress=False)
        >>> refiner.kl([]) > refiner.kl(report.table["module"]) == 0.0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        report: Any,
        calibration: Iterable[Any] | None = None,
        processor: Any = None,
        *,
        max_length: int | None = None,
        cache_blocks: bool = True,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.report = report
        self.progress = progress
        self.names: list[str] = list(report.table["module"])
        modules = dict(model.named_modules())
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise PlanError(f"The report names modules this model lacks (e.g. {missing[0]!r}): refine with the analysed model.")
        meta = report.meta
        settings = {
            "quant_type": meta.get("quant_type", "nf4"),
            "blocksize": meta.get("blocksize", 64),
            "double_quant": meta.get("double_quant", True),
        }
        self.dequantized = {name: quantize_roundtrip(modules[name].weight, **settings) for name in self.names}
        self.samples: list[CalibrationSample] = prepare_samples(calibration, processor, model.config, max_length, None)
        self._device, self._dtype = device_dtype(model)
        self._inputs = [model_inputs(sample, self._device, self._dtype) for sample in self.samples]
        self._positions = [sample.score_mask.nonzero().squeeze(-1).to(self._device) for sample in self.samples]
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._blocks = {name: modules[name] for name in block_names(model, self.names)}
        self._memo: dict[frozenset[str], float] = {}
        self.passes = 0
        self.seconds = 0.0
        self._reference: list[torch.Tensor] = []
        self._orders: list[dict[str, int]] = []
        self._spans: list[dict[str, tuple[int, Any]]] = []
        self._prefix_ok = cache_blocks
        self.bytes_4bit: int = meta.get("bytes_4bit") or estimate_memory(model, Plan.uniform(model)).bytes_4bit
        self.output_heads: list[str] = meta.get("output_heads") or registry.always_16bit(model)
        self._setup()

    # ---- measurement ---------------------------------------------------------------------------

    def kl(self, keep: Iterable[str]) -> float:
        """Mean per-token calibration KL to the 16-bit model with every module in 4-bit except ``keep``."""
        key = frozenset(keep) & frozenset(self.names)
        if key not in self._memo:
            self._memo[key] = self._measure(key)
        return self._memo[key]

    def _logits(self, index: int) -> torch.Tensor:
        inputs = self._inputs[index]
        positions = self._positions[index]
        if self._keep_logits:
            return self.model(**inputs, use_cache=False, logits_to_keep=positions).logits[0].float()
        return self.model(**inputs, use_cache=False).logits[0][positions].float()

    def _setup(self) -> None:
        """16-bit reference log-probs; per sample, the call order of Linears and blocks and the block outputs at uniform 4-bit."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for index in range(len(self.samples)):
                    self._reference.append(torch.log_softmax(self._logits(index), dim=-1))
            counter = [0]
            order: dict[str, int] = {}
            spans: dict[str, list[Any]] = {}
            handles = []
            modules = dict(model.named_modules())

            def linear_hook(name: str):
                def hook(module, args, output):
                    order.setdefault(name, counter[0])
                    counter[0] += 1

                return hook

            def block_pre(name: str):
                def hook(module, args, kwargs):
                    spans.setdefault(name, []).append([counter[0], None, None])

                return hook

            def block_post(name: str):
                def hook(module, args, kwargs, output):
                    spans[name][-1][1:] = [counter[0], output]

                return hook

            for name in self.names:
                handles.append(modules[name].register_forward_hook(linear_hook(name)))
            if self._prefix_ok:
                for name, block in self._blocks.items():
                    handles.append(block.register_forward_pre_hook(block_pre(name), with_kwargs=True))
                    handles.append(block.register_forward_hook(block_post(name), with_kwargs=True))
            total, tokens = 0.0, 0
            try:
                with torch.no_grad(), swapped(model, self.dequantized):
                    for index in range(len(self.samples)):
                        counter[0] = 0
                        order.clear()
                        spans.clear()
                        total += float(kl_sum(self._reference[index], self._logits(index)))
                        tokens += int(self._reference[index].shape[0])
                        self._orders.append(dict(order))
                        # A block can be replayed only if it ran exactly once in this forward pass.
                        self._spans.append({name: (calls[0][1], calls[0][2]) for name, calls in spans.items() if len(calls) == 1})
            finally:
                for handle in handles:
                    handle.remove()
            self._tokens = tokens
            self._memo[frozenset()] = total / tokens if tokens else float("nan")
            if self._prefix_ok:
                self._check_replay()
        finally:
            model.train(was_training)

    def _check_replay(self) -> None:
        """Measure the last-called module both ways; disable block replay if the results differ."""
        last: dict[str, int] = {}
        for order in self._orders:
            for name, position in order.items():
                last[name] = max(last.get(name, -1), position)
        if not last:
            self._prefix_ok = False
            return
        key = frozenset([max(last, key=last.get)])
        replayed = self._measure(key)
        self._prefix_ok = False
        plain = self._measure(key)
        self._prefix_ok = math.isclose(replayed, plain, rel_tol=1e-4, abs_tol=1e-9)
        if not self._prefix_ok:
            self._spans = [{} for _ in self._spans]
        self._memo[key] = plain

    def _replayable(self, keep: frozenset[str], index: int) -> dict[str, Any]:
        """Blocks of sample ``index`` that finish before the first kept module runs, with their cached outputs."""
        if not self._prefix_ok or not keep:
            return {}
        order = self._orders[index]
        first = min((order[name] for name in keep if name in order), default=None)
        if first is None:  # no kept module runs on this sample: the whole pass equals uniform 4-bit
            first = math.inf
        return {name: output for name, (end, output) in self._spans[index].items() if end <= first}

    def _measure(self, keep: frozenset[str]) -> float:
        started = time.perf_counter()
        model = self.model
        weights = {name: deq for name, deq in self.dequantized.items() if name not in keep}
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            with torch.no_grad(), swapped(model, weights):
                for index in range(len(self.samples)):
                    replay = self._replayable(keep, index)
                    for name, output in replay.items():
                        self._blocks[name].forward = _Replay(output)
                    try:
                        total += float(kl_sum(self._reference[index], self._logits(index)))
                    finally:
                        for name in replay:
                            del self._blocks[name].forward
        finally:
            model.train(was_training)
        self.passes += 1
        self.seconds += time.perf_counter() - started
        return total / self._tokens if self._tokens else float("nan")

    # ---- planning ------------------------------------------------------------------------------

    def plan(
        self,
        budget: float | None = 0.10,
        *,
        budget_bytes: int | None = None,
        keep: Iterable[str] = (),
        quantize: Iterable[str] = (),
        preset: bool = False,
        candidates: int = 24,
        fuse: bool = False,
        score: str = "sensitivity",
        options: PlanOptions | None = None,
    ) -> Plan:
        """The lowest-calibration-KL plan found within the budget (greedy in context, checked against the report's plan).

        ``options`` (a :class:`dq_kit.PlanOptions` in a budget mode) replaces the other option arguments.
        """
        if options is None:
            options = PlanOptions(budget=budget, budget_bytes=budget_bytes, keep=keep, quantize=quantize, preset=preset, fuse=fuse, score=score)
        options.require_budget("refine=")
        report = self.report
        score = options.score
        column = score if score in report.table.columns else "weight_error"
        if options.menu in ("full", "corrections"):
            raise PlanError(f"refine= measures plans of 16-bit keeps only; use menu='keep' (got menu={options.menu!r}), "
                            "or plan corrections from the report without refine=.")
        options = options.replace(score=column, menu="keep")
        base = plan_from_report(report, options, bytes_4bit=self.bytes_4bit, output_heads=self.output_heads)
        capacity = options.capacity(self.bytes_4bit)
        rows = report.table.rename(columns={"module": "name"}).set_index("name")
        forced = frozenset(name for name in base.keep if base.reasons.get(name, {}).get("rule") != "budget")
        excluded = expand_patterns(options.quantize, self.names, "quantize") if options.quantize else set()
        free = [name for name in self.names if name not in forced and name not in excluded]
        items = [item for item in candidate_items(rows, free, column, options.fuse) if item.cost > 0]
        room = capacity - int(sum(extra_bytes(rows, name) for name in forced))
        affordable = [item for item in items if item.cost <= room]
        if room <= 0 or not affordable:
            return replace(base, source="refined")

        shortlist = _shortlist(affordable, candidates)
        context = self.kl(forced)
        single = {}
        for item in progress_bar(shortlist, self.progress, "Refine: in-context checks"):
            single[item.names] = context - self.kl(forced | set(item.names))

        choices: dict[str, frozenset[str]] = {"report": frozenset(base.keep)}
        if not options.fuse:  # the fused plan is a valid unfused plan too: let the measurement decide
            fused = plan_from_report(report, options.replace(fuse=True), bytes_4bit=self.bytes_4bit, output_heads=self.output_heads)
            choices["report_fused"] = frozenset(fused.keep)
        measured_items = [Item(item.names, max(single[item.names], 0.0), item.cost) for item in shortlist]
        chosen = select_within(measured_items, room, 0) if any(i.value > 0 for i in measured_items) else []
        choices["knapsack"] = forced | {name for item in chosen for name in item.names}
        choices["greedy"], gains = self._lazy_greedy(forced, shortlist, single, room)
        scored = {label: self.kl(kept) for label, kept in choices.items()}
        preference = ("greedy", "knapsack", "report", "report_fused")
        label = min(scored, key=lambda k: (scored[k], preference.index(k)))
        kept = choices[label]

        reasons = {name: base.reasons[name] for name in forced if name in base.reasons}
        by_member = {name: item for item in shortlist for name in item.names}
        for name in kept - forced:
            item = by_member.get(name)
            reasons[name] = {
                "rule": f"refined:{label}",
                "measured_gain": float(gains.get(item.names, single.get(item.names, float("nan")))) if item else float("nan"),
                score: float(rows.at[name, column]),
                "extra_bytes": extra_bytes(rows, name),
                "calibration_kl": scored[label],
            }
        return replace(base, keep=tuple(kept), source="refined", reasons=reasons)

    def _lazy_greedy(
        self, forced: frozenset[str], shortlist: Sequence[Any], single: dict[tuple[str, ...], float], room: int
    ) -> tuple[frozenset[str], dict[tuple[str, ...], float]]:
        """Best measured KL reduction per byte, re-measured in the current context before it is taken."""
        kept = set(forced)
        current = self.kl(kept)
        version = 0
        heap = [(-single[item.names] / item.cost, index, -1) for index, item in enumerate(shortlist) if single[item.names] > 0]
        heapq.heapify(heap)
        gains: dict[tuple[str, ...], float] = {}
        while heap:
            ratio, index, measured_at = heapq.heappop(heap)
            item = shortlist[index]
            if item.cost > room or ratio >= 0:
                continue
            if measured_at == version:
                kept |= set(item.names)
                room -= item.cost
                current = self.kl(kept)
                gains[item.names] = -ratio * item.cost
                version += 1
                continue
            gain = current - self.kl(kept | set(item.names))
            if gain > 0:
                heapq.heappush(heap, (-gain / item.cost, index, version))
        return frozenset(kept), gains


class _Replay:
    """A block ``forward`` that returns its cached output (the block's inputs are unchanged)."""

    def __init__(self, output: Any) -> None:
        self.output = output

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _shortlist(items: Sequence[Any], candidates: int) -> list[Any]:
    """Top ``candidates`` groups by score per byte and top ``candidates`` by score."""
    by_ratio = sorted(items, key=lambda i: -i.value / i.cost)[:candidates]
    by_value = sorted(items, key=lambda i: -i.value)[:candidates]
    seen: dict[tuple[str, ...], Any] = {}
    for item in (*by_ratio, *by_value):
        seen.setdefault(item.names, item)
    return list(seen.values())
