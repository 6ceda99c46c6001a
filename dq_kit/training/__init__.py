"""Step 5 — fine-tune: LoRA targeting (``lora``), the TRL SFT wrapper (``sft``), and adapters, merging and
re-quantization (``export``).

Example:
    >>> from dq_kit.training import add_lora, sft_trainer, save_adapter
"""

from .export import merge_to_16bit, requantize, save_adapter
from .lora import add_lora, lora_targets
from .sft import sft_trainer

__all__ = ["add_lora", "lora_targets", "merge_to_16bit", "requantize", "save_adapter", "sft_trainer"]
