"""``dq.sft_trainer``: TRL's ``SFTTrainer`` with loss on the answers only and defaults that fit the device.

TRL 1.16 does the heavy lifting: its ``DataCollatorForVisionLanguageModeling`` renders each
conversation with the processor's chat template and ``return_assistant_tokens_mask=True``, and
with ``assistant_only_loss=True`` sets every label outside the template's ``{% generation %}``
blocks to -100 (prompt-completion datasets use ``completion_only_loss`` instead). dq_kit adds
the device defaults, fp32 adapters on fp32 runs, and resuming from the last *complete* checkpoint.

Example:
    >>> import dq_kit as dq
    >>> model, processor = dq.load(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), quant="dynamic")
    >>> splits = dq.data.shapes_dataset(40, task="colour")
    >>> trainer = dq.sft_trainer(dq.add_lora(model, r=8), processor, splits["train"], splits["test"],
    ...                          output_dir="/tmp/dq-sft", max_steps=4)   # doctest: +ELLIPSIS
    trainable params: ...
    >>> trainer.train().global_step                                         # doctest: +SKIP
    4
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl import SFTConfig, SFTTrainer

from ..data.chat import text_of
from ..data.finetune import ValidationReport, check
from ..errors import DataError, DQError

TRAINER_STATE = "trainer_state.json"
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
_NO_ANSWER = ("no assistant turn", "an assistant turn has no text")
_TOKEN_CHECK_ROWS = 64  # rows collated before training to find one trained token, in batches of
_TOKEN_CHECK_BATCH = 8


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest *complete* ``checkpoint-N`` folder in ``output_dir``, or ``None``.

    transformers writes a checkpoint's files one by one and its ``trainer_state.json`` last, so
    a run killed while saving leaves a folder without a readable state or weights: such folders
    are skipped, never resumed from.

    Example:
        >>> last_checkpoint("/tmp/no-such-run") is None
        True
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if not (path.is_dir() and suffix.isdigit() and any((path / name).is_file() for name in _WEIGHT_FILES)):
            continue
        try:
            json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        candidates.append((int(suffix), path))
    return max(candidates)[1] if candidates else None


class DQSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose ``train(resume_from_checkpoint=True)`` resumes from the last complete
    checkpoint, or starts from scratch when there is none (instead of raising)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Train; ``resume_from_checkpoint=True`` continues the interrupted run in ``args.output_dir``.

        Example:
            >>> trainer.train(resume_from_checkpoint=True)      # doctest: +SKIP
        """
        if resume_from_checkpoint is True:
            found = last_checkpoint(self.args.output_dir)
            print(f"Resuming from {found}." if found else f"No complete checkpoint in {self.args.output_dir}: starting from scratch.")
            resume_from_checkpoint = str(found) if found else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def default_sft_config(output_dir: str | os.PathLike = "dq_outputs/sft", has_eval: bool = False) -> dict[str, Any]:
    """dq_kit's ``SFTConfig`` defaults for this machine: bf16 on a bf16 GPU (fp16 on older GPUs),
    fp32 and ``use_cpu`` without a GPU, frequent logging, no external reporting, checkpoints every
    50 steps (last 2 kept), images never truncated away (``max_length=None``).

    Example:
        >>> default_sft_config("/tmp/run")["report_to"]
        'none'
    """
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return {
        "output_dir": os.fspath(output_dir),
        "use_cpu": not cuda,
        "bf16": bf16,
        "fp16": cuda and not bf16,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 5,
        "weight_decay": 0.0,
        "logging_steps": 5,
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": 50 if has_eval else None,
        "report_to": "none",
        "max_length": None,
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def sft_trainer(
    model: nn.Module,
    processor: Any,
    train: Dataset,
    eval: Dataset | None = None,
    responses_only: bool = True,
    callbacks: list[TrainerCallback] | None = None,
    **sft_config: Any,
) -> DQSFTTrainer:
    """A TRL ``SFTTrainer`` for ``model`` (usually from :func:`dq_kit.add_lora`) on conversational data.

    Args:
        model: the model to train; a ``PeftModel`` trains its adapters only.
        processor: the processor (VLMs) or tokenizer (LMs) from :func:`dq_kit.load`.
        train, eval: datasets in TRL's conversational format (see :mod:`dq_kit.data`). Every row
            is checked before training starts (:func:`dq_kit.data.check`): a row that would fail
            mid-epoch raises :class:`dq_kit.DataError`, rows without an answer are counted in a
            warning, and a dataset where no token would be trained on raises.
        responses_only: loss on the assistant's tokens only (prompt, image and padding labels are
            -100). Needs a chat template with ``{% generation %}`` markers; TRL substitutes a
            training template for the families it knows.
        callbacks: ``transformers.TrainerCallback`` objects.
        **sft_config: any ``trl.SFTConfig`` field, overriding :func:`default_sft_config`
            (``output_dir``, ``max_steps``, ``learning_rate``, ``per_device_train_batch_size``, ...).

    Returns:
        A :class:`DQSFTTrainer`: call ``.train()``; after an interruption, build it again with the
        same ``output_dir`` and call ``.train(resume_from_checkpoint=True)``.

    Example:
        >>> import dq_kit as dq
        >>> model, processor = dq.load(dq.tiny.save_tiny("llava", "/tmp/tiny-llava"), quant="dynamic")
        >>> ds = dq.data.shapes_dataset(8, task="shape", test_size=None)
        >>> trainer = dq.sft_trainer(dq.add_lora(model, r=4), processor, ds, max_steps=2, output_dir="/tmp/dq-llava")  # doctest: +ELLIPSIS
        trainable params: ...
        >>> batch = trainer.data_collator([ds[0]])
        >>> int((batch["labels"] != -100).sum()) < batch["labels"].numel()
        True
    """
    for name, split in (("train", train), ("eval", eval)):
        if isinstance(split, (DatasetDict, dict)):
            raise DQError(f"Pass a single split as {name}= (e.g. splits['{name if name == 'train' else 'test'}']), not {list(split)}.")
    if train is None or len(train) == 0:
        raise DQError("The training dataset is empty.")
    columns = set(train.column_names)
    conversational = "messages" in columns
    if not conversational and not {"prompt", "completion"} <= columns:
        raise DQError(
            f"The training dataset has columns {sorted(columns)}; it needs 'messages' (+ 'images') or 'prompt' and "
            "'completion'. Convert it with dq.data.prepare(dataset)."
        )
    train = _rows_with_answers(train, "train", conversational)
    if eval is not None:
        eval = _rows_with_answers(eval, "eval", conversational)
    settings = default_sft_config(sft_config.pop("output_dir", "dq_outputs/sft"), has_eval=eval is not None)
    settings["assistant_only_loss"] = responses_only and conversational
    settings["completion_only_loss"] = responses_only and not conversational
    settings.update(sft_config)
    unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(SFTConfig)})
    if unknown:
        raise DQError(f"Unknown training option(s) {unknown}: sft_trainer passes its keywords to trl.SFTConfig, which has no such field.")
    if shards_parameters(settings):
        _check_sharding(model, settings)
    args = SFTConfig(**settings)
    try:
        trainer = DQSFTTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=eval, processing_class=processor, callbacks=callbacks
        )
    except (RuntimeError, ValueError) as exc:  # TRL: RuntimeError for VLM collators, ValueError when it cannot patch a template
        if "assistant" not in str(exc) and "{% generation %}" not in str(exc):
            raise
        raise DataError(
            "Answer-only loss needs a chat template that marks the assistant's tokens with {% generation %} ... "
            "{% endgeneration %}, and this processor's template has no such marker (TRL: "
            f"{str(exc).splitlines()[0]}). Use a template with the markers, or pass responses_only=False to train on every token."
        ) from exc
    if not (args.bf16 or args.fp16):
        for parameter in trainer.model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    _check_trainable_tokens(trainer, len(train), responses_only)
    print(f"dq.sft_trainer: checkpoints and logs go to {Path(args.output_dir).resolve()} (choose with output_dir=).")
    return trainer


SHARDING_NEEDS_GPUS = ("FSDP / DeepSpeed ZeRO-3 need GPUs: on the CPU the trainer runs plain data parallelism (DDP) and "
                       "would ignore the sharding settings. Leave them out to train with DDP, or run on GPUs.")


def shards_parameters(settings: dict[str, Any]) -> bool:
    """Whether training will shard the parameters: ``fsdp`` in the settings, or ``accelerate launch`` with an
    FSDP or DeepSpeed ZeRO-3 config (accelerate passes those to the trainer through the environment).

    Example:
        >>> shards_parameters({"fsdp": "full_shard auto_wrap"}), shards_parameters({})
        (True, False)
    """
    environment = {name: os.environ.get(name, "").lower() for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")}
    zero_3 = environment["ACCELERATE_USE_DEEPSPEED"] == "true" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return bool(settings.get("fsdp")) or environment["ACCELERATE_USE_FSDP"] == "true" or zero_3


def _check_sharding(model: nn.Module, settings: dict[str, Any]) -> None:
    """Sharding needs GPUs, and one dtype for the parameters it flattens (4-bit weights stored as uint8 beside
    16-bit ones cannot be sharded together)."""
    if settings.get("use_cpu"):
        raise DQError(SHARDING_NEEDS_GPUS)
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if torch.uint8 in dtypes and len(dtypes) > 1:
        raise DQError(
            "FSDP needs every parameter in one dtype, but this 4-bit model stores its 4-bit weights as uint8 beside "
            f"{sorted(str(d).removeprefix('torch.') for d in dtypes - {torch.uint8})} parameters. Load it with "
            "dq.load(..., dtype=torch.bfloat16, quant_storage=torch.bfloat16)."
        )


def _rows_with_answers(dataset: Dataset, name: str, conversational: bool) -> Dataset:
    """Fail before training on rows that would fail mid-epoch; leave out rows with nothing to learn, with a warning."""
    if conversational:
        report = check(dataset)
        no_answer = [p.index for p in report.problems if p.reason.startswith(_NO_ANSWER)]
        broken = [p for p in report.problems if not p.reason.startswith(_NO_ANSWER)]
        if broken:
            raise DataError(f"The {name} dataset has rows that would fail during training. {ValidationReport(len(dataset), broken)}\n"
                            "Fix them, or remove them with dq.data.validate(dataset, drop=True).")
    else:
        no_answer = [index for index, completion in enumerate(dataset["completion"]) if not text_of(completion).strip()]
    if len(no_answer) == len(dataset):
        raise DataError(f"Nothing to learn: none of the {len(dataset)} rows of the {name} dataset has an assistant answer. "
                        "Each row needs a conversation that ends with an assistant turn (or a non-empty 'completion').")
    if not no_answer:
        return dataset
    warnings.warn(f"{len(no_answer)} of {len(dataset)} {name} rows have no assistant answer and would contribute nothing to the "
                  f"loss: left out (rows {no_answer[:10]}{' ...' if len(no_answer) > 10 else ''}).", stacklevel=3)
    skipped = set(no_answer)
    return dataset.select([index for index in range(len(dataset)) if index not in skipped])


def _check_trainable_tokens(trainer: SFTTrainer, n_rows: int, responses_only: bool) -> None:
    """Collate the first rows as training will (from the trainer's own dataset, tokenized for language
    models), and raise when not one label is trained on; say so when preparing the data dropped rows."""
    why = ("the chat template marks no assistant tokens (it needs {% generation %} markers; pass responses_only=False "
           "to train on every token) or max_length cuts the answers off") if responses_only else "max_length cuts every row off"
    prepared = trainer.train_dataset
    if len(prepared) == 0:
        raise DataError(f"Nothing to learn: preparing the data for training left none of its {n_rows} rows: {why}.")
    if len(prepared) < n_rows and not trainer.args.packing:
        warnings.warn(f"Preparing the data for training dropped {n_rows - len(prepared)} of {n_rows} rows ({why}).", stacklevel=3)
    checked = min(len(prepared), _TOKEN_CHECK_ROWS)
    for start in range(0, checked, _TOKEN_CHECK_BATCH):
        rows = [prepared[index] for index in range(start, min(start + _TOKEN_CHECK_BATCH, checked))]
        try:
            batch = trainer.data_collator(rows)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DataError(f"Training rows {start}-{start + len(rows) - 1} cannot be turned into a batch: {str(exc).splitlines()[0]}") from exc
        if int((batch["labels"] != -100).sum()):
            return
    raise DataError(f"Nothing to learn: no token of the first {checked} training rows is trained on: {why}.")
