"""Step 3 and 6 — check: generation, answer scores, and the side-by-side comparison of variants.

Example:
    >>> from dq_kit.evaluation import compare, evaluate_answers, generate
"""

from .compare import ComparisonResult, compare
from .generation import generate
from .scores import AnswerScores, evaluate_answers, normalize_answer, token_f1

__all__ = ["AnswerScores", "ComparisonResult", "compare", "evaluate_answers", "generate", "normalize_answer", "token_f1"]
