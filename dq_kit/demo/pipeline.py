"""``make demo`` / ``python -m dq_kit.demo``: the whole dq_kit flow on the shipped demo model, offline.

analyze → plan under a budget → load 16-bit / NF4 / dynamic → compare → LoRA fine-tune a new skill on
the dynamic 4-bit model → generate, printing accuracy before and after; then the memory planner's
figures for the real hub models whose configs ship with dq_kit.

Example:
    >>> from dq_kit.demo import main
    >>> main(["--steps", "20"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..analysis import analyze
from ..data import shapes_dataset
from ..evaluation import compare, evaluate_answers, generate
from ..models.resolution import shipped_hub_ids
from ..planning import plan, predicted_kl
from ..quant import estimate_memory, inspect, load
from ..training import add_lora, sft_trainer
from .model import demo_model_path


def _section(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def _memory_table() -> pd.DataFrame:
    rows = []
    for hub_id in shipped_hub_ids():
        est = estimate_memory(hub_id)
        rows.append(
            {
                "model": hub_id,
                "params (B)": round(est.params / 1e9, 2),
                "16-bit GiB": round(est.gib("16bit"), 2),
                "NF4 GiB": round(est.gib("4bit"), 2),
                "dynamic preset GiB": round(est.gib("plan"), 2),
                "preset vs NF4": f"+{est.plan_overhead:.1%}",
            }
        )
    return pd.DataFrame(rows)


def teach_skill(model: Any, processor: Any, splits: Any, steps: int = 800, lr: float = 2e-3) -> tuple[Any, Any, Any]:
    """LoRA-fine-tune ``model`` on ``splits["train"]`` and score ``splits["test"]`` before and after.

    Returns ``(peft_model, scores_before, scores_after)`` (:class:`dq_kit.evaluation.scores.AnswerScores`).

    Example:
        >>> import dq_kit as dq
        >>> from dq_kit.demo.model import demo_model_path
        >>> model, processor = dq.load(demo_model_path(), quant="dynamic")
        >>> splits = dq.data.shapes_dataset(40, seed=3, task="colour", test_size=8)
        >>> _, before, after = teach_skill(model, processor, splits, steps=2)   # doctest: +ELLIPSIS
        trainable params: ...
        >>> before.exact_match
        0.0
    """
    before = evaluate_answers(model, processor, splits["test"], max_new_tokens=6)
    peft_model = add_lora(model, r=16, alpha=32)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sft_trainer(
            peft_model,
            processor,
            splits["train"],
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            save_strategy="no",
            logging_steps=50,
            disable_tqdm=True,
        )
        trainer.train()
    return peft_model, before, evaluate_answers(peft_model, processor, splits["test"], max_new_tokens=6)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo and print every step's result."""
    parser = argparse.ArgumentParser(prog="python -m dq_kit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.10, help="extra memory over all-NF4 for the dynamic plan")
    parser.add_argument("--steps", type=int, default=800, help="LoRA fine-tuning steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    parser.add_argument("--eval-samples", type=int, default=48)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    pd.set_option("display.width", 160, "display.max_colwidth", 48, "display.max_rows", 40)
    start = time.perf_counter()
    path = demo_model_path()

    _section("1. The shipped demo VLM (Qwen2-VL architecture, trained here on synthetic shapes) in 16-bit")
    m16, processor = load(path, quant="16bit")
    held_out = shapes_dataset(args.eval_samples, seed=1001, task="describe", test_size=None)
    scores16 = evaluate_answers(m16, processor, held_out, max_new_tokens=12)
    print(f"held-out captions: exact match {scores16.exact_match:.0%}, token F1 {scores16.token_f1:.2f}")

    _section("2. Where does 4-bit hurt?  dq.analyze on calibration images never used for evaluation")
    calibration = list(shapes_dataset(32, seed=2002, task="describe", test_size=None))
    report = analyze(m16, processor, calibration)
    print(report.summary())

    _section(f"3. dq.plan: the modules worth keeping in 16-bit for +{args.budget:.0%} memory")
    chosen = plan(report, budget=args.budget)
    print(chosen)
    print(f"predicted KL {predicted_kl(report, chosen):.3g} vs all-NF4 {report.meta['kl_uniform']:.3g} nats/token")

    _section("4. 16-bit vs NF4 vs dynamic 4-bit, side by side")
    m4, _ = load(path, quant="4bit", processor=False)
    md, _ = load(path, quant="dynamic", plan=chosen, processor=False)
    table = inspect(md)
    print(f"dynamic model: {int((~table.quantized).sum())} of {len(table)} Linear modules in 16-bit (verified)")
    result = compare({"16bit": m16, "4bit": m4, "dynamic": md}, processor, list(held_out.select(range(8))), max_new_tokens=12)
    print(result.summary.to_string(index=False))
    print(result.answers.to_string())
    for name, model in (("NF4", m4), ("dynamic", md)):
        scores = evaluate_answers(model, processor, held_out, max_new_tokens=12)
        print(f"{name:8s} held-out exact match {scores.exact_match:.0%}, token F1 {scores.token_f1:.2f}")

    _section(f"5. LoRA on the dynamic 4-bit model: teach it a new skill, naming the colour alone ({args.steps} steps)")
    skill = shapes_dataset(400, seed=3003, task="colour", test_size=48)
    peft_model, before, after = teach_skill(md, processor, skill, steps=args.steps, lr=args.lr)
    print(f"'What colour is the shape?', held-out exact match: before {before.exact_match:.0%} -> after {after.exact_match:.0%}")

    _section("6. dq.generate with the fine-tuned model")
    sample = skill["test"][0]
    answer = generate(peft_model, processor, sample["images"][0], "What colour is the shape?", max_new_tokens=6)
    print(f"Q: What colour is the shape?  A: {answer!r}  (truth: {sample['answer']!r})")

    _section("7. Memory planner for real VLMs (no weights downloaded)")
    print(_memory_table().to_string(index=False))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")

