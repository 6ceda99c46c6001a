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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import PIL.Image
from datasets import List, Value
from transformers import BatchFeature

from ..errors import DQError
from .images import open_image

# The dataset feature of a ``messages`` column in TRL's conversational format (text and image items).
MESSAGES_FEATURE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})


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
    images = [open_image(item, f"{name}: image {position}") for position, item in enumerate(sample.get("images") or [])]
    prompt = encode_chat(processor, messages[:cut], images, generation_prompt=True, where=name)
    full = encode_chat(processor, messages[: cut + 1], images, generation_prompt=False, where=name)
    prompt_ids, full_ids = prompt["input_ids"][0], full["input_ids"][0]
    start = len(prompt_ids)
    if len(full_ids) <= start or not full_ids[:start].equal(prompt_ids):
        raise DQError(f"{name}: the chat template does not render the prompt as a prefix of the conversation, so the answer tokens cannot be found.")
    tokenizer = tokenizer_of(processor)
    end = len(full_ids)
    while end > start + 1 and not tokenizer.decode(full_ids[end - 1 : end]).strip():
        end -= 1
    question = text_of(next(m for m in reversed(messages[:cut]) if m["role"] == "user").get("content"))
    return EncodedChat(prompt=prompt, full=full, answer_start=start, answer_end=end, question=question, answer=answer)


def text_of(content: Any, sep: str = " ") -> str:
    """The text of a message's content: a string, or the text items of a TRL-style list joined by ``sep``.

    Example:
        >>> text_of([{"type": "image"}, {"type": "text", "text": "What is it?"}])
        'What is it?'
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(item.get("text", "") or "" for item in content if isinstance(item, Mapping) and item.get("type") == "text")
    return ""


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a processor (a tokenizer is its own).

    Example:
        >>> import dq_kit as dq
        >>> processor = dq.tiny.tiny_processor("qwen2_vl")
        >>> tokenizer_of(processor) is processor.tokenizer
        True
    """
    return getattr(processor, "tokenizer", processor)


def has_image_processor(processor: Any) -> bool:
    """Whether ``processor`` can encode images (a multimodal processor, not a plain tokenizer).

    Example:
        >>> import dq_kit as dq
        >>> has_image_processor(dq.tiny.tiny_processor("qwen2_vl")), has_image_processor(dq.tiny.tiny_processor("llama"))
        (True, False)
    """
    return getattr(processor, "image_processor", None) is not None


def encode_chat(
    processor: Any,
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[PIL.Image.Image] = (),
    *,
    generation_prompt: bool,
    where: str = "sample",
    error: type[DQError] = DQError,
) -> BatchFeature:
    """The one chat encoder: render ``messages`` with the chat template and tokenize them with their images.

    The template renders every special token, so none are added on top. For a plain tokenizer, list
    contents are flattened to their text. Failures raise ``error`` with a message that starts with ``where``.

    Example:
        >>> import dq_kit as dq
        >>> messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        >>> encode_chat(dq.tiny.tiny_processor("llama"), messages, generation_prompt=True)["input_ids"].shape[0]
        1
    """
    multimodal = has_image_processor(processor)
    if images and not multimodal:
        raise error(f"{where}: a tokenizer cannot encode images; pass the model's processor (dq.load returns it).")
    if not multimodal:
        messages = [{**m, "content": m["content"] if isinstance(m["content"], str) else text_of(m["content"], sep="")} for m in messages]
    template_owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    if not getattr(template_owner, "chat_template", None):
        raise error(
            f"The processor ({type(processor).__name__}) has no chat template, so chat samples cannot be formatted. "
            "Pass plain strings or ready model-input dicts instead."
        )
    try:
        text = template_owner.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=False)
        if multimodal:
            return processor(images=list(images) or None, text=[text], return_tensors="pt", add_special_tokens=False)
        return processor([text], return_tensors="pt", add_special_tokens=False)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, jinja2.TemplateError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise error(f"{where}: could not encode it with the processor ({type(exc).__name__}: {first}).") from exc
