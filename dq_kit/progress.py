"""The one progress-bar helper: ``tqdm`` (notebook-aware) when wanted, the plain iterable otherwise.

Example:
    >>> list(progress_bar(range(3), False, "counting"))
    [0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable[Any], progress: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """Wrap ``iterable`` in a transient ``tqdm`` bar labelled ``desc`` if ``progress`` is true.

    Example:
        >>> sum(progress_bar([1, 2], progress=False, desc="adding"))
        3
    """
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
