"""Data: fine-tuning datasets (``finetune``: convert, check, validate, prepare), the shapes dataset,
calibration sets, chat encoding and image opening.

Example:
    >>> import dq_kit as dq
    >>> len(dq.data.shapes_dataset(4, task="colour", test_size=None))
    4
"""

from ..errors import DataError
from .finetune import (
    ANSWER_COLUMNS,
    IMAGE_COLUMNS,
    MESSAGES_FEATURE,
    QUESTION_COLUMNS,
    RowProblem,
    ValidationReport,
    check,
    convert,
    load_image,
    prepare,
    validate,
)
from .shapes import shapes_dataset, shapes_example

__all__ = ["ANSWER_COLUMNS", "IMAGE_COLUMNS", "MESSAGES_FEATURE", "QUESTION_COLUMNS", "DataError", "RowProblem", "ValidationReport", "check", "convert", "load_image", "prepare", "shapes_dataset", "shapes_example", "validate"]
