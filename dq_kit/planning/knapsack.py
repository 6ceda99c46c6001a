"""The exact knapsack behind every budgeted plan: choose items (modules, or groups that share a decision)
of the largest total value whose extra bytes fit a capacity.

Dynamic programming on bytes bucketed to 1/4096 of the capacity, finer for small items (costs
rounded up, so a chosen set always fits), not a greedy ratio sort: modules differ in size by 100x (an lm_head vs a k_proj), where
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

__all__ = ["BUCKETS", "MAX_BUCKETS", "Item", "bucket_bytes", "select_options", "select_within"]

BUCKETS = 4096
MAX_BUCKETS = 65536


@dataclass(frozen=True)
class Item:
    """One decision: the modules it concerns, the value of taking it, and its extra bytes.

    ``rank`` 0 keeps the modules in 16-bit; a positive ``rank`` gives each of them an NF4 + rank-r correction.
    """

    names: tuple[str, ...]
    value: float
    cost: int
    rank: int = 0


def select_within(items: list[Item], capacity: int, forced_cost: int) -> list[Item]:
    """The most valuable items whose costs fit ``capacity`` minus ``forced_cost`` (already spent).

    Raises :class:`dq_kit.PlanError` when the forced modules alone exceed the capacity, or when the
    capacity is positive but too small for any item.

    Example:
        >>> select_within([Item(("a",), 1.0, 10), Item(("b",), 0.5, 4)], capacity=12, forced_cost=0)
        [Item(names=('a',), value=1.0, cost=10, rank=0)]
    """
    return select_options([[item] for item in items], capacity, forced_cost)


def bucket_bytes(room: int, smallest: int) -> float:
    """The byte resolution of the knapsack: 1/4096 of the budget, finer when the smallest item is
    smaller than 8 buckets (a rank-4 correction next to whole 16-bit layers), never more than 65536 buckets.

    Example:
        >>> bucket_bytes(4096 * 1000, smallest=10**6), bucket_bytes(4096 * 1000, smallest=800)
        (1000.0, 100.0)
    """
    return max(min(room / BUCKETS, smallest / 8), room / MAX_BUCKETS, 1.0)


def select_options(groups: list[list[Item]], capacity: int, forced_cost: int) -> list[Item]:
    """Multiple-choice knapsack: at most one item of each group, the most valuable total that fits.

    Each group holds the alternatives for one module (or fused set): 16-bit, NF4 + rank-r
    correction for several r, ...; taking none leaves it at plain NF4. Errors as :func:`select_within`.

    Example:
        >>> menu = [[Item(("a",), 1.0, 10), Item(("a",), 0.8, 2, rank=8)], [Item(("b",), 0.5, 6)]]
        >>> [(i.names, i.rank) for i in select_options(menu, capacity=9, forced_cost=0)]
        [(('a',), 8), (('b',), 0)]
    """
    room = capacity - forced_cost
    if room < 0:
        raise PlanError(
            f"The modules forced to 16-bit (keep=/preset) cost {forced_cost / 2**20:.1f} MiB, more than the "
            f"budget of {capacity / 2**20:.1f} MiB. Raise the budget or force fewer modules."
        )
    items = [item for group in groups for item in group]
    affordable = [[i for i in group if i.cost <= room and i.value > 0] for group in groups]
    affordable = [group for group in affordable if group]
    if capacity > 0 and not affordable and items:
        cheapest = min(items, key=lambda i: i.cost)
        raise PlanError(
            f"The budget ({human_bytes(room)} left) is too small for any module: the cheapest, "
            f"{cheapest.names[0]}, needs {human_bytes(cheapest.cost)}. Raise the budget or use budget=0 for uniform NF4."
        )
    if not affordable:
        return []
    unit = bucket_bytes(room, min(item.cost for group in affordable for item in group))
    size = int(room // unit)
    best = np.zeros(size + 1)
    took = np.full((len(affordable), size + 1), -1, dtype=np.int16)
    for g, group in enumerate(affordable):
        updated = best.copy()
        for k, item in enumerate(group):
            w = math.ceil(item.cost / unit)
            if w > size:
                continue
            candidate = best[: size + 1 - w] + item.value
            better = candidate > updated[w:]
            took[g, w:][better] = k
            updated[w:] = np.where(better, candidate, updated[w:])
        best = updated
    chosen, c = [], size
    for g in range(len(affordable) - 1, -1, -1):
        k = took[g, c]
        if k >= 0:
            item = affordable[g][k]
            chosen.append(item)
            c -= math.ceil(item.cost / unit)
    return chosen[::-1]
