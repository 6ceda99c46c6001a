"""Train the tiny demo Qwen2-VL from scratch on the synthetic shapes data (CPU, about a minute).

The demo model (~1M parameters: hidden 128, 4 text layers, 3 vision blocks, the offline tiny
processor of :mod:`dq_kit.synthetic.tiny`) learns to caption shapes ("a red square on the left"). It gives
notebooks, tests and benchmarks a model that *knows* something, so quantization damage and LoRA
learning show in real answers. ``scripts/train_demo_model.py`` and the tests share this routine.

Example:
    >>> from dq_kit.demo.model import train_demo_model
    >>> result = train_demo_model("/tmp/dq-demo", steps=300)        # doctest: +SKIP
    >>> result.exact_match > 0.5                                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset

from ..data.shapes import shapes_dataset
from ..errors import DQError
from ..evaluation.scores import evaluate_answers
from ..files import Output, atomic_directory, write_json
from ..progress import progress_bar
from ..synthetic import tiny

DEMO_HIDDEN = 128
DEMO_TEXT_LAYERS = 4
DEMO_VISION_BLOCKS = 3
RESULT_FILE = "demo_training.json"
SHIPPED_DIR = Path(__file__).parent / "assets" / "demo_model"


@dataclass(frozen=True)
class DemoResult:
    """Where the demo model was saved and how well it captions held-out images."""

    path: str
    steps: int
    seconds: float
    final_loss: float
    exact_match: float
    token_f1: float
    n_test: int
    seed: int
    task: str


def demo_model_path() -> Path:
    """The folder of the demo model shipped inside dq_kit (load it with ``dq.load``).

    Example:
        >>> import dq_kit as dq
        >>> model, processor = dq.load(demo_model_path(), quant="dynamic")   # doctest: +SKIP
    """
    if not (SHIPPED_DIR / "config.json").is_file():
        raise DQError(
            f"The demo model is missing from {SHIPPED_DIR}. Re-install dq_kit, or rebuild it with "
            "`python scripts/train_demo_model.py`."
        )
    return SHIPPED_DIR


def demo_config() -> transformers.Qwen2VLConfig:
    """The demo model's config: the tiny Qwen2-VL (same tokenizer and image size), wider and deeper.

    Example:
        >>> demo_config().text_config.num_hidden_layers
        4
    """
    base = tiny.tiny_config("qwen2_vl")
    text = {key: value for key, value in base.text_config.to_dict().items() if key not in ("layer_types", "rope_parameters")}
    text |= {
        "hidden_size": DEMO_HIDDEN,
        "intermediate_size": 2 * DEMO_HIDDEN,
        "num_hidden_layers": DEMO_TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},  # sums to head_dim / 2 = 16
    }
    vision = base.vision_config.to_dict() | {
        "depth": DEMO_VISION_BLOCKS,
        "embed_dim": DEMO_HIDDEN,
        "hidden_size": DEMO_HIDDEN,
        "num_heads": 4,
        "mlp_ratio": 2,
    }
    return transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=base.image_token_id,
        video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id,
    )


def encode_conversations(processor: Any, dataset: Dataset) -> dict[str, torch.Tensor]:
    """Tokenize a whole conversational dataset once: inputs, per-image pixel rows, and answer-only labels.

    ``pixel_values`` is reshaped to ``(rows, patches, features)`` so that a minibatch is a plain
    index (every image of the synthetic data has the same size).

    Example:
        >>> from dq_kit.data.shapes import shapes_dataset
        >>> encoded = encode_conversations(tiny.tiny_processor("qwen2_vl"), shapes_dataset(4, test_size=None))
        >>> encoded["pixel_values"].shape[:2], bool((encoded["labels"] != -100).any())
        (torch.Size([4, 16]), True)
    """
    conversations = []
    for row in dataset:
        images = iter(row["images"])
        conversations.append(
            [
                {
                    "role": message["role"],
                    "content": [
                        {"type": "image", "image": next(images)} if item["type"] == "image" else {"type": "text", "text": item["text"]}
                        for item in message["content"]
                    ],
                }
                for message in row["messages"]
            ]
        )
    encoded = processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False},
    )
    labels = encoded["input_ids"].clone()
    labels[encoded.pop("assistant_masks") == 0] = -100
    pixel_values = encoded.pop("pixel_values")
    return {
        **encoded,
        "pixel_values": pixel_values.reshape(len(conversations), -1, pixel_values.shape[-1]),
        "labels": labels,
    }


def fit(
    model: transformers.PreTrainedModel,
    encoded: dict[str, torch.Tensor],
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
) -> float:
    """Train every parameter of ``model`` on pre-encoded data with AdamW and a one-cycle schedule; return the final loss.

    A plain loop (no Trainer): for a ~1M-parameter model on a CPU, per-step overhead is what matters.

    Example:
        >>> from dq_kit.data.shapes import shapes_dataset
        >>> model = transformers.Qwen2VLForConditionalGeneration(demo_config())
        >>> encoded = encode_conversations(tiny.tiny_processor("qwen2_vl"), shapes_dataset(8, test_size=None))
        >>> fit(model, encoded, steps=2, batch_size=4) > 0
        True
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rows = encoded["input_ids"].shape[0]
    model.train()
    loss_value = float("nan")
    bar = progress_bar(range(steps), None, "training demo model")
    for _ in bar:
        index = torch.randint(rows, (min(batch_size, rows),), generator=generator)
        batch = {name: tensor[index] for name, tensor in encoded.items()}
        batch["pixel_values"] = batch["pixel_values"].flatten(0, 1)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    model.eval()
    return loss_value


def train_demo_model(
    out_dir: str | os.PathLike,
    steps: int = 1500,
    batch_size: int = 16,
    lr: float = 2e-3,
    n_train: int = 2000,
    n_test: int = 100,
    seed: int = 0,
    task: str = "describe",
) -> DemoResult:
    """Train the demo Qwen2-VL from scratch on ``task`` shapes, score it on held-out rows, save it.

    The folder (written atomically) holds the model (safetensors), its processor and
    ``demo_training.json`` with the settings and scores; load it with
    ``dq.load(out_dir, quant=...)``. Fully seeded: the same arguments give the same model.

    Example:
        >>> result = train_demo_model("/tmp/dq-demo", steps=200, n_train=400, n_test=20)   # doctest: +SKIP
        >>> import dq_kit as dq; model, processor = dq.load(result.path, quant="dynamic")  # doctest: +SKIP
    """
    start = time.perf_counter()
    processor = tiny.tiny_processor("qwen2_vl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2VLForConditionalGeneration(demo_config()).float()
        splits = shapes_dataset(n_train + n_test, seed=seed, task=task, test_size=n_test)
        final_loss = fit(model, encode_conversations(processor, splits["train"]), steps, batch_size, lr, seed)
    seconds = time.perf_counter() - start
    scores = evaluate_answers(model, processor, splits["test"], max_new_tokens=16, batch_size=32)
    path = Path(out_dir).expanduser().resolve()
    result = DemoResult(str(path), steps, round(seconds, 1), final_loss, scores.exact_match, scores.token_f1, n_test, seed, task)
    with atomic_directory(path, Output("dq_kit demo model", marker=RESULT_FILE)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        write_json(staging / RESULT_FILE, asdict(result) | {"batch_size": batch_size, "lr": lr, "n_train": n_train})
    return result
