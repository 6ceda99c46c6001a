"""Step 1 — which model: hub id / folder / config resolution and shipped configs (``resolution``), and the
architecture families with their module groups and presets (``registry``).

Example:
    >>> from dq_kit.models import resolve_config, family_of
    >>> family_of(resolve_config("Qwen/Qwen2-VL-2B-Instruct")).name
    'qwen2_vl'
"""

from .registry import (
    FAMILIES,
    GENERIC,
    Family,
    ModuleInfo,
    always_16bit,
    family_of,
    linear_modules,
    output_head_names,
    preset_modules,
)
from .resolution import auto_class, default_dtype, meta_model, resolve_config, shipped_hub_ids

__all__ = ["FAMILIES", "GENERIC", "Family", "ModuleInfo", "always_16bit", "auto_class", "default_dtype", "family_of", "linear_modules", "meta_model", "output_head_names", "preset_modules", "resolve_config", "shipped_hub_ids"]
