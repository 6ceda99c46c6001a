"""``dq.plan``: choose the modules to keep in 16-bit under a memory budget, from a ``QuantReport``.

Selection is an exact 0/1 knapsack over byte cost (dynamic programming on bucketed bytes), not a
greedy ratio sort: modules differ in size by 100x (an lm_head vs a k_proj), where greedy wastes
budget. Fused projections (q/k/v, gate/up) can be made to share one decision (``fuse=True``).

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="16bit")
    >>> report = dq.analyze(model, ["a red square", "two blue circles"], processor=processor)
    >>> plan = dq.plan(report, budget=0.10)
    >>> plan.source
    'budget'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import registry
from .errors import PlanError
from .plans import Plan, matches_skip_pattern

_FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
_BUCKETS = 4096


@dataclass(frozen=True)
class _Item:
    names: tuple[str, ...]
    value: float
    cost: int


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
    refine: dict[str, Any] | None = None,
) -> Plan:
    """Keep in 16-bit the modules that recover the most estimated quality per extra byte.

    Args:
        report: a :class:`dq_kit.QuantReport` from :func:`dq_kit.analyze`.
        budget: extra memory allowed over the uniform-NF4 footprint, as a fraction (0.10 = the
            model may weigh at most 1.10x its all-NF4 size).
        budget_bytes: the same budget in bytes (overrides ``budget``).
        threshold: instead of a budget, keep every module whose ``score`` is at least this.
        top_k: instead of a budget, keep the ``top_k`` highest-scoring modules (after fusing).
        keep: names or regexes always kept (their cost counts against the budget).
        quantize: names or regexes never kept.
        preset: start from the architecture preset and add automatic picks on top.
        score: report column to maximise (``"sensitivity"``: estimated KL removed, in nats).
        fuse: give q/k/v and gate/up projections of one block a shared decision (off by default:
            bitsandbytes stores each projection separately, and on SmolLM2-135M choosing them one by
            one closed 48% of the KL gap at +10% against 37% fused).
        refine: ``dict(model=..., calibration=..., processor=..., candidates=24)`` to measure
            calibration KL in context (:func:`dq_kit.refine.refine_plan`) instead of trusting the
            report's independent per-module scores; budget modes only.

    Returns:
        A :class:`Plan` whose ``reasons`` record each kept module's score, rank and byte cost.

    Example:
        >>> plan = dq.plan(report, budget=0.05, keep=["lm_head"])     # doctest: +SKIP
    """
    if refine is not None:
        if threshold is not None or top_k is not None:
            raise PlanError("refine= works with budget= or budget_bytes=, not threshold= or top_k=.")
        from .refine import refine_plan

        options = dict(refine)
        return refine_plan(
            options.pop("model"),
            report,
            budget,
            options.pop("calibration", None),
            options.pop("processor", None),
            budget_bytes=budget_bytes,
            keep=keep,
            quantize=quantize,
            preset=preset,
            fuse=fuse,
            score=score,
            **options,
        )
    frame = report.table.rename(columns={"module": "name"})
    if score not in frame.columns:
        raise PlanError(f"The report has no {score!r} column; available: {sorted(frame.columns)}.")
    modes = [m for m, v in (("budget_bytes", budget_bytes), ("threshold", threshold), ("top_k", top_k)) if v is not None]
    if len(modes) > 1:
        raise PlanError(f"Pass at most one of budget_bytes, threshold, top_k (got {modes}).")
    if (budget is not None and budget < 0) or (budget_bytes is not None and budget_bytes < 0):
        raise PlanError("The budget must be >= 0 (a fraction of the NF4 footprint, e.g. 0.10 for +10%).")
    if top_k is not None and top_k < 0:
        raise PlanError("top_k must be >= 0.")

    names = frame["name"].tolist()
    forced_keep = _expand(keep, names, "keep")
    forced_quantize = _expand(quantize, names, "quantize")
    if clash := sorted(forced_keep & forced_quantize):
        raise PlanError(f"Modules both in keep= and quantize=: {clash[:5]}.")
    base = _base_plan(report, frame, preset)
    forced_keep |= set(base.keep) - forced_quantize

    rows = frame.set_index("name")
    candidates = [n for n in names if n not in forced_keep and n not in forced_quantize and n not in base.fixed]
    items = _items(rows, candidates, score, fuse)
    forced_cost = int(sum(_cost(rows, n) for n in forced_keep))

    if threshold is not None:
        chosen, mode = [i for i in items if i.value >= threshold], "threshold"
    elif top_k is not None:
        chosen, mode = sorted(items, key=lambda i: -i.value)[:top_k], "top_k"
    else:
        capacity = budget_bytes if budget_bytes is not None else int((budget or 0.0) * report.meta["bytes_4bit"])
        chosen, mode = _select_within(items, capacity, forced_cost), "budget"

    ranks = {name: rank for rank, name in enumerate(frame.sort_values(score, ascending=False)["name"], start=1)}
    reasons = dict(base.reasons)
    for name in forced_keep - set(base.keep):
        reasons[name] = {"rule": "keep"}
    for item in chosen:
        for name in item.names:
            reasons[name] = {
                "rule": mode,
                score: float(rows.at[name, score]),
                "rank": ranks[name],
                "extra_bytes": _cost(rows, name),
            }
    return Plan(
        keep=tuple(forced_keep | {n for item in chosen for n in item.names}),
        fixed=base.fixed,
        model_type=base.model_type,
        family=base.family,
        quant_type=report.meta.get("quant_type", base.quant_type),
        double_quant=report.meta.get("double_quant", base.double_quant),
        source=mode,
        reasons=reasons,
    )


def predicted_kl(report: Any, plan: Plan, score: str = "sensitivity") -> float:
    """KL (nats/token) the report predicts for ``plan``: the measured uniform-NF4 KL, reduced by the
    share of the total ``score`` that the kept modules carry (the estimator's scale is calibrated
    on the measured KL, since per-module estimates do not add up exactly).

    Example:
        >>> predicted_kl(report, dq.plan(report, budget=0.1)) <= report.meta["kl_uniform"]   # doctest: +SKIP
        True
    """
    scores = report.table.set_index("module")[score].clip(lower=0)
    total = float(scores.sum())
    kept = float(scores[scores.index.isin(plan.keep)].sum())
    return float(report.meta["kl_uniform"]) * (1 - kept / total) if total > 0 else float(report.meta["kl_uniform"])


def _base_plan(report: Any, frame: Any, preset: bool) -> Plan:
    """The uniform (or preset) plan of the analysed model, rebuilt from the report alone."""
    meta = report.meta
    family = registry.FAMILIES.get(meta.get("family"), registry.GENERIC)
    keep: list[str] = []
    if preset:
        infos = [
            registry.ModuleInfo(row.name, row.tower, row.group, None if row.layer is pd.NA else int(row.layer), 0, 0, False)
            for row in frame.itertuples()
        ]
        keep = family.preset(infos)
    return Plan(
        keep=tuple(keep),
        fixed=tuple(meta.get("output_heads", ())),
        model_type=meta.get("model_type"),
        family=family.name,
        source="preset" if preset else "uniform",
        reasons={name: {"rule": f"preset:{family.name}"} for name in keep},
    )


def _expand(patterns: Iterable[str], names: list[str], what: str) -> set[str]:
    selected: set[str] = set()
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = {n for n in names if n == pattern or matches_skip_pattern(pattern, n)}
        if not matched:
            raise PlanError(f"{what}={pattern!r} matches no module in the report (names look like {names[0]!r}).")
        selected |= matched
    return selected


def _cost(rows: Any, name: str) -> int:
    return int(rows.at[name, "bytes_16bit"]) - int(rows.at[name, "bytes_nf4"])


def _fuse_key(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    for index, group in enumerate(_FUSED):
        if leaf in group:
            return f"{parent}.<fused{index}>"
    return name


def _items(rows: Any, candidates: list[str], score: str, fuse: bool) -> list[_Item]:
    groups: dict[str, list[str]] = {}
    for name in candidates:
        groups.setdefault(_fuse_key(name) if fuse else name, []).append(name)
    return [
        _Item(tuple(members), float(sum(max(float(rows.at[n, score]), 0.0) for n in members)), sum(_cost(rows, n) for n in members))
        for members in groups.values()
    ]


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} bytes"


def _select_within(items: list[_Item], capacity: int, forced_cost: int) -> list[_Item]:
    """Exact 0/1 knapsack on bytes bucketed to 1/4096 of the capacity (costs rounded up)."""
    room = capacity - forced_cost
    if room < 0:
        raise PlanError(
            f"The modules forced to 16-bit (keep=/preset) cost {forced_cost / 2**20:.1f} MiB, more than the "
            f"budget of {capacity / 2**20:.1f} MiB. Raise the budget or force fewer modules."
        )
    affordable = [i for i in items if i.cost <= room and i.value > 0]
    if capacity > 0 and not affordable and items:
        cheapest = min(items, key=lambda i: i.cost)
        raise PlanError(
            f"The budget ({_size(room)} left) is too small for any module: the cheapest, "
            f"{cheapest.names[0]}, needs {_size(cheapest.cost)}. Raise the budget or use budget=0 for uniform NF4."
        )
    if not affordable:
        return []
    unit = max(room / _BUCKETS, 1.0)
    size = int(room // unit)
    weights = [math.ceil(i.cost / unit) for i in affordable]
    best = np.zeros(size + 1)
    took = np.zeros((len(affordable), size + 1), dtype=bool)
    for k, (item, w) in enumerate(zip(affordable, weights)):
        if w > size:
            continue
        candidate = best[: size + 1 - w] + item.value
        better = candidate > best[w:]
        took[k, w:] = better
        best[w:] = np.where(better, candidate, best[w:])
    chosen, c = [], size
    for k in range(len(affordable) - 1, -1, -1):
        if took[k, c]:
            chosen.append(affordable[k])
            c -= weights[k]
    return chosen[::-1]

