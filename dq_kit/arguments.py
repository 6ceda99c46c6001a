"""The argument order every dq_kit function shares: the model (or models) first, the processor second,
then the data. Calls written in the earlier order (data before processor) still work, with a warning.

Example:
    >>> import dq_kit as dq
    >>> tok = dq.tiny.tiny_processor("llama")
    >>> processor_second(tok, ["A red circle."], "analyze") == (tok, ["A red circle."])
    True
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["is_processor", "processor_second"]


def is_processor(value: Any) -> bool:
    """Whether ``value`` is a processor or tokenizer (anything that renders chats or encodes text).

    Example:
        >>> import dq_kit as dq
        >>> is_processor(dq.tiny.tiny_processor("qwen2_vl")), is_processor(["a text"])
        (True, False)
    """
    return any(hasattr(value, attr) for attr in ("apply_chat_template", "tokenizer", "image_processor", "batch_decode"))


def processor_second(processor: Any, data: Any, function: str, data_name: str = "calibration", first: str = "model") -> tuple[Any, Any]:
    """``(processor, data)``, swapped back (with a ``FutureWarning``) when a call gave the data first.

    Example:
        >>> import warnings, dq_kit as dq
        >>> tok = dq.tiny.tiny_processor("llama")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     swapped = processor_second(["A red circle."], tok, "analyze")
        >>> swapped == (tok, ["A red circle."]), caught[0].category.__name__
        (True, 'FutureWarning')
    """
    if processor is None or is_processor(processor) or not (data is None or is_processor(data)):
        return processor, data
    warnings.warn(
        f"{function}({first}, {data_name}, processor) is the old argument order: pass the processor second, "
        f"{function}({first}, processor, {data_name}), as in every dq_kit function. The old order will stop working.",
        FutureWarning,
        stacklevel=3,
    )
    return data, processor
