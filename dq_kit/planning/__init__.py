"""Step 4 — choose: ``dq.plan`` (an exact knapsack over a report's scores, or measured refinement),
``predicted_kl`` for any plan, and ``PlanOptions``, the options every planner takes.

Modules: ``options`` (``PlanOptions``), ``knapsack`` (the exact selection), ``report_plan`` (plans
from a report's scores), ``refine`` (plans from measured calibration KL), ``planner`` (``dq.plan``).

Example:
    >>> from dq_kit.planning import PlanOptions
    >>> PlanOptions(budget=0.2).budget
    0.2
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import PlanOptions

# Imported on first use, so that PlanOptions (which the CLI builds its flags from) stays light.
_NAMES = {"plan": "planner", "Refiner": "refine", "refine_plan": "refine", "plan_from_report": "report_plan", "predicted_kl": "report_plan"}

__all__ = ["PlanOptions", "Refiner", "plan", "plan_from_report", "predicted_kl", "refine_plan"]


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'dq_kit.planning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value
