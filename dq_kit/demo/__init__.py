"""The shipped demo: the trained demo VLM (``model``) and the whole pipeline on it (``pipeline``, run by
``python -m dq_kit.demo``).

Example:
    >>> from dq_kit.demo import demo_model_path
    >>> demo_model_path().name
    'demo_model'
"""

from .model import demo_model_path, train_demo_model
from .pipeline import main, teach_skill

__all__ = ["demo_model_path", "main", "teach_skill", "train_demo_model"]
