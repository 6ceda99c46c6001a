"""Lazy, per-tensor reading of a safetensors checkpoint folder, by the model's own parameter names.

Checkpoints on the hub often use older key names than the transformers classes that load them
(``model.layers.0...`` for what Qwen2-VL now calls ``model.language_model.layers.0...``);
:class:`Checkpoint` applies transformers' own load-time renaming so that a tensor is asked for by the
name it has in the model.

Example:
    >>> import dq_kit as dq, tempfile
    >>> from dq_kit.models.resolution import meta_model, resolve_config
    >>> path = dq.tiny.save_tiny("qwen2_vl", tempfile.mkdtemp())
    >>> ckpt = Checkpoint(path, meta_model(resolve_config(path)))
    >>> ckpt.get("model.language_model.norm.weight").shape
    torch.Size([64])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AnalysisError
from ..models.resolution import checkpoint_renamer

__all__ = ["Checkpoint"]


class Checkpoint:
    """Reader of a safetensors checkpoint (single file or sharded with an index) by model parameter name.

    Args:
        path: the checkpoint folder.
        model: the model the checkpoint belongs to (a meta-device skeleton is enough); its
            transformers key renaming is applied. Without it, names are the stored keys.
    """

    def __init__(self, path: str | os.PathLike, model: nn.Module | None = None) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            stored = {key: self.path / file for key, file in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as handle:
                stored = dict.fromkeys(handle.keys(), single)
        else:
            raise AnalysisError(
                f"{self.path} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json); "
                "sequential mode reads 16-bit weights from one. Re-save the model with save_pretrained()."
            )
        names = _model_names(model, list(stored)) if model is not None else {key: key for key in stored}
        self.files = {name: (stored[key], key) for key, name in names.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk."""
        from safetensors import safe_open

        if name not in self.files:
            raise AnalysisError(f"The checkpoint at {self.path} has no tensor for {name!r}: it does not match the model's config.")
        file, key = self.files[name]
        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key)


def _model_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Stored key -> the model's parameter name, through transformers' load-time renaming."""
    rename = checkpoint_renamer(model)
    names = {}
    for key in keys:
        name, converted = rename(key)
        if converted:
            raise AnalysisError(
                f"Checkpoint tensor {key!r} is merged or split when {type(model).__name__} loads it; sequential mode reads "
                "tensors as stored. Analyse this model with sequential=False."
            )
        names[key] = name
    return names
