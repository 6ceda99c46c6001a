"""``dq-kit`` command line: a thin argparse front over the public API.

Each subcommand is one ``_add_<name>(subparsers)`` function registered in :data:`SUBCOMMANDS`
that sets ``func`` to a handler ``(args) -> int``; adding a command means adding one function.

Example:
    $ dq-kit analyze ./my-model --calib calib.jsonl --out report.json --sequential
    $ dq-kit analyze Qwen/Qwen2-VL-2B-Instruct --out report.json --metrics weight activation --plots figures/
    $ dq-kit plan report.json --budget 0.10 --out plan.json
    $ dq-kit memory meta-llama/Llama-3.2-11B-Vision-Instruct --plan plan.json
    $ dq-kit train Qwen/Qwen2-VL-2B-Instruct --dataset shapes --output runs/shapes --steps 200
    $ torchrun --nproc_per_node 2 -m dq_kit.cli train Qwen/Qwen2-VL-2B-Instruct --output runs/ddp --batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import CalibrationError, DQError
from .files import check_target
from .planning.options import PlanOptions


def _read_calibration(path: str) -> list[Any]:
    """Samples from a JSON list or a JSONL file (strings, chat samples or model-input dicts)."""
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"Calibration file not found: {file}")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"Calibration file {file} is not valid JSON/JSONL ({exc}).") from exc
    if not isinstance(data, list):
        raise CalibrationError(f"Calibration file {file} must hold a JSON list of samples (or one sample per line as .jsonl).")
    return data


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis.report import REPORT_OUTPUT
    from .analysis.run import analyze

    check_target(args.out, REPORT_OUTPUT, args.overwrite)  # before the analysis, not after

    calibration = _read_calibration(args.calib) if args.calib else None
    base_dir = os.path.dirname(os.path.abspath(args.calib)) if args.calib else None
    if calibration is None and args.n_calib is not None:
        from transformers import AutoModelForImageTextToText

        from .data.calibration import default_calibration
        from .models.resolution import auto_class, resolve_config

        vlm = auto_class(resolve_config(args.model)) is AutoModelForImageTextToText
        calibration = default_calibration(n=args.n_calib, images=vlm)
    report = analyze(
        args.model,
        calibration=calibration,
        metrics=tuple(args.metrics),
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        estimator=args.estimator,
        sequential=args.sequential,
        corrections=args.corrections,
        max_length=args.max_length,
        progress=False if args.quiet else None,
        base_dir=base_dir,
    )
    report.save(args.out, overwrite=args.overwrite)
    if args.plots:
        import matplotlib

        matplotlib.use("Agg")
        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        for index, figure in enumerate(report.plot()):
            figure.savefig(folder / f"analysis_{index}.png", dpi=120)
    print(report.summary())
    print(f"Report written to {args.out}")
    return 0


def _add_analyze(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="measure weight / activation / sensitivity error of 4-bit quantization per module",
        description="Analyse a 16-bit model and write a dq_kit report (JSON) for dq.plan / dq.QuantReport.load.",
    )
    parser.add_argument("model", help="local model folder or hub id")
    parser.add_argument("--calib", help="JSON list or JSONL file of calibration samples (strings, chat samples with image paths "
                        "relative to the file, or model-input dicts); default: dq_kit's built-in set")
    parser.add_argument("--n-calib", type=int, default=None, help="size of the built-in calibration set (default 32)")
    parser.add_argument("--out", required=True, help="where to write the report JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a dq_kit report")
    parser.add_argument("--metrics", nargs="+", default=["weight", "activation", "sensitivity"],
                        choices=["weight", "activation", "sensitivity"], help="metrics to measure (default: all)")
    parser.add_argument("--estimator", default="fisher", choices=["fisher", "loo", "both"], help="sensitivity estimator")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_const", const=True, default="auto",
                      help="hold one block at a time (models larger than memory); default: when the whole model would not fit")
    mode.add_argument("--whole", action="store_const", const=False, dest="sequential", help="analyse the whole model at once")
    parser.add_argument("--corrections", action="store_true",
                        help="also fit low-rank error corrections (written beside the report as <name>.corrections.<id>.safetensors)")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=None, help="truncate text-only calibration samples")
    parser.add_argument("--plots", help="also save the report's figures as PNG files in this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run_analyze)


def _run_plan(args: argparse.Namespace) -> int:
    from .analysis.report import QuantReport
    from .planning import plan, predicted_kl
    from .quant.plan import PLAN_OUTPUT

    check_target(args.out, PLAN_OUTPUT, args.overwrite)
    report = QuantReport.load(args.report)
    options = PlanOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(PlanOptions)})
    chosen = plan(report, options=options)
    chosen.save(args.out, overwrite=args.overwrite)
    print(chosen)
    print(f"predicted KL {predicted_kl(report, chosen):.4g} nats/token (uniform NF4: {report.meta['kl_uniform']:.4g})")
    print(f"Plan written to {args.out}")
    return 0


def _add_plan(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="choose the modules to keep in 16-bit from a report, under a memory budget",
        description="Read a dq_kit report and write a plan (JSON) for dq.load(..., quant='dynamic', plan=...).",
    )
    parser.add_argument("report", help="report JSON written by `dq-kit analyze`")
    parser.add_argument("--out", required=True, help="where to write the plan JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a dq_kit plan")
    kinds = {"budget": float, "budget_bytes": int, "threshold": float, "top_k": int, "score": str, "menu": str}
    for field in dataclasses.fields(PlanOptions):  # the options dq.plan takes, with their help, in one place
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if field.name in ("keep", "quantize"):
            parser.add_argument(flag, nargs="*", default=[], help=help_text)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type=kinds[field.name], default=field.default, help=f"{help_text} (default {field.default})")
    parser.set_defaults(func=_run_plan)


def _run_memory(args: argparse.Namespace) -> int:
    from .quant.memory import estimate_memory
    from .quant.plan import Plan

    print(estimate_memory(args.model, Plan.load(args.plan) if args.plan else None))
    return 0


def _add_memory(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "memory",
        help="model size in 16-bit, NF4 and dynamic 4-bit, without downloading weights",
        description="Estimate a model's footprint on the meta device (configs of popular VLMs ship with dq_kit).",
    )
    parser.add_argument("model", help="local model folder or hub id")
    parser.add_argument("--plan", help="plan JSON (default: the architecture preset)")
    parser.set_defaults(func=_run_memory)


def _run_train(args: argparse.Namespace) -> int:
    from .training.job import TrainingJob, parse_sft_options, run_training

    columns = {name: getattr(args, name) for name in ("image", "question", "answer", "messages", "system", "default_question")
               if getattr(args, name) is not None}
    job = TrainingJob(
        model=args.model, output=args.output, plan=args.plan, quant=args.quant, dataset=args.dataset, split=args.split,
        samples=args.samples, columns=columns, task=args.task, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, lora_r=args.lora_r, vision=args.vision, sft=parse_sft_options(args.sft),
        resume=args.resume, overwrite=args.overwrite, seed=args.seed, spread=args.spread,
    )
    run_training(job)
    return 0


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="LoRA fine-tuning of a (dynamic) 4-bit model on a chat dataset; runs under torchrun / accelerate launch",
        description="Load a model in dynamic 4-bit, add LoRA adapters, train with answer-only loss and write the adapter "
                    "to OUTPUT/adapter. Under torchrun or accelerate launch every process trains a copy (DDP) and the first "
                    "one writes the files.",
    )
    parser.add_argument("model", help="local model folder or hub id")
    parser.add_argument("--output", required=True, help="the run's folder: checkpoints/, adapter/ and dq_train.json go here")
    parser.add_argument("--plan", help="a plan JSON, or 'preset' (default: the checkpoint's own plan, else the family preset)")
    parser.add_argument("--quant", default="dynamic", choices=["dynamic", "4bit", "16bit"], help="how to load the base (default dynamic)")
    parser.add_argument("--dataset", default="shapes", help="'shapes' (synthetic, offline), a local data folder or file, or a hub id")
    parser.add_argument("--split", default="train", help="the split of a folder or hub dataset (default train)")
    parser.add_argument("--samples", type=int, help="rows to train on (default: all; 1000 for shapes)")
    parser.add_argument("--task", default="describe", choices=["describe", "colour", "shape", "position", "count", "mixed"],
                        help="the shapes task (default describe)")
    for column in ("image", "question", "answer", "messages", "system"):
        parser.add_argument(f"--{column}", help=f"the dataset's {column} column, when it is not detected"
                            if column != "system" else "a system message put before every conversation")
    parser.add_argument("--default-question", help="the question of a caption dataset without a question column")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per optimizer step over all processes (default 8); must split evenly over them")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="default 2e-4")
    parser.add_argument("--lora-r", type=int, default=16, help="adapter rank (default 16)")
    parser.add_argument("--vision", action=argparse.BooleanOptionalAction, default=False,
                        help="also adapt the vision side of a VLM (default --no-vision)")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE",
                        help="any trl.SFTConfig field, repeatable (--sft save_steps=20 --sft lr_scheduler_type=cosine)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --output that holds an earlier run")
    parser.add_argument("--spread", action="store_true",
                        help="one process, the model's layers spread over all visible GPUs (a model larger than one GPU, without FSDP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_train)


SUBCOMMANDS: list[Callable[[Any], None]] = [_add_analyze, _add_plan, _add_memory, _add_train]


def build_parser() -> argparse.ArgumentParser:
    """The ``dq-kit`` argument parser with every registered subcommand.

    Example:
        >>> build_parser().parse_args(["analyze", "model-dir", "--out", "r.json"]).metrics
        ['weight', 'activation', 'sensitivity']
    """
    parser = argparse.ArgumentParser(prog="dq-kit", description="Dynamic 4-bit quantization toolkit for vision-language models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dq-kit``; returns the exit status (2 for bad input, with a one-line message).

    Example:
        >>> main(["analyze", "/no/such/model", "--out", "/tmp/r.json", "--quiet"])  # doctest: +SKIP
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DQError as exc:
        print(f"dq-kit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
