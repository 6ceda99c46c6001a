"""Notebook panels: choose the modules kept in 16-bit, compare variants, watch training.

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.widgets import CompareView, LayerSelector, LiveLossCallback
    >>> callback = LiveLossCallback(display=False)      # records the loss; draws it live in a notebook
    >>> callback.history
    []
"""

from .compare_view import CompareView
from .layer_selector import LayerSelector
from .live_loss import LiveLossCallback

__all__ = ["CompareView", "LayerSelector", "LiveLossCallback"]
