"""The one progress-bar helper and its one switch.

Every long dq_kit call takes ``progress=``: ``True`` / ``False`` force its bars on or off, and the
default ``None`` follows the global setting: the environment variable ``DQ_PROGRESS`` (``0``,
``false``, ``off`` or ``no`` turns every bar off), and bars only where they can redraw in place (a
notebook or a terminal, so logs written to a file get no walls of carriage returns).

Example:
    >>> list(progress_bar(range(3), False, "counting"))
    [0, 1, 2]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

ENV_SWITCH = "DQ_PROGRESS"


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show bars: ``progress`` when given, else ``DQ_PROGRESS`` and whether a bar can redraw here.

    Example:
        >>> progress_enabled(False), progress_enabled(True)
        (False, True)
    """
    if progress is not None:
        return bool(progress)
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "off", "no"):
        return False
    return _in_notebook() or _is_terminal(sys.stderr)


def progress_bar(iterable: Iterable[Any], progress: bool | None, desc: str, total: int | None = None, **options: Any) -> Iterable[Any]:
    """Wrap ``iterable`` in a transient ``tqdm`` bar labelled ``desc`` when :func:`progress_enabled` says so.

    Example:
        >>> sum(progress_bar([1, 2], progress=False, desc="adding"))
        3
    """
    if not progress_enabled(progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, **options)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ipython = getattr(shell, "get_ipython", lambda: None)() if shell else None
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
