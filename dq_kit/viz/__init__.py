"""Seeing it: the palette and sizes (``style``), report figures (``figures``) and the plan-selection figure
(``selection``). Figures only; every number they show is computed elsewhere.

Example:
    >>> from dq_kit.viz import report_figures, selection_figure
"""

from .figures import report_figures
from .selection import selection_figure

__all__ = ["report_figures", "selection_figure"]
