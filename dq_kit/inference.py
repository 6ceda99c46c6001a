"""Answer questions with a (LoRA-adapted, quantized) model, one at a time or batched with scores.

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="dynamic")
    >>> answer = dq.generate(model, processor, dq.tiny.tiny_image(0), "What colour is the shape?", max_new_tokens=4)
    >>> isinstance(answer, str)
    True
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import PIL.Image
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, TextStreamer

from .data import load_image


def _tokenizer(processor: Any) -> PreTrainedTokenizerBase:
    return processor if isinstance(processor, PreTrainedTokenizerBase) else processor.tokenizer


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _encode(processor: Any, prompts: list[list[dict[str, Any]]], images: list[list[PIL.Image.Image]]) -> Any:
    """Chat-format and tokenize a batch of conversations (left-padded for generation)."""
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for messages in prompts]
    kwargs = {"return_tensors": "pt", "padding": True, "padding_side": "left", "add_special_tokens": False}
    if isinstance(processor, PreTrainedTokenizerBase):
        if any(images):
            raise ValueError("This model has a tokenizer, not an image processor: it is text-only, pass image=None.")
        return processor(texts, **kwargs)
    return processor(text=texts, images=images if any(images) else None, **kwargs)


def _generate(model: nn.Module, processor: Any, inputs: Any, max_new_tokens: int, streamer: TextStreamer | None = None) -> list[str]:
    tokenizer = _tokenizer(processor)
    inputs = inputs.to(_device(model))
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=streamer,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _user_turn(processor: Any, prompt: str, n_images: int) -> dict[str, Any]:
    if isinstance(processor, PreTrainedTokenizerBase):
        return {"role": "user", "content": prompt}
    return {"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": prompt}]}


def generate(
    model: nn.Module,
    processor: Any,
    image: PIL.Image.Image | str | os.PathLike | None,
    prompt: str,
    max_new_tokens: int = 128,
    stream: bool = False,
) -> str:
    """Answer ``prompt`` about ``image`` greedily and return the answer text alone (no prompt, no special tokens).

    Args:
        model: any model from :func:`dq_kit.load` or :func:`dq_kit.add_lora`.
        processor: its processor (or tokenizer for a text-only model).
        image: a PIL image, an image file path, or ``None`` for a text-only question.
        prompt: the user's question.
        max_new_tokens: generation length limit.
        stream: print the answer token by token as it is generated (``transformers.TextStreamer``).

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.load(dq.tiny.save_tiny("llama", "/tmp/tiny-llama"), quant="16bit")
        >>> isinstance(dq.generate(model, tok, None, "Hello?", max_new_tokens=3), str)
        True
    """
    images = [] if image is None else [load_image(image)]
    inputs = _encode(processor, [[_user_turn(processor, prompt, len(images))]], [images])
    streamer = TextStreamer(_tokenizer(processor), skip_prompt=True, skip_special_tokens=True) if stream else None
    with _eval_mode(model):
        return _generate(model, processor, inputs, max_new_tokens, streamer)[0]


# ---------------------------------------------------------------------------------------------
# Batched evaluation
# ---------------------------------------------------------------------------------------------


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
    content = messages[last]["content"]
    reference = content if isinstance(content, str) else " ".join(item["text"] for item in content if item.get("type") == "text")
    prompt = [
        {"role": message["role"], "content": message["content"] if isinstance(message["content"], str) else
         [{k: v for k, v in item.items() if v is not None} for item in message["content"]]}
        for message in messages[:last]
    ]
    return prompt, reference


def _question(prompt: list[dict[str, Any]]) -> str:
    content = prompt[-1]["content"]
    return content if isinstance(content, str) else " ".join(item.get("text", "") for item in content if item.get("type") == "text")


def evaluate_answers(
    model: nn.Module,
    processor: Any,
    dataset: Dataset,
    max_new_tokens: int = 32,
    batch_size: int = 8,
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
    records = []
    with _eval_mode(model):
        for start in tqdm(range(0, len(dataset), batch_size), desc="evaluating", leave=False):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            prompts, references, images = [], [], []
            for row in rows:
                prompt, reference = _split_row(row)
                prompts.append(prompt)
                references.append(reference)
                images.append([load_image(image) for image in row.get("images") or []])
            predictions = _generate(model, processor, _encode(processor, prompts, images), max_new_tokens)
            for offset, (prompt, reference, prediction) in enumerate(zip(prompts, references, predictions)):
                records.append(
                    {
                        "index": start + offset,
                        "question": _question(prompt),
                        "reference": reference,
                        "prediction": prediction,
                        "exact": normalize_answer(prediction) == normalize_answer(reference),
                        "f1": token_f1(prediction, reference),
                    }
                )
    return AnswerScores(pd.DataFrame.from_records(records))
