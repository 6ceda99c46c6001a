"""Calibration data for :func:`dq_kit.analyze`: a default offline set and normalisation of user data.

Three forms are accepted and turned into one model-input dict per sample:

* plain strings (language models, or text-only turns of a VLM);
* chat samples in TRL's conversational format, ``{"messages": [...], "images": [...]}``, where a
  message's content is a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
  items and ``images`` holds one PIL image (or image path) per image item, in order;
* ready model-input dicts (``{"input_ids": ..., "attention_mask": ..., "pixel_values": ...}``).

Each prepared sample also carries a *score mask*: the positions whose next-token distribution the
analysis scores. For chat samples that end in an assistant turn these are the answer tokens;
otherwise every non-padding text position. Image-placeholder tokens are never scored.

Example:
    >>> import dq_kit as dq
    >>> samples = dq.default_calibration(n=4)
    >>> batches = prepare_calibration(samples, dq.tiny.tiny_processor("qwen2_vl"))
    >>> len(batches), sorted(batches[0].inputs)[:2]
    (4, ['attention_mask', 'image_grid_thw'])
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import PIL.ImageDraw
import torch

from ..errors import CalibrationError
from ..synthetic.drawing import PALETTE, SHAPES, draw_shape
from .chat import encode_chat, has_image_processor, tokenizer_of
from .images import open_image

__all__ = ["CalibrationError", "CalibrationSample", "default_calibration", "prepare_calibration"]


@dataclass
class CalibrationSample:
    """One prepared calibration sample: model inputs (batch of one) and the positions to score.

    Attributes:
        inputs: tensors for ``model(**inputs)``, each with a leading batch dimension of 1.
        score_mask: bool tensor ``[seq_len]``; ``True`` at position ``t`` means the model's
            prediction at ``t`` (of token ``t + 1``) counts in KL and Fisher scores.
    """

    inputs: dict[str, torch.Tensor]
    score_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Number of input tokens (including image placeholders)."""
        return int(self.inputs["input_ids"].shape[-1])

    @property
    def num_scored(self) -> int:
        """Number of scored positions."""
        return int(self.score_mask.sum())


# --------------------------------------------------------------------------------------------
# The default calibration set
# --------------------------------------------------------------------------------------------

_SIZES = ("small", "medium-sized", "large")
_QUESTIONS = (
    "What is in the image?",
    "Describe the picture in one sentence.",
    "What colour is the shape?",
    "What shape do you see?",
    "How many shapes are there?",
    "Where is the {shape} in the image?",
    "Is the background darker than the shape?",
    "Write a short caption for this image.",
    "Answer briefly: what object is shown and what colour is it?",
    "List the colours you can see.",
)
_TEXT_PROMPTS = (
    ("Explain in two sentences why the sky looks blue.",
     "Sunlight is scattered by the molecules of the air, and blue light is scattered much more than red. "
     "So wherever you look away from the sun, the sky sends mostly blue light to your eyes."),
    ("Write a haiku about autumn.", "Red leaves drift and fall,\ncold wind hums through empty trees,\nthe year exhales slow."),
    ("What is 17 times 23? Show the steps.", "17 x 23 = 17 x 20 + 17 x 3 = 340 + 51 = 391."),
    ("Translate 'good morning, how are you?' into French.", "Bonjour, comment allez-vous ?"),
    ("Give three tips for writing clear code.",
     "1. Name things for what they mean. 2. Keep functions short and focused. 3. Write tests that show intent."),
    ("Summarise the plot of Romeo and Juliet in one sentence.",
     "Two young lovers from feuding families marry in secret, and a chain of misunderstandings ends in both their deaths."),
    ("Write a Python function that reverses a string.", "def reverse(text: str) -> str:\n    return text[::-1]"),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
)


def _draw_image(rng: random.Random, size: int) -> tuple[PIL.Image.Image, str, str, str, str]:
    """One to three shapes on a plain or two-tone background; returns the image and a description."""
    background, colour = rng.sample(sorted(PALETTE), 2)
    image = PIL.Image.new("RGB", (size, size), PALETTE[background])
    draw = PIL.ImageDraw.Draw(image)
    if rng.random() < 0.3:  # a horizon: two-tone background
        draw.rectangle((0, size * 2 // 3, size, size), fill=PALETTE[rng.choice(sorted(PALETTE))])
    count = rng.choice((1, 1, 2, 3))
    shape = rng.choice(SHAPES)
    where = ""
    for index in range(count):
        extent = rng.randint(size // 5, size // 2)
        left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
        box = (left, top, left + extent, top + extent)
        fill = PALETTE[colour] if index == 0 else PALETTE[rng.choice(sorted(PALETTE))]
        draw_shape(draw, shape if index == 0 else rng.choice(SHAPES), box, fill)
        if index == 0:
            horizontal = "left" if left + extent / 2 < size / 3 else "right" if left + extent / 2 > 2 * size / 3 else "centre"
            vertical = "top" if top + extent / 2 < size / 2 else "bottom"
            where = f"{vertical} {horizontal}" if horizontal != "centre" else f"{vertical} centre"
    amount = {1: "one", 2: "two", 3: "three"}[count]
    return image, shape, colour, background, f"{amount} shape{'s' if count > 1 else ''}, the {colour} {shape} near the {where}"


def default_calibration(n: int = 32, seed: int = 0, *, images: bool = True, image_size: int = 224) -> list[dict[str, Any]]:
    """A calibration set that works offline: chat samples with PIL-drawn images, plus text-only chats.

    Every sample is a TRL conversational sample ``{"messages": [user, assistant], "images": [...]}``
    with a varied question and a matching answer. With ``images=True`` three samples in four carry
    an image (one ``{"type": "image"}`` item) and the rest are text-only chats; ``images=False``
    gives text-only chats for language models. Deterministic for a given ``seed``.

    This set is generic: for a real model, calibrate on samples like your fine-tuning data
    (64-128 samples is the norm); tiny sets over-fit.

    Example:
        >>> samples = default_calibration(n=8, seed=1)
        >>> samples[0]["messages"][0]["content"][0], samples[0]["images"][0].size
        ({'type': 'image'}, (224, 224))
    """
    if n < 1:
        raise CalibrationError(f"default_calibration needs n >= 1, got n={n}.")
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    for index in range(n):
        if images and index % 4 != 3:
            image, shape, colour, background, description = _draw_image(rng, image_size)
            question = rng.choice(_QUESTIONS).format(shape=shape)
            answer = (
                f"The image shows {description}, on a {background} background. "
                f"The main shape is a {rng.choice(_SIZES)} {colour} {shape}."
            )
            samples.append(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                    ],
                    "images": [image],
                }
            )
        else:
            question, answer = _TEXT_PROMPTS[rng.randrange(len(_TEXT_PROMPTS))]
            samples.append(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": question}]},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                    ],
                    "images": [],
                }
            )
    return samples


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def image_token_ids(processor: Any = None, config: Any = None) -> set[int]:
    """Token ids of image placeholders (never scored): from the model config and the processor.

    Example:
        >>> import dq_kit as dq
        >>> sorted(image_token_ids(dq.tiny.tiny_processor("qwen2_vl")))   # <|image_pad|>, <|video_pad|>
        [5, 6]
    """
    ids: set[int] = set()
    for attr in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            ids.add(value)
    if processor is not None and has_image_processor(processor):
        tokenizer = tokenizer_of(processor)
        markers = ("image_token", "image_break_token", "image_end_token", "video_token", "boi_token", "eoi_token")
        # Gemma 3's processor names its begin-of-image marker "image_token"; the soft tokens are the tokenizer's
        tokens = [getattr(owner, attr, None) for owner in (processor, tokenizer) for attr in markers]
        for token in tokens:
            if isinstance(token, str):
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
                    ids.add(token_id)
    return ids


def _count_image_items(messages: Sequence[Mapping[str, Any]], index: int) -> int:
    count = 0
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise CalibrationError(
                f"Calibration sample {index}: message {position} must be a dict with 'role' and 'content' keys."
            )
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, Sequence):
            raise CalibrationError(f"Calibration sample {index}: message {position} content must be a string or a list of items.")
        for item in content:
            if not isinstance(item, Mapping) or item.get("type") not in ("image", "text"):
                raise CalibrationError(
                    f"Calibration sample {index}: message {position} has an item {item!r}; "
                    "items must be {'type': 'image'} or {'type': 'text', 'text': ...}."
                )
            count += item["type"] == "image"
    return count


def _chat_sample(sample: Mapping[str, Any], index: int, processor: Any, base_dir: str | os.PathLike | None) -> tuple[dict, int | None]:
    """Encode a chat sample; return the inputs and where the final answer starts (or None)."""
    messages = sample["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise CalibrationError(f"Calibration sample {index}: 'messages' must be a non-empty list of messages.")
    wanted = _count_image_items(messages, index)
    raw_images = sample.get("images") or []
    if isinstance(raw_images, (str, PIL.Image.Image)):
        raw_images = [raw_images]
    if len(raw_images) != wanted:
        raise CalibrationError(
            f"Calibration sample {index}: the messages have {wanted} image item(s) but 'images' holds {len(raw_images)}. "
            "Give one image per {'type': 'image'} item, in order."
        )
    if wanted and not has_image_processor(processor):
        raise CalibrationError(
            f"Calibration sample {index} has images but the processor ({type(processor).__name__}) cannot process images: "
            "the model is text-only, or pass the model's processor (dq.load returns it). For a language model use "
            "dq.default_calibration(images=False) or text samples."
        )
    where = f"Calibration sample {index}"
    images = [open_image(image, f"{where}: image {position}", base_dir, CalibrationError) for position, image in enumerate(raw_images)]
    inputs = dict(encode_chat(processor, messages, images, generation_prompt=False, where=where, error=CalibrationError))
    answer_start = None
    if messages[-1]["role"] == "assistant" and len(messages) > 1:
        prompt_ids = encode_chat(processor, messages[:-1], images, generation_prompt=True, where=where, error=CalibrationError)["input_ids"][0]
        full_ids = inputs["input_ids"][0]
        if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)].equal(prompt_ids):
            answer_start = len(prompt_ids)
    return inputs, answer_start


def _as_tensor(value: Any, key: str, index: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if key in ("input_ids", "attention_mask", "labels") or (isinstance(value, list) and value and isinstance(value[0], (int, list))):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"Calibration sample {index}: {key!r} cannot be converted to a tensor ({exc}).") from exc
    return value


def prepare_calibration(
    calibration: Iterable[Any],
    processor: Any = None,
    config: Any = None,
    *,
    base_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
) -> list[CalibrationSample]:
    """Normalise calibration data into :class:`CalibrationSample` objects (one per sample, batch of one).

    Args:
        calibration: strings, chat samples ``{"messages": [...], "images": [...]}``, or model-input dicts.
        processor: the model's processor (VLM) or tokenizer (LM); needed for strings and chat samples.
        config: the model config, used to find image-placeholder token ids and check the vocabulary.
        base_dir: folder that relative image paths are resolved against.
        max_length: truncate longer samples (keeping the start), ``None`` to keep everything.

    Errors name the offending sample index.

    Example:
        >>> import dq_kit as dq
        >>> tokenizer = dq.tiny.tiny_processor("llama")
        >>> [s.num_tokens > 0 for s in prepare_calibration(["A red circle.", "What is in the image?"], tokenizer)]
        [True, True]
    """
    if isinstance(calibration, (str, Mapping)):
        calibration = [calibration]
    samples = list(calibration)
    if not samples:
        raise CalibrationError("The calibration set is empty; pass at least one sample (or use dq.default_calibration()).")
    skip_ids = image_token_ids(processor, config)
    tokenizer = tokenizer_of(processor) if processor is not None else None
    pad_id = getattr(tokenizer, "pad_token_id", None)
    vocab = _vocab_size(config)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise CalibrationError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: the processor does not "
            "belong to this model. Load both from the same checkpoint (dq.load returns a matching pair)."
        )
    prepared = []
    for index, sample in enumerate(samples):
        answer_start = None
        labels = None
        if isinstance(sample, str):
            if processor is None:
                raise CalibrationError("Text calibration samples need the model's processor or tokenizer: pass processor=...")
            if not sample.strip():
                raise CalibrationError(f"Calibration sample {index} is an empty string.")
            add_special = {} if has_image_processor(processor) else {"add_special_tokens": True}
            inputs = dict((processor if has_image_processor(processor) else tokenizer)(text=[sample], return_tensors="pt", **add_special))
        elif isinstance(sample, Mapping) and "messages" in sample:
            if processor is None:
                raise CalibrationError("Chat calibration samples need the model's processor: pass processor=...")
            inputs, answer_start = _chat_sample(sample, index, processor, base_dir)
        elif isinstance(sample, Mapping) and "input_ids" in sample:
            inputs = {key: _as_tensor(value, key, index) for key, value in sample.items()}
            labels = inputs.pop("labels", None)
        else:
            raise CalibrationError(
                f"Calibration sample {index} is a {type(sample).__name__}; expected a string, a chat sample "
                "{'messages': [...], 'images': [...]}, or a model-input dict with 'input_ids'."
            )
        prepared.append(_finish(inputs, index, answer_start, labels, skip_ids, pad_id, vocab, max_length))
    return prepared


def _vocab_size(config: Any) -> int | None:
    for candidate in (config, getattr(config, "text_config", None)):
        value = getattr(candidate, "vocab_size", None)
        if isinstance(value, int):
            return value
    return None


def _finish(
    inputs: dict[str, Any],
    index: int,
    answer_start: int | None,
    labels: torch.Tensor | None,
    skip_ids: set[int],
    pad_id: int | None,
    vocab: int | None,
    max_length: int | None,
) -> CalibrationSample:
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise CalibrationError(f"Calibration sample {index}: 'input_ids' must be a non-empty integer tensor or list.")
    if ids.dim() == 1:
        inputs = {key: value.unsqueeze(0) if isinstance(value, torch.Tensor) and value.dim() == 1 and key != "image_grid_thw" else value
                  for key, value in inputs.items()}
        ids = inputs["input_ids"]
        labels = labels.unsqueeze(0) if labels is not None and labels.dim() == 1 else labels
    if ids.shape[0] != 1:
        raise CalibrationError(f"Calibration sample {index} holds a batch of {ids.shape[0]}; give one sample per entry.")
    if vocab is not None and int(ids.max()) >= vocab:
        raise CalibrationError(
            f"Calibration sample {index} has token id {int(ids.max())} but the model's vocabulary has {vocab} tokens: "
            "the processor/tokenizer does not belong to this model."
        )
    if max_length is not None and ids.shape[-1] > max_length and "pixel_values" not in inputs:
        inputs = {key: value[:, :max_length] if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[-1] == ids.shape[-1] else value
                  for key, value in inputs.items()}
        ids = inputs["input_ids"]
        labels = labels[:, :max_length] if labels is not None else None
    tokens = ids[0]
    target_ok = torch.ones_like(tokens, dtype=torch.bool)
    attention = inputs.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.shape == ids.shape:
        target_ok &= attention[0].bool()
    if pad_id is not None and not isinstance(attention, torch.Tensor):
        target_ok &= tokens != pad_id
    for skip in skip_ids:
        target_ok &= tokens != skip
    if labels is not None:
        target_ok &= labels[0] != -100
    elif answer_start is not None and answer_start < tokens.numel():
        target_ok[:answer_start] = False
    score = torch.zeros_like(target_ok)
    score[:-1] = target_ok[1:]  # the prediction at t is of token t + 1
    if not score.any():
        raise CalibrationError(
            f"Calibration sample {index} has no position to score (it needs at least two text tokens, or an answer)."
        )
    return CalibrationSample(inputs=inputs, score_mask=score)
