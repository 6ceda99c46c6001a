"""``PlanOptions``: what a plan should optimise and under which budget, validated once.

``dq.plan``, :class:`dq_kit.Refiner`, the layer-selection panel and ``dq-kit plan`` all take these
options; each field's help is in its ``metadata`` (as peft's ``LoraConfig`` does).

Example:
    >>> PlanOptions(budget=0.05, keep="lm_head").keep
    ('lm_head',)
    >>> PlanOptions(budget_bytes=2**20).mode
    'budget'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import PlanError

__all__ = ["MENUS", "PlanOptions"]

MENUS = ("auto", "full", "keep", "corrections")


@dataclass(frozen=True)
class PlanOptions:
    """Options of a plan, checked when the object is made (a bad combination raises :class:`dq_kit.PlanError`).

    Exactly one of ``budget`` / ``budget_bytes`` / ``threshold`` / ``top_k`` decides how many modules are
    kept (``budget`` is the default and is ignored when another is given).

    Example:
        >>> PlanOptions(threshold=1e-3).mode
        'threshold'
        >>> PlanOptions(budget=-1)
        Traceback (most recent call last):
        ...
        dq_kit.errors.PlanError: The budget must be >= 0 (a fraction of the NF4 footprint, e.g. 0.10 for +10%).
    """

    budget: float | None = field(
        default=0.10, metadata={"help": "extra memory over the all-NF4 footprint, as a fraction (0.10: at most 1.10x)"}
    )
    budget_bytes: int | None = field(default=None, metadata={"help": "the same budget in bytes (overrides budget)"})
    threshold: float | None = field(default=None, metadata={"help": "keep every module whose score is at least this"})
    top_k: int | None = field(default=None, metadata={"help": "keep the top_k highest-scoring modules (after fusing)"})
    keep: tuple[str, ...] = field(default=(), metadata={"help": "names or regexes always kept in 16-bit (counted in the budget)"})
    quantize: tuple[str, ...] = field(default=(), metadata={"help": "names or regexes left in plain NF4 (never kept, never corrected)"})
    preset: bool = field(default=False, metadata={"help": "start from the architecture preset, add automatic picks on top"})
    score: str = field(default="sensitivity", metadata={"help": "report column to maximise (estimated KL removed, in nats)"})
    fuse: bool = field(default=False, metadata={"help": "q/k/v and gate/up projections of one block share a decision"})
    menu: str = field(
        default="auto",
        metadata={"help": "per-module choices: 'full' (NF4, NF4 + low-rank correction, 16-bit), 'keep' (NF4 or 16-bit), "
                          "'corrections' (NF4 or NF4 + correction); 'auto' is 'full' for a report with corrections, else 'keep'"},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", _patterns(self.keep, "keep"))
        object.__setattr__(self, "quantize", _patterns(self.quantize, "quantize"))
        modes = [m for m, v in (("budget_bytes", self.budget_bytes), ("threshold", self.threshold), ("top_k", self.top_k)) if v is not None]
        if len(modes) > 1:
            raise PlanError(f"Pass at most one of budget_bytes, threshold, top_k (got {modes}).")
        if self.budget is None and not modes:
            raise PlanError("budget=None leaves nothing to plan by: pass a budget (0.10 for +10%), budget_bytes=, threshold= or top_k=.")
        _check_number("budget", self.budget, "a fraction of the NF4 footprint, e.g. 0.10 for +10%")
        _check_number("budget_bytes", self.budget_bytes, "a number of bytes, e.g. 200_000_000", integer=True)
        _check_number("threshold", self.threshold, "a score, e.g. 1e-3")
        _check_number("top_k", self.top_k, "a number of modules, e.g. 10", integer=True)
        if self.budget is not None and self.budget < 0 or self.budget_bytes is not None and self.budget_bytes < 0:
            raise PlanError("The budget must be >= 0 (a fraction of the NF4 footprint, e.g. 0.10 for +10%).")
        if self.top_k is not None and self.top_k < 0:
            raise PlanError("top_k must be >= 0.")
        if self.budget is not None and self.budget > 1 and not modes:
            warnings.warn(f"budget={self.budget} allows +{self.budget:.0%} over the all-NF4 footprint; a budget is a fraction "
                          "(0.10 for +10%).", stacklevel=4)
        if not isinstance(self.score, str) or not self.score:
            raise PlanError(f"score must be the name of a report column, got {self.score!r}.")
        if self.menu not in MENUS:
            raise PlanError(f"menu must be one of {MENUS}, got {self.menu!r}.")
        if self.menu in ("full", "corrections"):
            self.require_budget(f"menu={self.menu!r}")

    @property
    def mode(self) -> str:
        """``"threshold"``, ``"top_k"`` or ``"budget"`` (``budget`` and ``budget_bytes``)."""
        if self.threshold is not None:
            return "threshold"
        if self.top_k is not None:
            return "top_k"
        return "budget"

    def require_budget(self, what: str) -> None:
        """Raise :class:`dq_kit.PlanError` unless the options are in a budget mode (``what`` names the caller).

        Example:
            >>> PlanOptions(budget=0.2).require_budget("refine=")
        """
        if self.mode != "budget":
            raise PlanError(f"{what} works with budget= or budget_bytes=, not threshold= or top_k=.")

    def resolved_menu(self, has_corrections: bool) -> str:
        """The menu to plan with for a report with or without corrections (``"auto"`` resolved).

        Example:
            >>> PlanOptions().resolved_menu(True), PlanOptions(top_k=3).resolved_menu(True)
            ('full', 'keep')
        """
        if self.menu == "auto":
            return "full" if has_corrections and self.mode == "budget" else "keep"
        if self.menu != "keep" and not has_corrections:
            raise PlanError(
                f"menu={self.menu!r} needs a report with corrections: re-run dq.analyze(..., corrections=True) "
                "(or keep its .corrections.*.safetensors file beside the report JSON)."
            )
        return self.menu

    def capacity(self, bytes_4bit: int) -> int:
        """The budget in bytes for a model whose all-NF4 footprint is ``bytes_4bit``.

        Example:
            >>> PlanOptions(budget=0.5).capacity(1000)
            500
        """
        return self.budget_bytes if self.budget_bytes is not None else int((self.budget or 0.0) * bytes_4bit)

    def replace(self, **changes: Any) -> PlanOptions:
        """A copy with ``changes`` applied (and validated again).

        Example:
            >>> PlanOptions().replace(fuse=True).fuse
            True
        """
        return dataclasses.replace(self, **changes)


def _check_number(name: str, value: Any, example: str, *, integer: bool = False) -> None:
    """Raise :class:`dq_kit.PlanError` unless ``value`` is ``None`` or a finite number (a whole one with ``integer``)."""
    if value is None:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PlanError(f"{name} must be {'a whole number' if integer else 'a number'} ({example}), got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise PlanError(f"{name} must be finite ({example}), got {value!r}.")


def _patterns(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise PlanError(f"{what}= takes a module name, a regex or a list of them, got {type(value).__name__}.") from None
    if bad := [p for p in patterns if not isinstance(p, str)]:
        raise PlanError(f"{what}= takes module names or regexes (strings), got {bad[0]!r}.")
    return patterns
