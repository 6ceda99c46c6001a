"""Peak memory of sequential (block-at-a-time) vs whole-model analysis, and that both give the same numbers.

Builds a ~134M-parameter llama-architecture model locally (random weights, fp32 safetensors), then
runs ``dq.analyze`` with all metrics in a fresh subprocess per mode and records the peak resident
memory (``ru_maxrss``) of each, against a baseline process that only imports the stack and prepares
the calibration set. Writes ``benchmarks/results/sequential_memory.{json,md}``.

Run: ``.venv/bin/python benchmarks/sequential_memory.py`` (about 3-6 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
              vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
CALIBRATION = 8
COLUMNS = ("weight_error", "weight_rel_error", "act_local_error", "act_accum_error", "sensitivity")


def build(path: Path) -> int:
    import torch
    import transformers

    import dq_kit as dq

    config = transformers.LlamaConfig(**CONFIG, **{k: v for k, v in dq.tiny._text_kwargs("llama").items() if k.endswith("token_id")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    dq.tiny.tiny_processor("llama").save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def child(mode: str, path: str, out: str) -> None:
    import dq_kit as dq
    from dq_kit.analysis import analyze
    from dq_kit.calibration import prepare_calibration

    calibration = dq.calibration.default_calibration(n=CALIBRATION, images=False)
    started = time.perf_counter()
    if mode == "baseline":
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        prepare_calibration(calibration, tokenizer)
    else:
        report = analyze(path, calibration, sequential=mode == "sequential", progress=False)
        report.save(out)
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "peak_rss_mib": peak_mib, "seconds": elapsed}))


def run(mode: str, path: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(out)], capture_output=True, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from dq_kit.analysis import QuantReport

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build(tmp / "model")
        checkpoint_mib = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors")) / 2**20
        runs = {mode: run(mode, tmp / "model", tmp / f"{mode}.json") for mode in ("baseline", "whole", "sequential")}
        whole, sequential = QuantReport.load(tmp / "whole.json"), QuantReport.load(tmp / "sequential.json")
    agreement = {}
    for column in COLUMNS:
        a, b = whole.table[column].astype(float), sequential.table[column].astype(float)
        agreement[column] = float(((a - b).abs() / a.abs().clip(lower=1e-30)).max())
    agreement["kl_uniform"] = abs(whole.meta["kl_uniform"] - sequential.meta["kl_uniform"]) / whole.meta["kl_uniform"]
    base = runs["baseline"]["peak_rss_mib"]
    result = {
        "model": {"architecture": "llama", **CONFIG, "parameters": params, "checkpoint_mib_fp32": round(checkpoint_mib, 1)},
        "calibration": {"samples": CALIBRATION, "scored_tokens": whole.meta["scored_tokens"]},
        "metrics": ["weight", "activation", "sensitivity (fisher)"],
        "peak_rss_mib": {mode: round(r["peak_rss_mib"], 1) for mode, r in runs.items()},
        "peak_rss_above_baseline_mib": {mode: round(runs[mode]["peak_rss_mib"] - base, 1) for mode in ("whole", "sequential")},
        "seconds": {mode: round(r["seconds"], 1) for mode, r in runs.items()},
        "max_relative_difference_sequential_vs_whole": agreement,
        "kl_uniform": {"whole": whole.meta["kl_uniform"], "sequential": sequential.meta["kl_uniform"]},
        "same_worst_10_by_sensitivity": whole.worst(10)["module"].tolist() == sequential.worst(10)["module"].tolist(),
        "machine": f"{os.cpu_count()} CPU cores, torch CPU, fp32",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sequential_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    above = result["peak_rss_above_baseline_mib"]
    lines = [
        "# Sequential vs whole-model analysis: peak memory",
        "",
        f"Model: llama architecture, {params / 1e6:.0f}M parameters ({CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, "
        f"vocab {CONFIG['vocab_size']}), random weights, fp32 safetensors checkpoint of {checkpoint_mib:.0f} MiB. "
        f"Calibration: {CALIBRATION} default text chats ({whole.meta['scored_tokens']} scored tokens). All metrics (weight, activation, Fisher sensitivity).",
        "",
        "| mode | peak RSS (MiB) | above import baseline (MiB) | time (s) |",
        "|---|---|---|---|",
        f"| baseline (imports + calibration only) | {base:.0f} | 0 | {runs['baseline']['seconds']:.1f} |",
        f"| whole model | {runs['whole']['peak_rss_mib']:.0f} | {above['whole']:.0f} | {runs['whole']['seconds']:.1f} |",
        f"| sequential | {runs['sequential']['peak_rss_mib']:.0f} | {above['sequential']:.0f} | {runs['sequential']['seconds']:.1f} |",
        "",
        "Largest relative difference between the two modes, per metric (same numbers up to float rounding):",
        "",
        *[f"- `{k}`: {v:.2e}" for k, v in agreement.items()],
        f"- same 10 worst modules by sensitivity: {result['same_worst_10_by_sensitivity']}",
        "",
    ]
    (RESULTS / "sequential_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
