"""Answer scores: exact match and token F1 of generated answers against reference answers (``dq.evaluate_answers``).

Example:
    >>> normalize_answer("The red square!")
    'red square'
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
from datasets import Dataset
from torch import nn

from ..data.chat import text_of
from ..data.images import load_image
from ..errors import DQError
from ..progress import progress_bar
from .generation import encode_prompts, eval_mode, generate_from_inputs

__all__ = ["AnswerScores", "evaluate_answers", "normalize_answer", "token_f1"]


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse spaces (SQuAD-style).

    Example:
        >>> normalize_answer("A red Square, on the left.")
        'red square on left'
    """
    text = "".join(char for char in text.lower() if char not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after :func:`normalize_answer` (1.0 when both are empty).

    Example:
        >>> round(token_f1("a red circle", "a red square"), 2)
        0.5
    """
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass
class AnswerScores:
    """Per-sample predictions (``table``) and their means: exact match and token F1."""

    table: pd.DataFrame

    @property
    def exact_match(self) -> float:
        """Fraction of answers equal to the reference after normalization."""
        return float(self.table["exact"].mean())

    @property
    def token_f1(self) -> float:
        """Mean token F1 against the reference."""
        return float(self.table["f1"].mean())

    @property
    def summary(self) -> dict[str, float]:
        """``{"n", "exact_match", "token_f1"}`` as plain numbers (JSON-ready)."""
        return {"n": len(self.table), "exact_match": self.exact_match, "token_f1": self.token_f1}

    def __repr__(self) -> str:
        return f"AnswerScores(n={len(self.table)}, exact_match={self.exact_match:.3f}, token_f1={self.token_f1:.3f})"

    def _repr_html_(self) -> str:
        return f"<p>{self!r}</p>" + self.table.to_html(max_rows=20)


def _split_row(row: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    messages = list(row["messages"])
    last = max((index for index, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("A row has no assistant turn to use as the reference answer.")
    reference = text_of(messages[last]["content"])
    prompt = [
        {"role": message["role"], "content": message["content"] if isinstance(message["content"], str) else
         [{k: v for k, v in item.items() if v is not None} for item in message["content"]]}
        for message in messages[:last]
    ]
    return prompt, reference


def evaluate_answers(
    model: nn.Module,
    processor: Any,
    dataset: Dataset,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    *,
    progress: bool | None = None,
) -> AnswerScores:
    """Generate an answer for every row (greedy, batched) and score it against the row's last assistant turn.

    Rows are in the conversational format (:mod:`dq_kit.data`): the turns before the last
    assistant turn are the prompt, that turn's text is the reference.

    Returns:
        :class:`AnswerScores`: ``.table`` (a DataFrame: index, question, reference, prediction,
        exact, f1), ``.exact_match``, ``.token_f1`` and ``.summary``.

    Example:
        >>> import dq_kit as dq
        >>> model, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="16bit")
        >>> scores = dq.evaluate_answers(model, processor, dq.data.shapes_dataset(8, task="colour")["test"], max_new_tokens=3)
        >>> sorted(scores.summary)
        ['exact_match', 'n', 'token_f1']
    """
    if isinstance(dataset, (list, tuple)):
        dataset = Dataset.from_list(list(dataset))
    if dataset is None or len(dataset) == 0:
        raise DQError("evaluate_answers needs at least one row to score; the dataset is empty.")
    records = []
    with eval_mode(model):
        for start in progress_bar(range(0, len(dataset), batch_size), progress, "evaluating"):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            prompts, references, images = [], [], []
            for row in rows:
                prompt, reference = _split_row(row)
                prompts.append(prompt)
                references.append(reference)
                images.append([load_image(image) for image in row.get("images") or []])
            predictions = generate_from_inputs(model, processor, encode_prompts(processor, prompts, images), max_new_tokens)
            for offset, (prompt, reference, prediction) in enumerate(zip(prompts, references, predictions)):
                records.append(
                    {
                        "index": start + offset,
                        "question": text_of(prompt[-1]["content"]),
                        "reference": reference,
                        "prediction": prediction,
                        "exact": normalize_answer(prediction) == normalize_answer(reference),
                        "f1": token_f1(prediction, reference),
                    }
                )
    return AnswerScores(pd.DataFrame.from_records(records))
