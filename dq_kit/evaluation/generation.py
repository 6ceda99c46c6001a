"""Answer questions with a (LoRA-adapted, quantized) model: ``dq.generate`` and the generation path every evaluation shares.

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="dynamic")
    >>> answer = dq.generate(model, processor, dq.tiny.tiny_image(0), "What colour is the shape?", max_new_tokens=4)
    >>> isinstance(answer, str)
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import PIL.Image
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TextStreamer

from ..arguments import is_processor
from ..data.chat import tokenizer_of
from ..data.images import open_image
from ..errors import DQError


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and ``torch.inference_mode`` for the block; the training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def encode_prompts(processor: Any, prompts: list[list[dict[str, Any]]], images: list[list[PIL.Image.Image]]) -> Any:
    """Chat-format and tokenize a batch of conversations (left-padded for generation)."""
    if not getattr(processor, "chat_template", None):
        raise DQError(
            f"The {type(processor).__name__} has no chat template (a base model, or a GGUF file without one), so questions "
            "cannot be put in the model's chat format. Set one (processor.chat_template = '...', e.g. the instruct "
            "model's), or tokenize text yourself and call model.generate."
        )
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for messages in prompts]
    kwargs = {"return_tensors": "pt", "padding": True, "padding_side": "left", "add_special_tokens": False}
    if isinstance(processor, PreTrainedTokenizerBase):
        if any(images):
            raise ValueError("This model has a tokenizer, not an image processor: it is text-only, pass image=None.")
        return processor(texts, **kwargs)
    return processor(text=texts, images=images if any(images) else None, **kwargs)


def generate_from_inputs(model: nn.Module, processor: Any, inputs: Any, max_new_tokens: int, streamer: TextStreamer | None = None) -> list[str]:
    """Greedy answers to a batch of encoded prompts: the new tokens only, decoded without special tokens.

    Example:
        >>> import dq_kit as dq
        >>> model, tok = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
        >>> inputs = encode_prompts(tok, [[user_turn(tok, "Hi", 0)]], [[]])
        >>> len(generate_from_inputs(model, tok, inputs, max_new_tokens=2))
        1
    """
    tokenizer = tokenizer_of(processor)
    inputs = inputs.to(model_device(model))
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=streamer,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def user_turn(processor: Any, prompt: str, n_images: int) -> dict[str, Any]:
    """A user message holding ``n_images`` image items and ``prompt`` (plain text for a tokenizer)."""
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
    if processor is None or not is_processor(processor):
        raise DQError(f"dq.generate needs the model's processor (or tokenizer) second, got {type(processor).__name__}: "
                      "use the pair dq.load returns, model, processor = dq.load(...) (not processor=False).")
    if not isinstance(prompt, str):
        raise DQError(f"prompt must be the question as a string, got {type(prompt).__name__}.")
    images = [] if image is None else [open_image(image, "dq.generate: the image")]
    inputs = encode_prompts(processor, [[user_turn(processor, prompt, len(images))]], [images])
    streamer = TextStreamer(tokenizer_of(processor), skip_prompt=True, skip_special_tokens=True) if stream else None
    with eval_mode(model):
        return generate_from_inputs(model, processor, inputs, max_new_tokens, streamer)[0]
