"""Checks ``dq.estimate_memory(task=...)`` against the peak memory each task really adds, and records
how much whole-model ``dq.analyze`` adds relative to the model's weights.

Three llama-architecture language models (random weights, fp32 safetensors, about 30M, 134M and
300M parameters) are built locally. For each, in a fresh subprocess per task:

* ``analyze`` whole-model (model loaded first) and ``sequential`` (nothing loaded: it streams);
* LoRA training with ``dq.sft_trainer`` on the dynamic 4-bit model, with and without gradient checkpointing;

and the peak resident memory the task adds (the kernel's VmHWM, reset just before, minus the RSS
just before; the model's pages touched first so that reading an mmap'd checkpoint is not counted)
is compared with the estimate. On the CPU the allocator keeps freed memory for reuse, so the
processes run with glibc's ``MALLOC_MMAP_THRESHOLD_=16384``: large tensors then come and go with
their pages, and RSS follows the live tensors, as CUDA's ``max_memory_allocated`` does on a GPU.
The default allocator's peak is recorded beside it for the whole-model analysis.

Writes ``benchmarks/results/memory_model.{json,md}``. Run: ``.venv/bin/python benchmarks/memory_model.py``
(about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SIZES = {
    "30M": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6),
    "134M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "300M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
}
COMMON = dict(vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)
CALIBRATION = 8
TRAIN = dict(batch_size=2, steps=3, words=90)
FAITHFUL = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
TASKS = ("analyze", "sequential", "train", "train_no_checkpointing")


def build(size: str, path: Path) -> int:
    import torch
    import transformers

    import dq_kit as dq

    torch.manual_seed(0)
    ids = {k: v for k, v in dq.tiny._text_kwargs("llama").items() if k.endswith("token_id")}
    config = transformers.LlamaConfig(**SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"], **COMMON, **ids)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    dq.tiny.tiny_processor("llama").save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _train_rows(words: int) -> list[dict]:
    text = " ".join(["red circle blue square green triangle"] * (words // 6))
    return [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": text}]}]} for _ in range(8)]


def child(task: str, path: str) -> None:
    import torch

    import dq_kit as dq
    from dq_kit.data.calibration import prepare_calibration

    torch.set_num_threads(2)
    calibration = dq.calibration.default_calibration(n=CALIBRATION, images=False)
    result: dict = {"task": task}
    _warm_up(task)  # the same code on a tiny model first: imports and one-time allocations are not the task's memory
    if task in ("analyze", "sequential"):
        model, tokenizer = dq.load(path, quant="16bit") if task == "analyze" else (None, dq.load_processor(path))
        config = model.config if model is not None else dq.modeling.resolve_config(path)
        samples = prepare_calibration(calibration, tokenizer, config)
        result["tokens"] = max(s.num_tokens for s in samples)
        if model is not None:
            _ = [float(p.detach().sum()) for p in model.parameters()]  # page the checkpoint in before measuring
        stats = dq.device_stats()  # the peak and the clock restart now
        dq.analyze(model if model is not None else path, tokenizer, calibration, sequential=task == "sequential", progress=False)
    else:
        from datasets import Dataset

        model, tokenizer = dq.load(path, quant="dynamic")
        rows = Dataset.from_list(_train_rows(TRAIN["words"]))
        result["seq_len"] = max(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows)
        _ = [float(p.detach().float().sum()) for p in model.parameters() if p.dtype.is_floating_point]
        stats = dq.device_stats()  # the peak and the clock restart now
        peft_model = dq.add_lora(model, r=16, gradient_checkpointing=task == "train")
        trainer = dq.sft_trainer(peft_model, tokenizer, rows, output_dir=tempfile.mkdtemp(), max_steps=TRAIN["steps"],
                                 per_device_train_batch_size=TRAIN["batch_size"], activation_checkpointing=task == "train",
                                 save_strategy="no", logging_steps=1)
        trainer.train()
    result.update(added_mib=(stats.peak() - stats.before) / 2**20, seconds=time.perf_counter() - stats.started)
    print(json.dumps(result))


def _warm_up(task: str) -> None:
    import dq_kit as dq

    tiny = dq.tiny.save_tiny("llama", tempfile.mkdtemp())
    if task in ("analyze", "sequential"):
        dq.analyze(tiny, calibration=["A red circle."], sequential=task == "sequential", progress=False)
        return
    from datasets import Dataset

    model, tokenizer = dq.load(tiny, quant="dynamic")
    trainer = dq.sft_trainer(dq.add_lora(model, r=2, gradient_checkpointing=task == "train"), tokenizer,
                             Dataset.from_list(_train_rows(6)), output_dir=tempfile.mkdtemp(), max_steps=1, save_strategy="no")
    trainer.train()


def run(task: str, path: Path, faithful: bool = True) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DQ_PROGRESS": "0", **(FAITHFUL if faithful else {})}
    done = subprocess.run([sys.executable, __file__, "--child", task, str(path)], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{task} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(path: Path, task: str, measured: dict) -> dict:
    import dq_kit as dq

    if task in ("analyze", "sequential"):
        estimate = dq.estimate_memory(path, task="analyze", sequential=task == "sequential", samples=CALIBRATION,
                                      tokens=measured["tokens"], device="cpu")
    else:
        model = dq.modeling.meta_model(dq.modeling.resolve_config(path))
        estimate = dq.estimate_memory(path, dq.Plan.preset(model), task="train", batch_size=TRAIN["batch_size"],
                                      seq_len=measured["seq_len"], lora_r=16, gradient_checkpointing=task == "train", device="cpu")
    return {"predicted_mib": estimate.peak_bytes / 2**20, "parts_mib": {k: round(v / 2**20, 1) for k, v in estimate.task_memory.parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("TASK", "PATH"))
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            path = Path(tmp) / size
            params = build(size, path)
            weights_mib = params * 4 / 2**20
            for task in TASKS:
                measured = run(task, path)
                row = {"size": size, "params": params, "weights_mib": round(weights_mib, 1), "task": task, **measured, **predict(path, task, measured)}
                row["error"] = row["predicted_mib"] / row["added_mib"] - 1
                if task == "analyze":
                    row["added_default_allocator_mib"] = run(task, path, faithful=False)["added_mib"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_model.json").write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores, torch CPU, fp32", "rows": rows}, indent=2) + "\n")
    lines = [
        "# Memory model: predicted vs measured peak added by each task",
        "",
        f"Machine: {os.cpu_count()} CPU cores, torch CPU, fp32. Llama-architecture models with random weights (vocab "
        f"{COMMON['vocab_size']}). Analysis: {CALIBRATION} default text chats, all metrics. Training: dq.sft_trainer on the dynamic "
        f"4-bit model, LoRA r=16 on every language Linear, batch {TRAIN['batch_size']}, {TRAIN['steps']} steps. Measured: peak RSS "
        "added by the task with glibc returning large blocks at once (see the script's docstring); whole-model analysis also "
        "with the default allocator.",
        "",
        "| model | weights (MiB) | task | tokens | measured (MiB) | predicted (MiB) | error | measured / weights | default allocator (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tokens = row.get("tokens") or f"{TRAIN['batch_size']}x{row.get('seq_len')}"
        default = f"{row['added_default_allocator_mib']:.0f}" if "added_default_allocator_mib" in row else ""
        lines.append(f"| {row['size']} | {row['weights_mib']:.0f} | {row['task']} | {tokens} | {row['added_mib']:.0f} | "
                     f"{row['predicted_mib']:.0f} | {row['error']:+.0%} | {row['added_mib'] / row['weights_mib']:.2f}x | {default} |")
    worst = max(abs(row["error"]) for row in rows)
    lines += ["", f"Largest prediction error: {worst:.0%} (target: within 25%).", ""]
    (RESULTS / "memory_model.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
