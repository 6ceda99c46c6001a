"""Turn one chat sample (``{"messages": [...], "images": [...]}``) into model inputs for a prompt
and for the teacher-forced conversation, with the positions of the reference answer's tokens.

Example:
    >>> import dq_kit as dq
    >>> sample = {"messages": [
    ...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape do you see?"}]},
    ...     {"role": "assistant", "content": "A red square."}], "images": [dq.tiny.tiny_image(1)]}
    >>> chat = encode_answer(dq.tiny.tiny_processor("qwen2_vl"), sample)
    >>> chat.answer, chat.answer_end - chat.answer_start > 0
    ('A red square.', True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import PIL.Image
from transformers import BatchFeature

from .errors import DQError


@dataclass(frozen=True)
class EncodedChat:
    """One sample, encoded.

    Attributes:
        prompt: inputs of the conversation up to the answer, with the generation prompt (for ``generate``).
        full: inputs of the whole conversation including the reference answer (for teacher forcing).
        answer_start: index in ``full["input_ids"][0]`` of the first answer token.
        answer_end: one past the last scored answer token (the end-of-turn token included, trailing
            whitespace excluded).
        question: the text of the last user turn.
        answer: the text of the reference answer.
    """

    prompt: BatchFeature
    full: BatchFeature
    answer_start: int
    answer_end: int
    question: str
    answer: str


def encode_answer(processor: Any, sample: Mapping[str, Any], name: str = "sample") -> EncodedChat:
    """Encode ``sample`` (TRL-style ``messages`` with a final assistant answer, optional ``images``).

    The answer is the last assistant turn; turns after it are ignored. ``processor`` is a
    multimodal processor or, for a language model, its tokenizer. ``name`` labels the sample in errors.

    Raises:
        DQError: the sample is not a chat, has no assistant answer after a user turn, or its chat
            template does not render the prompt as a prefix of the conversation.

    Example:
        >>> import dq_kit as dq
        >>> sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes, it is."}]}
        >>> chat = encode_answer(dq.tiny.tiny_processor("llama"), sample)
        >>> chat.full["input_ids"].shape[1] > chat.prompt["input_ids"].shape[1]
        True
    """
    messages = sample.get("messages") if isinstance(sample, Mapping) else None
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise DQError(f"{name}: expected a dict with 'messages', a list of {{'role': ..., 'content': ...}} turns.")
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not answers or not any(m["role"] == "user" for m in messages[: answers[-1]]):
        raise DQError(f"{name}: needs a user turn followed by an assistant turn holding the reference answer.")
    cut = answers[-1]
    answer = text_of(messages[cut].get("content"))
    if not answer.strip():
        raise DQError(f"{name}: the assistant answer is empty.")
    images = [_image(item, name) for item in sample.get("images") or []]
    prompt = _encode(processor, messages[:cut], images, name, generation_prompt=True)
    full = _encode(processor, messages[: cut + 1], images, name, generation_prompt=False)
    prompt_ids, full_ids = prompt["input_ids"][0], full["input_ids"][0]
    start = len(prompt_ids)
    if len(full_ids) <= start or not full_ids[:start].equal(prompt_ids):
        raise DQError(f"{name}: the chat template does not render the prompt as a prefix of the conversation, so the answer tokens cannot be found.")
    tokenizer = getattr(processor, "tokenizer", processor)
    end = len(full_ids)
    while end > start + 1 and not tokenizer.decode(full_ids[end - 1 : end]).strip():
        end -= 1
    question = text_of(next(m for m in reversed(messages[:cut]) if m["role"] == "user").get("content"))
    return EncodedChat(prompt=prompt, full=full, answer_start=start, answer_end=end, question=question, answer=answer)


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text items of a TRL-style list.

    Example:
        >>> text_of([{"type": "image"}, {"type": "text", "text": "What is it?"}])
        'What is it?'
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(item.get("text", "") for item in content if isinstance(item, Mapping) and item.get("type") == "text")
    return ""


def _encode(processor: Any, messages: list, images: list, name: str, *, generation_prompt: bool) -> BatchFeature:
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        if hasattr(processor, "tokenizer"):
            return processor(images=images or None, text=[text], return_tensors="pt")
        if images:
            raise ValueError("a tokenizer cannot encode images; pass the model's processor")
        return processor([text], return_tensors="pt", add_special_tokens=False)
    except (ValueError, TypeError, KeyError, IndexError, jinja2.TemplateError) as exc:
        raise DQError(f"{name}: could not encode it with the processor ({type(exc).__name__}: {str(exc).splitlines()[0]}).") from exc


def _image(item: Any, name: str) -> PIL.Image.Image:
    if isinstance(item, PIL.Image.Image):
        return item
    if isinstance(item, str):
        try:
            return PIL.Image.open(item).convert("RGB")
        except OSError as exc:
            raise DQError(f"{name}: cannot open image {item!r} ({exc}).") from exc
    raise DQError(f"{name}: images must be PIL images or file paths, got {type(item).__name__}.")
