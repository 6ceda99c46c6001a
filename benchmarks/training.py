"""LoRA training throughput and peak memory: 16-bit vs NF4 vs dynamic 4-bit, side by side.

Each variant trains in its own subprocess (so peak RSS / peak CUDA memory are its own) on the
shipped demo VLM with the same data, LoRA settings and steps. On a GPU the same script measures
peak CUDA memory too.

Usage:
    python benchmarks/training.py [--steps 60] [--batch-size 8] [--model PATH]
Results: benchmarks/results/training.json and training.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("16bit", "4bit", "dynamic")


def run_variant(variant: str, model_path: str, steps: int, batch_size: int) -> dict:
    """Train one variant in this process and return its measurements."""
    import tempfile

    import torch

    import dq_kit as dq
    from dq_kit.quant.memory import loaded_bytes

    model, processor = dq.load(model_path, quant=variant)
    footprint = loaded_bytes(model)
    data = dq.data.shapes_dataset(steps * batch_size, seed=7, task="colour", test_size=None)
    peft_model = dq.add_lora(model, r=16, alpha=32)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = dq.sft_trainer(
            peft_model,
            processor,
            data,
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=2e-3,
            save_strategy="no",
            logging_steps=steps,
            disable_tqdm=True,
        )
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model_bytes": footprint,
        "samples_per_s": steps * batch_size / seconds,
        "seconds": seconds,
        "final_loss": output.training_loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.model is None:
        from dq_kit.demo.model import demo_model_path

        args.model = str(demo_model_path())
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args.steps, args.batch_size)))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    settings = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lora": "r=16, alpha=32, all towers"}
    (RESULTS / "training.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = [
        "# LoRA training: 16-bit vs NF4 vs dynamic 4-bit",
        "",
        f"Settings: {settings}. Each variant in its own process, same data and seed.",
        "",
        "| variant | device | model MiB | samples/s | vs 16-bit | peak RSS MiB | peak CUDA MiB | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = rows[0]["samples_per_s"]
    for row in rows:
        cuda = f"{row['peak_cuda_mib']:.0f}" if row["peak_cuda_mib"] is not None else "–"
        lines.append(
            f"| {row['variant']} | {row['device']} | {row['model_bytes'] / 2**20:.2f} | {row['samples_per_s']:.1f} | "
            f"{row['samples_per_s'] / base:.2f}x | {row['peak_rss_mib']:.0f} | {cuda} | {row['final_loss']:.3f} |"
        )
    (RESULTS / "training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
