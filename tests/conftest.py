"""Shared fixtures: tiny real-architecture models saved once per session, loaded like hub ids."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: unknown ids must fail fast and clearly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

import dq_kit as dq

VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm", "lfm2_vl", "mllama", "llava")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """``tiny_path(family)`` -> folder holding a saved tiny model and processor of that family."""
    saved: dict[str, os.PathLike] = {}

    def get(family: str):
        if family not in saved:
            saved[family] = dq.tiny.save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return saved[family]

    return get
