"""Plans from a ``QuantReport`` alone: the knapsack over the report's per-module scores, and the
quality the report predicts for any plan.

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.planning.options import PlanOptions
    >>> model, processor = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="16bit")
    >>> report = dq.analyze(model, processor, ["a red square", "two blue circles"], progress=False)
    >>> plan_from_report(report, PlanOptions(budget=0.10)).source
    'budget'
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import pandas as pd

from ..analysis.report import FULL_SENSITIVITY, GAIN_PREFIX, gain_ranks
from ..errors import PlanError
from ..models import registry
from ..quant.footprint import correction_bytes
from ..quant.plan import Plan, matches_skip_pattern
from .knapsack import Item, select_options
from .options import PlanOptions

__all__ = ["candidate_items", "expand_patterns", "extra_bytes", "menu_groups", "option_cost", "option_gain", "plan_from_report", "predicted_kl", "value_column"]

FUSED_PROJECTIONS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def plan_from_report(report: Any, options: PlanOptions, *, bytes_4bit: int | None = None, output_heads: list[str] | None = None) -> Plan:
    """Keep in 16-bit the modules that recover the most estimated quality per extra byte (see :func:`dq_kit.plan`).

    ``bytes_4bit`` and ``output_heads`` stand in for the report's all-NF4 footprint and output heads
    (for reports made without them); the report itself is never modified.

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> report = dq.analyze(model, tok, ["A red circle."], progress=False)
        >>> plan_from_report(report, PlanOptions(top_k=2)).source
        'top_k'
    """
    frame = report.table.rename(columns={"module": "name"})
    score = options.score
    if score not in frame.columns:
        raise PlanError(f"The report has no {score!r} column; available: {sorted(frame.columns)}.")
    names = frame["name"].tolist()
    forced_keep = expand_patterns(options.keep, names, "keep")
    forced_quantize = expand_patterns(options.quantize, names, "quantize")
    if clash := sorted(forced_keep & forced_quantize):
        raise PlanError(f"Modules both in keep= and quantize=: {clash[:5]}.")
    base = _base_plan(report, frame, options.preset, output_heads)
    forced_keep |= set(base.keep) - forced_quantize

    rows = frame.set_index("name")
    candidates = [n for n in names if n not in forced_keep and n not in forced_quantize and n not in base.fixed]
    menu = options.resolved_menu(bool(getattr(report, "has_corrections", False)))
    forced_cost = int(sum(extra_bytes(rows, n) for n in forced_keep))

    mode = options.mode
    if mode == "threshold":
        chosen = [i for i in candidate_items(rows, candidates, score, options.fuse) if i.value >= options.threshold]
    elif mode == "top_k":
        chosen = sorted(candidate_items(rows, candidates, score, options.fuse), key=lambda i: -i.value)[: options.top_k]
    else:
        total_4bit = bytes_4bit if bytes_4bit is not None else report.meta_number("bytes_4bit")
        groups = menu_groups(report, rows, candidates, value_column(frame.columns, score, menu), options.fuse, menu)
        chosen = select_options(groups, options.capacity(total_4bit), forced_cost)

    ranks = {name: rank for rank, name in enumerate(frame.sort_values(score, ascending=False)["name"], start=1)}
    reasons = dict(base.reasons)
    for name in forced_keep - set(base.keep):
        reasons[name] = {"rule": "keep"}
    for item in chosen:
        for name in item.names:
            reasons[name] = {
                "rule": mode,
                "choice": f"nf4+r{item.rank}" if item.rank else "16bit",
                score: float(rows.at[name, score]),
                "rank": ranks[name],
                "extra_bytes": option_cost(rows, name, item.rank),
            }
            if item.rank:
                reasons[name]["gain"] = option_gain(rows, name, item.rank, value_column(frame.columns, score, menu))
    return Plan(
        keep=tuple(forced_keep | {n for item in chosen if not item.rank for n in item.names}),
        fixed=base.fixed,
        model_type=base.model_type,
        family=base.family,
        identity=base.identity,
        quant_type=report.meta.get("quant_type", base.quant_type),
        double_quant=report.meta.get("double_quant", base.double_quant),
        source=mode,
        reasons=reasons,
        corrections={n: item.rank for item in chosen if item.rank for n in item.names},
    )


def value_column(columns: Any, score: str, menu: str) -> str:
    """The column that values 16-bit keeps: ``score``, except that the menus with corrections weigh
    the default ``"sensitivity"`` in the full-Fisher form the correction gains are measured in.

    Example:
        >>> value_column(["sensitivity", "sensitivity_full"], "sensitivity", "full"), value_column(["sensitivity"], "sensitivity", "full")
        ('sensitivity_full', 'sensitivity')
    """
    return FULL_SENSITIVITY if menu != "keep" and score == "sensitivity" and FULL_SENSITIVITY in columns else score


def menu_groups(report: Any, rows: Any, candidates: list[str], score: str, fuse: bool, menu: str) -> list[list[Item]]:
    """One group of alternatives per module (or fused set): 16-bit and/or NF4 + correction at each fitted rank.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis.report import QuantReport
        >>> rows = pd.DataFrame({"s": [1.0], "bytes_16bit": [800], "bytes_nf4": [230], "in_features": [20], "out_features": [20],
        ...                      "gain_r4": [0.6]}, index=["m"])
        >>> [(i.rank, i.cost) for i in menu_groups(None, rows, ["m"], "s", False, "full")[0]]
        [(0, 570), (4, 320)]
    """
    ranks = gain_ranks(rows.columns)
    fitted = {name: int(a.shape[0]) for name, (a, _) in getattr(report, "corrections", {}).items()} if report is not None else None
    groups = []
    for keep_item in candidate_items(rows, candidates, score, fuse):
        options = [keep_item] if menu in ("keep", "full") else []
        if menu in ("full", "corrections"):
            for rank in ranks:
                if all(_correctable(rows, n, rank, fitted) for n in keep_item.names):
                    value = sum(option_gain(rows, n, rank, score) for n in keep_item.names)
                    options.append(Item(keep_item.names, value, sum(option_cost(rows, n, rank) for n in keep_item.names), rank))
        if options:
            groups.append(options)
    return groups


def _correctable(rows: Any, name: str, rank: int, fitted: dict[str, int] | None) -> bool:
    gain = rows.at[name, f"{GAIN_PREFIX}{rank}"]
    return not pd.isna(gain) and (fitted is None or fitted.get(name, 0) >= rank)


def option_gain(rows: Any, name: str, rank: int, score: str = "sensitivity") -> float:
    """Estimated KL an option removes: the module's ``score`` for 16-bit (rank 0), its correction gain
    (clipped to ``[0, score]``) for NF4 + rank-r.

    Example:
        >>> option_gain(pd.DataFrame({"sensitivity": [0.2], "gain_r8": [0.5]}, index=["m"]), "m", 8)
        0.2
    """
    total = max(float(rows.at[name, score]), 0.0)
    if not rank:
        return total
    column = f"{GAIN_PREFIX}{rank}"
    gain = rows.at[name, column] if column in rows.columns else float("nan")
    if pd.isna(gain):
        raise PlanError(f"The report has no rank-{rank} correction for {name!r}; re-run dq.analyze(..., corrections=True) "
                        "with that rank in ranks=.")
    return min(max(float(gain), 0.0), total)


def option_cost(rows: Any, name: str, rank: int) -> int:
    """Bytes an option adds over NF4: 16-bit minus NF4 bytes (rank 0), or the bf16 factors ``2·r·(in+out)``.

    Example:
        >>> option_cost(pd.DataFrame({"bytes_16bit": [800], "bytes_nf4": [230], "in_features": [20], "out_features": [20]},
        ...             index=["m"]), "m", 4)
        320
    """
    if not rank:
        return extra_bytes(rows, name)
    return correction_bytes(rank, int(rows.at[name, "in_features"]), int(rows.at[name, "out_features"]))


def predicted_kl(report: Any, plan: Plan, score: str = "sensitivity") -> float:
    """KL (nats/token) the report predicts for ``plan``: the measured uniform-NF4 KL, reduced by the
    share of the total ``score`` that the plan removes — the full score of a kept module, the
    Fisher gain of a corrected one (the estimator's scale is calibrated on the measured KL, since
    per-module estimates do not add up exactly). For a report with corrections, ``"sensitivity"``
    is taken in its full-Fisher form (``sensitivity_full``), the form the gains are measured in, for
    every plan alike.

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> report = dq.analyze(model, tok, ["A red circle.", "Two blue squares."], progress=False)
        >>> predicted_kl(report, dq.plan(report, budget=0.5)) <= report.meta["kl_uniform"]
        True
    """
    rows = report.table.set_index("module")
    check_plan_fits_report(plan, report)
    score = value_column(rows.columns, score, "full")
    scores = rows[score].clip(lower=0)
    total = float(scores.sum())
    removed = float(scores[scores.index.isin(plan.keep)].sum())
    removed += sum(option_gain(rows, name, rank, score) for name, rank in plan.corrections.items())
    kl_uniform = report.meta_number("kl_uniform")
    return kl_uniform * (1 - removed / total) if total > 0 else kl_uniform


def check_plan_fits_report(plan: Plan, report: Any) -> None:
    """Raise :class:`dq_kit.PlanError` when ``plan`` names modules ``report`` does not list or was made
    for another architecture; warn when it was made for another model of the same type.

    Example:
        >>> import pandas as pd, dq_kit as dq
        >>> report = dq.QuantReport(pd.DataFrame({"module": ["a"], "sensitivity": [1.0]}), meta={"model_type": "llama"})
        >>> check_plan_fits_report(Plan(keep=("b",), model_type="llama"), report)
        Traceback (most recent call last):
        ...
        dq_kit.errors.PlanError: The plan names 1 module(s) this report does not list (e.g. 'b'): it was made for another model. Make the plan from this report: dq.plan(report).
    """
    meta = report.meta
    if plan.model_type and meta.get("model_type") and plan.model_type != meta["model_type"]:
        raise PlanError(f"The plan was made for a {plan.model_type!r} model, the report for a {meta['model_type']!r} one. "
                        "Make the plan from this report: dq.plan(report).")
    listed = set(report.table["module"])
    if missing := [name for name in (*plan.keep, *plan.corrections) if name not in listed]:
        raise PlanError(f"The plan names {len(missing)} module(s) this report does not list (e.g. {missing[0]!r}): "
                        "it was made for another model. Make the plan from this report: dq.plan(report).")
    if why := registry.different_models(plan.identity, meta.get("identity") or {}):
        warnings.warn(f"The plan was made for another {meta.get('model_type')} model than the report ({why}); "
                      "its predicted quality is not this model's. Make the plan from this report: dq.plan(report).", stacklevel=3)


def expand_patterns(patterns: Iterable[str], names: list[str], what: str) -> set[str]:
    """The report's module names matched by ``patterns`` (exact names or skip-list patterns); each must match one.

    Example:
        >>> sorted(expand_patterns(["a.mlp"], ["a.mlp.up", "a.attn.q"], "keep"))
        ['a.mlp.up']
    """
    selected: set[str] = set()
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = {n for n in names if n == pattern or matches_skip_pattern(pattern, n)}
        if not matched:
            raise PlanError(f"{what}={pattern!r} matches no module in the report (names look like {names[0]!r}).")
        selected |= matched
    return selected


def extra_bytes(rows: Any, name: str) -> int:
    """Bytes that keeping module ``name`` in 16-bit adds over NF4 (``rows``: the report table indexed by name).

    Example:
        >>> extra_bytes(pd.DataFrame({"bytes_16bit": [100], "bytes_nf4": [30]}, index=["m"]), "m")
        70
    """
    return int(rows.at[name, "bytes_16bit"]) - int(rows.at[name, "bytes_nf4"])


def candidate_items(rows: Any, candidates: list[str], score: str, fuse: bool) -> list[Item]:
    """Knapsack items of ``candidates``: one per module, or one per fused group (q/k/v, gate/up) with ``fuse``.

    Example:
        >>> rows = pd.DataFrame({"s": [1.0, 2.0], "bytes_16bit": [10, 10], "bytes_nf4": [3, 3]}, index=["l.q_proj", "l.k_proj"])
        >>> candidate_items(rows, ["l.q_proj", "l.k_proj"], "s", fuse=True)
        [Item(names=('l.q_proj', 'l.k_proj'), value=3.0, cost=14, rank=0)]
    """
    groups: dict[str, list[str]] = {}
    for name in candidates:
        groups.setdefault(_fuse_key(name) if fuse else name, []).append(name)
    return [
        Item(tuple(members), float(sum(max(float(rows.at[n, score]), 0.0) for n in members)), sum(extra_bytes(rows, n) for n in members))
        for members in groups.values()
    ]


def _base_plan(report: Any, frame: Any, preset: bool, output_heads: list[str] | None) -> Plan:
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
        fixed=tuple(meta.get("output_heads", output_heads or ())),
        model_type=meta.get("model_type"),
        family=family.name,
        identity=meta.get("identity") or {},
        source="preset" if preset else "uniform",
        reasons={name: {"rule": f"preset:{family.name}"} for name in keep},
    )


def _fuse_key(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    for index, group in enumerate(FUSED_PROJECTIONS):
        if leaf in group:
            return f"{parent}.<fused{index}>"
    return name
