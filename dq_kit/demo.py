"""``make demo`` / ``python -m dq_kit.demo``: the dq_kit flow on a built-in tiny model, offline.

Loads a tiny Qwen2-VL-architecture model in 16-bit, plain NF4 and dynamic 4-bit, answers one
image question with each, and prints the per-module table and the memory planner's figures
for the real hub models whose configs ship with dq_kit.

Example:
    >>> from dq_kit.demo import main
    >>> main()   # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import warnings

import pandas as pd
import torch

from . import estimate_memory, inspect, load, modeling, tiny


def _section(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}")


def main() -> None:
    """Run the demo and print its tables."""
    warnings.filterwarnings("ignore", category=UserWarning)
    pd.set_option("display.width", 160, "display.max_colwidth", 60, "display.max_rows", 60)
    with tempfile.TemporaryDirectory() as folder:
        path = tiny.save_tiny("qwen2_vl", folder)
        image = tiny.tiny_image(seed=1)
        for quant in ("16bit", "4bit", "dynamic"):
            model, processor = load(path, quant=quant)
            _section(f"Tiny Qwen2-VL loaded as quant={quant!r}" + (f" — {model.dq_plan.source} plan" if model.dq_plan else ""))
            table = inspect(model)
            print(table.to_string(index=False))
            print(f"\n{int(table.quantized.sum())} of {len(table)} Linear modules in 4-bit; Linear bytes: {int(table.bytes.sum()):,}")
            inputs = tiny.tiny_chat_inputs(processor, "qwen2_vl", image=image)
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1]
            top = processor.tokenizer.decode(int(logits.argmax()))
            print(f"next-token prediction after the prompt: {top!r} (random weights — the shipped demo model comes later)")

    _section("Memory planner (no weights downloaded): 16-bit / NF4 / dynamic preset")
    rows = []
    for hub_id in modeling.shipped_hub_ids():
        est = estimate_memory(hub_id)
        rows.append(
            {
                "model": hub_id,
                "params (B)": round(est.params / 1e9, 2),
                "16-bit GiB": round(est.gib("16bit"), 2),
                "NF4 GiB": round(est.gib("4bit"), 2),
                "dynamic GiB": round(est.gib("plan"), 2),
                "dynamic vs NF4": f"+{est.plan_overhead:.1%}",
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
