"""Step 4 — choose: ``dq.plan`` (an exact knapsack over a report's scores, or measured refinement),
``predicted_kl`` for any plan, and ``PlanOptions``, the options every planner takes.

Modules: ``options`` (``PlanOptions``), ``knapsack`` (the exact selection), ``report_plan`` (plans
from a report's scores), ``refine`` (plans from measured calibration KL), ``planner`` (``dq.plan``).

Example:
    >>> from dq_kit.planning import PlanOptions
    >>> PlanOptions(budget=0.2).budget
    0.2
"""

from .options import PlanOptions
from .planner import plan
from .refine import Refiner, refine_plan
from .report_plan import plan_from_report, predicted_kl

__all__ = ["PlanOptions", "Refiner", "plan", "plan_from_report", "predicted_kl", "refine_plan"]
