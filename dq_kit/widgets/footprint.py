"""Whole-model footprints of a plan from an analysis report alone (no model, no weights).

The report's metadata holds the 16-bit and all-NF4 footprints of the whole model; a plan adds, for
every module it keeps, the difference between its 16-bit and NF4 bytes.

Example:
    >>> import pandas as pd
    >>> from dq_kit import Plan
    >>> from dq_kit.analysis import QuantReport
    >>> t = pd.DataFrame({"module": ["a", "b"], "bytes_16bit": [2048, 2048], "bytes_nf4": [600, 600]})
    >>> report = QuantReport(t, meta={"model_type": "llama", "bytes_16bit": 10_000, "bytes_4bit": 4_000})
    >>> report_memory(report, Plan(keep=("a",))).bytes_plan
    5448
"""

from __future__ import annotations

from typing import Any

from ..analysis.report import AnalysisError
from ..memory import MemoryEstimate
from ..plans import Plan

__all__ = ["REQUIRED_META", "report_memory"]

REQUIRED_META = ("bytes_16bit", "bytes_4bit")


def report_memory(report: Any, plan: Plan) -> MemoryEstimate:
    """Sizes of the analysed model in 16-bit, all-NF4 and under ``plan``, as a :class:`dq_kit.MemoryEstimate`.

    Example:
        >>> import pandas as pd
        >>> from dq_kit.analysis import QuantReport
        >>> report = QuantReport(pd.DataFrame({"module": ["a"], "bytes_16bit": [2048], "bytes_nf4": [600]}),
        ...                      meta={"bytes_16bit": 4096, "bytes_4bit": 2648})
        >>> round(report_memory(report, Plan(keep=("a",))).plan_overhead, 3)
        0.547
    """
    missing = [key for key in REQUIRED_META if key not in report.meta]
    if missing:
        raise AnalysisError(
            f"report.meta lacks {missing} (whole-model footprints): re-run dq.analyze with this dq_kit version."
        )
    table = report.table
    kept = table[table["module"].isin(plan.keep)]
    extra = int((kept["bytes_16bit"] - kept["bytes_nf4"]).sum())
    bytes_16bit = int(report.meta["bytes_16bit"])
    return MemoryEstimate(
        model=str(report.meta.get("name_or_path") or report.meta.get("model_type") or "model"),
        params=bytes_16bit // 2,
        bytes_16bit=bytes_16bit,
        bytes_4bit=int(report.meta["bytes_4bit"]),
        bytes_plan=int(report.meta["bytes_4bit"]) + extra,
        plan_source=plan.source,
        kept_modules=len(plan.keep),
    )
