"""One scripted fine-tuning run, the notebook-02 flow from the command line (``dq-kit train``).

A :class:`TrainingJob` holds what the user chose; :func:`run_training` checks all of it before the
model is loaded (the output folder, the ``SFTConfig`` keys, the batch against the number of
processes, the data), then loads the model in (dynamic) 4-bit, adds LoRA adapters, trains with
:func:`dq_kit.sft_trainer` and writes the adapter atomically.

It runs unchanged under ``torchrun`` and ``accelerate launch``: both set ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``, the trainer joins the process group, each process holds a full copy of the
4-bit model on its own device (DDP), and only the first process writes files.

Output folder layout::

    <output>/dq_train.json    the job's settings (marks the folder as a dq-kit training run)
    <output>/checkpoints/     trainer checkpoints (``--resume`` continues from the last complete one)
    <output>/adapter/         the trained LoRA adapter and the processor, written at the end

Example:
    >>> import dq_kit as dq
    >>> from dq_kit.training.job import TrainingJob, run_training
    >>> job = TrainingJob(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), "/tmp/dq-train", samples=8, steps=2, batch_size=4)
    >>> run_training(job)                                  # doctest: +SKIP
    PosixPath('/tmp/dq-train/adapter')
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError, DQError
from ..files import Output, write_json

JOB_FILE = "dq_train.json"
_SAME_ON_RESUME = ("model", "quant", "plan", "lora_r", "vision")  # what the checkpoints' adapter depends on
TRAINING_RUN = Output("dq-kit training run", marker=JOB_FILE)
# SFTConfig fields that the job's own options set: --sft may not set them a second time
OWN_OPTIONS = {
    "output_dir": "--output",
    "max_steps": "--steps",
    "per_device_train_batch_size": "--batch-size (the batch of one optimizer step over all processes)",
    "learning_rate": "--learning-rate",
    "seed": "--seed",
}


@dataclass
class World:
    """The processes of this run, as ``torchrun`` / ``accelerate launch`` describe them in the environment.

    Example:
        >>> World.from_environment().size >= 1
        True
    """

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        def number(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            if not value.strip().isdigit():
                return default
            return int(value)

        return cls(number("WORLD_SIZE", 1), number("RANK", 0), number("LOCAL_RANK", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainingJob:
    """What to fine-tune, on what, and where the results go.

    Attributes:
        model: a hub id or a local model folder (16-bit, or a checkpoint written by ``dq.save``).
        output: the run's folder (see the module docstring); new, empty, or an earlier run's.
        plan: a plan file, ``"preset"`` (the family preset), or ``None`` (the checkpoint's own plan, else the preset).
        quant: ``"dynamic"``, ``"4bit"`` or ``"16bit"``.
        dataset: ``"shapes"`` (synthetic, offline), a local data folder or file, or a hub dataset id.
        split: the split of a folder or hub dataset to train on.
        samples: rows to train on (shapes: how many to draw; default all rows, 1000 for shapes).
        columns: :func:`dq_kit.data.prepare`'s column options (``image``, ``question``, ``answer``,
            ``messages``, ``system``, ``default_question``).
        task: the shapes task (``describe``, ``colour``, ``shape``, ``position``, ``count``, ``mixed``).
        steps: optimizer steps.
        batch_size: rows per optimizer step over all processes; each process takes
            ``batch_size / (processes x gradient_accumulation_steps)``.
        learning_rate: the optimizer's learning rate.
        lora_r: the adapters' rank (alpha equal to it).
        vision: also adapt the vision side of a VLM.
        sft: other ``trl.SFTConfig`` fields (``{"save_steps": 20, "warmup_steps": 0}``).
        resume: continue the run in ``output`` from its last complete checkpoint.
        overwrite: start over in a folder that holds an earlier run (its checkpoints are removed).
        seed: the seed of the shapes data and of training.
        spread: one process places the model's layers over all visible GPUs (``device_map="auto"``), for
            a model larger than one GPU without FSDP; the GPUs then work in turn, not in parallel.
    """

    model: str
    output: str | os.PathLike
    plan: str | None = None
    quant: str = "dynamic"
    dataset: str = "shapes"
    split: str = "train"
    samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    task: str = "describe"
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 2e-4
    lora_r: int = 16
    vision: bool = False
    sft: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    spread: bool = False

    def settings(self) -> dict[str, Any]:
        """The job as JSON-ready values (written to ``dq_train.json``)."""
        values = dataclasses.asdict(self)
        values["output"] = os.fspath(self.output)
        return values


def parse_sft_options(pairs: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` into ``SFTConfig`` keywords; a VALUE is read as JSON when it parses, else as text.

    Raises :class:`DQError` for a pair without ``=``, a key ``SFTConfig`` does not have, or one the
    job sets through its own option.

    Example:
        >>> parse_sft_options(["save_steps=20", "lr_scheduler_type=cosine", "bf16=false"])
        {'save_steps': 20, 'lr_scheduler_type': 'cosine', 'bf16': False}
    """
    from trl import SFTConfig

    known = {field.name for field in dataclasses.fields(SFTConfig)}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        key = key.strip()
        if not equals or not key:
            raise DQError(f"--sft {pair!r}: write it as KEY=VALUE (e.g. --sft save_steps=20).")
        if key in OWN_OPTIONS:
            raise DQError(f"--sft {key}=...: set it with {OWN_OPTIONS[key]}.")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise DQError(f"--sft {key}=...: trl.SFTConfig has no field {key!r}.{hint}")
        text = {"True": "true", "False": "false", "None": "null"}.get(text.strip(), text)  # Python spellings too
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def per_device_batch(job: TrainingJob, world: World) -> int:
    """Rows each process takes per forward pass; raises :class:`DQError` when the batch does not split evenly.

    Example:
        >>> per_device_batch(TrainingJob("m", "out", batch_size=8), World(size=2))
        4
    """
    accumulation = job.sft.get("gradient_accumulation_steps", 1)
    if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
        raise DQError(f"--sft gradient_accumulation_steps={accumulation!r}: give a whole number of at least 1.")
    share = world.size * accumulation
    if job.batch_size < 1 or job.batch_size % share:
        raise DQError(
            f"--batch-size {job.batch_size} does not split over {world.size} process(es) x {accumulation} gradient "
            f"accumulation step(s): give a multiple of {share} (each process then takes batch_size / {share} rows per step)."
        )
    return job.batch_size // share


def check_output(job: TrainingJob, world: World) -> Path:
    """On the first process, check the output folder (nothing is written yet); returns the folder.

    A new or empty folder starts a run. A folder holding an earlier run (a ``dq_train.json`` beside
    checkpoints or an adapter) needs ``resume`` (continue it, with the same model, quantization,
    plan, rank and vision setting) or ``overwrite`` (start over). A folder with other files is
    refused: nothing in it is touched. The other processes only take the path; when the first
    process raises, the launcher stops them.

    Example:
        >>> import tempfile
        >>> check_output(TrainingJob("model", tempfile.mkdtemp()), World()).is_dir()
        True
    """
    output = Path(job.output).expanduser().resolve()
    if not world.is_main:
        return output
    if output.exists() and not output.is_dir():
        raise DQError(f"--output {output} is a file; give a new or empty folder for the run.")
    if output.is_dir() and not TRAINING_RUN.is_earlier_output(output):
        shown = ", ".join(sorted(p.name for p in output.iterdir())[:5])
        raise DQError(f"--output {output} holds other files ({shown}) and is not a dq-kit training run; "
                      "nothing in it was changed. Choose a new or empty folder.")
    if job.resume and job.overwrite:
        raise DQError("--resume continues the earlier run and --overwrite starts over: pass one of them.")
    earlier = (output / JOB_FILE).is_file() and any((output / name).exists() for name in ("checkpoints", "adapter"))
    if earlier and not (job.resume or job.overwrite):
        raise DQError(f"--output {output} holds an earlier training run: pass --resume to continue it from its last "
                      "checkpoint, or --overwrite to start over (its checkpoints are removed when training starts).")
    if earlier and job.resume:
        stored = json.loads((output / JOB_FILE).read_text(encoding="utf-8"))
        changed = [key for key in _SAME_ON_RESUME if stored.get(key) != job.settings()[key]]
        if changed:
            raise DQError(f"--resume continues a run made with other {', '.join(changed)} "
                          f"({', '.join(f'{key}={stored.get(key)!r}' for key in changed)}): give the same ones, or --overwrite.")
    return output


def start_output(job: TrainingJob, output: Path) -> None:
    """First process, once everything is checked and loaded: record the job; ``overwrite`` removes the earlier
    checkpoints (the earlier adapter stays until the new one replaces it atomically).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> start_output(TrainingJob("model", folder), folder)
        >>> (folder / JOB_FILE).is_file()
        True
    """
    if job.overwrite:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / JOB_FILE, job.settings())


def load_training_data(job: TrainingJob) -> Any:
    """The training rows in the chat format :func:`dq_kit.sft_trainer` takes, every row checked (images opened).

    Raises :class:`DataError` when the data cannot be read, has no answers, or no valid row is left.
    """
    from ..data.finetune import check, convert, validate
    from ..data.shapes import shapes_dataset

    if job.dataset == "shapes":
        return shapes_dataset(job.samples or 1000, seed=job.seed, task=job.task, test_size=None)
    dataset = _read_dataset(job.dataset, job.split)
    if job.samples is not None:
        dataset = dataset.select(range(min(job.samples, len(dataset))))
    if "messages" in dataset.column_names and "images" not in dataset.column_names and not job.columns:
        report = check(dataset)  # text conversations: no image to open
        if len(report.problems) == len(dataset):
            raise DataError(f"No valid row is left to train on. {report}")
        return dataset
    if "messages" not in dataset.column_names or job.columns:
        if "prompt" in dataset.column_names and "completion" in dataset.column_names and not job.columns:
            return dataset  # prompt-completion rows: checked by sft_trainer
        dataset = convert(dataset, **job.columns)
    base_dir = job.dataset if Path(job.dataset).is_dir() else None
    return validate(dataset, drop=True, base_dir=base_dir)


def _read_dataset(reference: str, split: str) -> Any:
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(reference).expanduser()
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = load_from_disk(str(path))
        elif path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise DataError(f"--dataset {path}: read .json, .jsonl, .csv or .parquet files, or a data folder.")
            loaded = load_dataset(kind, data_files=str(path), split="train")
        else:
            loaded = load_dataset(str(path) if path.is_dir() else reference, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ValueError, ConnectionError)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"--dataset {reference!r} could not be read: {detail}. Give 'shapes', a local data folder or "
                        "file, or a hub dataset id (the hub needs network access).") from exc
    if isinstance(loaded, (DatasetDict, dict)):
        if split not in loaded:
            raise DataError(f"--dataset {reference!r} has splits {list(loaded)}, not {split!r}: choose one with --split.")
        loaded = loaded[split]
    if not isinstance(loaded, Dataset) or len(loaded) == 0:
        raise DataError(f"--dataset {reference!r} has no rows in split {split!r}.")
    return loaded


def adapter_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of every trainable parameter (names and values): equal on every process of a correct DDP run.

    Example:
        >>> adapter_fingerprint(torch.nn.Linear(2, 2))[:8].isalnum()
        True
    """
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_training(job: TrainingJob) -> Path:
    """Check everything, load, add LoRA, train and write the adapter; returns the adapter's folder.

    Every process runs this function; the first one alone writes ``dq_train.json`` and the
    adapter, and prints (the others print one line at the end: their adapter's fingerprint).

    Example:
        >>> import dq_kit as dq
        >>> job = TrainingJob(dq.tiny.save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl"), "/tmp/dq-train", samples=8, steps=2, batch_size=4)
        >>> run_training(job).name                               # doctest: +SKIP
        'adapter'
    """
    from ..models.resolution import auto_class, resolve_config
    from .sft import SHARDING_NEEDS_GPUS, shards_parameters

    world = World.from_environment()
    per_device = per_device_batch(job, world)
    for name, value in (("steps", job.steps), ("lora-r", job.lora_r), ("samples", 1 if job.samples is None else job.samples)):
        if value < 1:
            raise DQError(f"--{name} must be at least 1, got {value}.")
    if job.spread and world.size > 1:
        raise DQError(f"--spread places one model over all GPUs in one process; this run has {world.size} processes. "
                      "Run it without torchrun / accelerate launch, or drop --spread to train a full copy per process.")
    if shards_parameters(job.sft) and not torch.cuda.is_available():
        raise DQError(SHARDING_NEEDS_GPUS)
    config = resolve_config(job.model)
    vlm = auto_class(config).__name__ == "AutoModelForImageTextToText"
    if job.dataset == "shapes" and not vlm:
        raise DataError(f"--dataset shapes asks questions about images, and {job.model} is a text model: give a text dataset.")
    output = check_output(job, world)
    with _quiet_unless(world.is_main):
        train = load_training_data(job)
        print(f"dq-kit train: {len(train)} training rows from {job.dataset}; {world.size} process(es) x {per_device} rows per step"
              f"{' x ' + str(job.sft['gradient_accumulation_steps']) + ' accumulation steps' if 'gradient_accumulation_steps' in job.sft else ''}.")
        model, processor, trainer = _build_trainer(job, world, config, train, per_device, output)
        stats = _memory_before(job, model, trainer, per_device)
        if world.is_main:
            start_output(job, output)
        result = trainer.train(resume_from_checkpoint=True if job.resume else None)
        print(f"{result.global_step} steps, mean training loss {result.training_loss:.3f}; parallelism: "
              f"{trainer.accelerator.distributed_type.value} over {world.size} process(es)")
        print("training:", stats.report())
    adapter = output / "adapter"
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        _save_sharded_adapter(trainer, processor, adapter, world)
    else:
        if world.is_main:
            from .export import save_adapter

            save_adapter(trainer.model, adapter, processor=processor)
        # DDP keeps a full copy per process: the copies must agree
        print(f"rank {world.rank} of {world.size}: adapter fingerprint {adapter_fingerprint(trainer.model)}", flush=True)
    if world.is_main:
        print(f"Adapter written to {adapter}")
    return adapter


def _save_sharded_adapter(trainer: Any, processor: Any, adapter: Path, world: World) -> None:
    """Gather a sharded adapter (every process takes part) into a staging folder, then swap it in atomically (first process)."""
    from ..files import atomic_directory
    from .export import ADAPTER

    if trainer.is_fsdp_enabled:  # PEFT's FSDP recipe: gather full weights for the final save
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    gathered = adapter.with_name(".adapter.gathered.tmp")
    if world.is_main:
        shutil.rmtree(gathered, ignore_errors=True)  # left by a save killed earlier
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(os.fspath(gathered))  # collective; only the first process writes
    if world.is_main:
        with atomic_directory(adapter, ADAPTER) as staging:
            for item in gathered.iterdir():
                shutil.move(os.fspath(item), staging / item.name)
            if processor is not None:
                processor.save_pretrained(staging)
        shutil.rmtree(gathered, ignore_errors=True)


def _build_trainer(job: TrainingJob, world: World, config: Any, train: Any, per_device: int, output: Path) -> tuple:
    """Load the model (a full copy on this process's device), add LoRA, and build the trainer."""
    from ..models.resolution import default_dtype, meta_model
    from ..quant.loading import load
    from ..quant.plan import Plan
    from .lora import add_lora
    from .sft import sft_trainer, shards_parameters

    device_map = ("auto" if job.spread else {"": world.local_rank}) if torch.cuda.is_available() else "cpu"
    dtype = default_dtype(device_map)
    plan = None
    if job.quant == "dynamic" and job.plan == "preset":
        plan = Plan.preset(meta_model(config))
    elif job.quant == "dynamic" and job.plan is not None:
        plan = Plan.load(job.plan)
    # FSDP flattens parameters of one dtype: the packed 4-bit weights are then stored in the 16-bit dtype
    storage = {"quant_storage": dtype} if shards_parameters(job.sft) and job.quant != "16bit" else {}
    model, processor = load(job.model, quant=job.quant, plan=plan, dtype=dtype, device_map=device_map, **storage)
    peft_model = add_lora(model, r=job.lora_r, alpha=job.lora_r, vision=job.vision, language=True)
    trainer = sft_trainer(
        peft_model, processor, train,
        output_dir=os.fspath(output / "checkpoints"),
        max_steps=job.steps,
        per_device_train_batch_size=per_device,
        learning_rate=job.learning_rate,
        seed=job.seed,
        **job.sft,
    )
    return model, processor, trainer


def _memory_before(job: TrainingJob, model: nn.Module, trainer: Any, per_device: int) -> Any:
    """Print the device, the memory in use and the predicted peak, as the notebooks do; returns the running stats."""
    from ..quant.memory import estimate_memory
    from .device_stats import device_stats

    rows = trainer.train_dataset  # as the trainer prepared them (tokenized for language models)
    first = trainer.data_collator([rows[index] for index in range(min(per_device, len(rows)))])
    estimate = estimate_memory(trainer.model, getattr(model, "dq_plan", None), task="train", batch_size=per_device,
                               seq_len=int(first["input_ids"].shape[1]), lora_r=job.lora_r,
                               vision_tokens=None if job.vision else 0)
    stats = device_stats(predicted_peak=estimate.peak_bytes)
    print(stats)
    return stats


@contextlib.contextmanager
def _quiet_unless(main: bool) -> Iterator[None]:
    """Print on the first process only: the others would repeat every line."""
    if main:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
