"""``dq.plan``: choose the modules to keep in 16-bit under a memory budget, from a ``QuantReport``.

The options are validated once (:class:`~dq_kit.planning.options.PlanOptions`); the plan comes
either from the report's scores (:func:`~dq_kit.planning.report_plan.plan_from_report`, an exact
knapsack) or, with ``refine=``, from measured calibration KL (:class:`~dq_kit.planning.refine.Refiner`).

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="16bit")
    >>> report = dq.analyze(model, processor, ["a red square", "two blue circles"], progress=False)
    >>> plan = dq.plan(report, budget=0.10)
    >>> plan.source
    'budget'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import PlanError
from ..quant.plan import Plan
from .options import PlanOptions
from .refine import Refiner
from .report_plan import plan_from_report

__all__ = ["plan"]

_REFINE_KEYS = ("model", "calibration", "processor", "candidates", "max_length", "progress")


def plan(
    report: Any,
    budget: float | None = 0.10,
    *,
    budget_bytes: int | None = None,
    threshold: float | None = None,
    top_k: int | None = None,
    keep: Iterable[str] = (),
    quantize: Iterable[str] = (),
    preset: bool = False,
    score: str = "sensitivity",
    fuse: bool = False,
    menu: str = "auto",
    refine: dict[str, Any] | None = None,
    options: PlanOptions | None = None,
) -> Plan:
    """Spend a memory budget where it recovers the most estimated quality per byte: 16-bit keeps
    and, with a report that has them, NF4 + low-rank corrections.

    Args:
        report: a :class:`dq_kit.QuantReport` from :func:`dq_kit.analyze`.
        budget: extra memory allowed over the uniform-NF4 footprint, as a fraction (0.10 = the
            model may weigh at most 1.10x its all-NF4 size).
        budget_bytes: the same budget in bytes (overrides ``budget``).
        threshold: instead of a budget, keep every module whose ``score`` is at least this.
        top_k: instead of a budget, keep the ``top_k`` highest-scoring modules (after fusing).
        keep: names or regexes always kept (their cost counts against the budget).
        quantize: names or regexes left in plain NF4 (never kept, never corrected).
        preset: start from the architecture preset and add automatic picks on top.
        score: report column to maximise (``"sensitivity"``: estimated KL removed, in nats).
        fuse: give q/k/v and gate/up projections of one block a shared decision (off by default:
            bitsandbytes stores each projection separately, and on SmolLM2-135M choosing them one by
            one closed 48% of the KL gap at +10% against 37% fused).
        refine: ``dict(model=..., calibration=..., processor=..., candidates=24)`` to measure
            calibration KL in context (:class:`dq_kit.Refiner`) instead of trusting the report's
            independent per-module scores; budget modes only, and 16-bit keeps only (``menu="auto"``
            plans keeps when refining; ``"full"`` / ``"corrections"`` with ``refine=`` are refused).
        options: a :class:`dq_kit.PlanOptions` holding all of the above at once (then the other
            option arguments are ignored).

    Returns:
        A :class:`Plan` whose ``reasons`` record each chosen module's choice (``"16bit"`` or
        ``"nf4+r<rank>"``), score, rank and byte cost.

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> report = dq.analyze(model, tok, ["A red circle.", "Two blue squares."], progress=False)
        >>> len(dq.plan(report, budget=0.5, keep=["model.layers.0.mlp.down_proj"]).keep) >= 1
        True
        >>> dq.plan(report, options=dq.PlanOptions(top_k=3)).source
        'top_k'
    """
    if options is None:
        options = PlanOptions(
            budget=budget, budget_bytes=budget_bytes, threshold=threshold, top_k=top_k, keep=keep, quantize=quantize,
            preset=preset, score=score, fuse=fuse, menu=menu,
        )
    if refine is None:
        return plan_from_report(report, options)
    options.require_budget("refine=")
    if unknown := sorted(set(refine) - set(_REFINE_KEYS)):
        raise PlanError(f"Unknown refine= option(s) {unknown}; choose from {list(_REFINE_KEYS)}.")
    if "model" not in refine:
        raise PlanError("refine= needs the analysed 16-bit model: refine=dict(model=model, calibration=..., processor=...).")
    settings = dict(refine)
    candidates = settings.pop("candidates", 24)
    refiner = Refiner(settings.pop("model"), report, settings.pop("calibration", None), settings.pop("processor", None), **settings)
    return refiner.plan(options=options, candidates=candidates)
