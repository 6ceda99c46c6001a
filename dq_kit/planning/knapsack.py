"""The exact knapsack behind every budgeted plan: choose items (modules, or groups that share a decision)
of the largest total value whose extra bytes fit a capacity.

Dynamic programming on bytes bucketed to 1/4096 of the capacity (costs rounded up, so a chosen set
always fits), not a greedy ratio sort: modules differ in size by 100x (an lm_head vs a k_proj), where
greedy wastes budget.

Example:
    >>> items = [Item(("a",), 3.0, 60), Item(("b",), 2.0, 50), Item(("c",), 2.0, 50)]
    >>> [item.names for item in select_within(items, capacity=100, forced_cost=0)]
    [('b',), ('c',)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import PlanError
from ..units import human_bytes

__all__ = ["BUCKETS", "Item", "select_within"]

BUCKETS = 4096


@dataclass(frozen=True)
class Item:
    """One decision: the modules it keeps in 16-bit, the value of keeping them, and their extra bytes."""

    names: tuple[str, ...]
    value: float
    cost: int


def select_within(items: list[Item], capacity: int, forced_cost: int) -> list[Item]:
    """The most valuable items whose costs fit ``capacity`` minus ``forced_cost`` (already spent).

    Raises :class:`dq_kit.PlanError` when the forced modules alone exceed the capacity, or when the
    capacity is positive but too small for any item.

    Example:
        >>> select_within([Item(("a",), 1.0, 10), Item(("b",), 0.5, 4)], capacity=12, forced_cost=0)
        [Item(names=('a',), value=1.0, cost=10)]
    """
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
            f"The budget ({human_bytes(room)} left) is too small for any module: the cheapest, "
            f"{cheapest.names[0]}, needs {human_bytes(cheapest.cost)}. Raise the budget or use budget=0 for uniform NF4."
        )
    if not affordable:
        return []
    unit = max(room / BUCKETS, 1.0)
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
