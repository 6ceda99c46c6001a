"""Peak memory of sequential (block-at-a-time) vs whole-model analysis, and that both give the same numbers.

Builds two models locally (random weights, fp32 safetensors): a ~134M-parameter llama-architecture
language model, and a ~120M-parameter Llama 3.2 Vision (Mllama) layout with a vision tower, global
vision layers and four cross-attention layers, whose cross-attention gates are opened so that the
loss gradient reaches the vision tower. For each, ``dq.analyze`` runs with all metrics in a fresh
subprocess per mode and the peak resident memory (``ru_maxrss``) is recorded, against a baseline
process that only imports the stack and prepares the calibration set.
Writes ``benchmarks/results/sequential_memory.{json,md}``.

Run: ``.venv/bin/python benchmarks/sequential_memory.py`` (about 10 minutes on 2 CPU cores).
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
MLLAMA_TEXT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                   cross_attention_layers=[2, 5, 8, 11])
MLLAMA_VISION = dict(hidden_size=512, intermediate_size=2048, attention_heads=8, num_hidden_layers=8, num_global_layers=2,
                     intermediate_layers_indices=[3, 7], vision_output_dim=512 * 3, image_size=224, patch_size=14, max_num_tiles=4)
MODELS = ("llama", "mllama")
CALIBRATION = 8
COLUMNS = ("weight_error", "weight_rel_error", "act_local_error", "act_accum_error", "sensitivity")


def build(kind: str, path: Path) -> int:
    import torch
    import transformers

    import dq_kit as dq

    torch.manual_seed(0)
    processor = dq.tiny.tiny_processor(kind)
    if kind == "llama":
        ids = {k: v for k, v in dq.tiny._text_kwargs("llama").items() if k.endswith("token_id")}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, **ids))
    else:
        config = dq.tiny.tiny_config("mllama")
        config.text_config.update(MLLAMA_TEXT)
        config.vision_config.update(MLLAMA_VISION)
        model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(**config.to_dict()))
        with torch.no_grad():  # trained Llama 3.2 Vision has open cross-attention gates; random init has them closed
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(0.8)
        processor.image_processor.size = {"height": MLLAMA_VISION["image_size"], "width": MLLAMA_VISION["image_size"]}
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def child(mode: str, path: str, out: str) -> None:
    import dq_kit as dq
    from dq_kit.analysis import analyze
    from dq_kit.data.calibration import prepare_calibration
    from dq_kit.models.resolution import resolve_config
    from dq_kit.quant.loading import load_processor

    config = resolve_config(path)
    vision = getattr(config, "vision_config", None) is not None
    calibration = dq.calibration.default_calibration(n=CALIBRATION, images=vision)
    processor = load_processor(path, config)
    prepare_calibration(calibration, processor, config)  # warm: imports and processor
    model = None
    if mode == "whole":  # the whole-model analysis of a loaded model: what it adds beyond the model
        model, _ = dq.load(path, quant="16bit", processor=False)
        _ = [float(p.detach().sum()) for p in model.parameters()]  # page the checkpoint in first
    before_mib = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    if mode != "baseline":
        report = analyze(model if model is not None else path, processor, calibration, sequential=mode == "sequential", progress=False)
        report.save(out)
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "peak_rss_mib": peak_mib, "added_peak_mib": _status_mib("VmHWM") - before_mib, "seconds": elapsed}))


def _status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run(mode: str, path: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(out)], capture_output=True, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(kind: str) -> dict:
    from dq_kit.analysis import QuantReport

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build(kind, tmp / "model")
        checkpoint_mib = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors")) / 2**20
        runs = {mode: run(mode, tmp / "model", tmp / f"{mode}.json") for mode in ("baseline", "whole", "sequential")}
        whole, sequential = QuantReport.load(tmp / "whole.json"), QuantReport.load(tmp / "sequential.json")
    agreement = {}
    for column in COLUMNS:
        a, b = whole.table[column].astype(float), sequential.table[column].astype(float)
        agreement[column] = float(((a - b).abs() / a.abs().clip(lower=1e-30)).max())
    agreement["kl_uniform"] = abs(whole.meta["kl_uniform"] - sequential.meta["kl_uniform"]) / whole.meta["kl_uniform"]
    base = runs["baseline"]["peak_rss_mib"]
    towers = whole.table.groupby("tower")["numel"].sum().to_dict()
    return {
        "model": {"architecture": kind, **(CONFIG if kind == "llama" else {"text": MLLAMA_TEXT, "vision": MLLAMA_VISION}),
                  "parameters": params, "linear_parameters_by_tower": {k: int(v) for k, v in towers.items()},
                  "checkpoint_mib_fp32": round(checkpoint_mib, 1)},
        "calibration": {"samples": CALIBRATION, "images": kind != "llama", "scored_tokens": whole.meta["scored_tokens"]},
        "metrics": ["weight", "activation", "sensitivity (fisher)"],
        "peak_rss_mib": {mode: round(r["peak_rss_mib"], 1) for mode, r in runs.items()},
        "peak_rss_above_baseline_mib": {mode: round(runs[mode]["peak_rss_mib"] - base, 1) for mode in ("whole", "sequential")},
        "peak_added_by_analysis_mib": {mode: round(runs[mode]["added_peak_mib"], 1) for mode in ("whole", "sequential")},
        "seconds": {mode: round(r["seconds"], 1) for mode, r in runs.items()},
        "max_relative_difference_sequential_vs_whole": agreement,
        "kl_uniform": {"whole": whole.meta["kl_uniform"], "sequential": sequential.meta["kl_uniform"]},
        "same_worst_10_by_sensitivity": whole.worst(10)["module"].tolist() == sequential.worst(10)["module"].tolist(),
        "vision_modules_with_positive_sensitivity": int((sequential.table.loc[sequential.table["tower"] == "vision", "sensitivity"] > 0).sum()),
    }


def describe(result: dict) -> list[str]:
    model, runs, above = result["model"], result["peak_rss_mib"], result["peak_rss_above_baseline_mib"]
    added = result["peak_added_by_analysis_mib"]
    if model["architecture"] == "llama":
        title = (f"llama architecture, {model['parameters'] / 1e6:.0f}M parameters ({CONFIG['num_hidden_layers']} layers, hidden "
                 f"{CONFIG['hidden_size']}, vocab {CONFIG['vocab_size']})")
        data = f"{CALIBRATION} default text chats"
    else:
        title = (f"Llama 3.2 Vision (Mllama) layout, {model['parameters'] / 1e6:.0f}M parameters: vision tower "
                 f"{MLLAMA_VISION['num_hidden_layers']}+{MLLAMA_VISION['num_global_layers']} layers (hidden {MLLAMA_VISION['hidden_size']}, "
                 f"{MLLAMA_VISION['image_size']} px tiles, up to {MLLAMA_VISION['max_num_tiles']}), language model "
                 f"{MLLAMA_TEXT['num_hidden_layers']} layers with cross-attention at {MLLAMA_TEXT['cross_attention_layers']} "
                 "(gates opened to 0.8)")
        data = f"{CALIBRATION} default image chats"
    lines = [
        f"## {model['architecture']}",
        "",
        f"Model: {title}, random weights, fp32 safetensors checkpoint of {model['checkpoint_mib_fp32']:.0f} MiB. "
        f"Linear parameters by tower: {model['linear_parameters_by_tower']}. "
        f"Calibration: {data} ({result['calibration']['scored_tokens']} scored tokens). All metrics (weight, activation, Fisher sensitivity).",
        "",
        "| mode | peak RSS (MiB) | above import baseline (MiB) | peak added by the analysis (MiB) | time (s) |",
        "|---|---|---|---|---|",
        f"| baseline (imports + calibration only) | {runs['baseline']:.0f} | 0 | 0 | {result['seconds']['baseline']:.1f} |",
        f"| whole model (loaded before) | {runs['whole']:.0f} | {above['whole']:.0f} | {added['whole']:.0f} "
        f"({added['whole'] / model['checkpoint_mib_fp32']:.2f}x the weights) | {result['seconds']['whole']:.1f} |",
        f"| sequential | {runs['sequential']:.0f} | {above['sequential']:.0f} | {added['sequential']:.0f} | {result['seconds']['sequential']:.1f} |",
        "",
        "\"Peak added by the analysis\" is the process's peak RSS while `dq.analyze` runs (the kernel's VmHWM, reset just "
        "before) minus its RSS just before: it is not hidden by the higher transient peak of importing the stack. The "
        "whole-model analysis runs on a model loaded (and paged in) before, so its figure is what the analysis adds "
        "beyond the model; the sequential one starts from nothing. Default glibc allocator (freed blocks are kept for "
        "reuse, so RSS is above the live tensors; see `memory_model.md`).",
        "",
        "Largest relative difference between the two modes, per metric (same numbers up to float rounding):",
        "",
        *[f"- `{k}`: {v:.2e}" for k, v in result["max_relative_difference_sequential_vs_whole"].items()],
        f"- same 10 worst modules by sensitivity: {result['same_worst_10_by_sensitivity']}",
    ]
    if model["architecture"] != "llama":
        lines.append(f"- vision-tower modules with a positive sensitivity (gradient reached them): {result['vision_modules_with_positive_sensitivity']}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"))
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    results = {kind: measure(kind) for kind in args.models.split(",")}
    payload = {"machine": f"{os.cpu_count()} CPU cores, torch CPU, fp32", "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sequential_memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Sequential vs whole-model analysis: peak memory", "", f"Machine: {payload['machine']}.", ""]
    for result in results.values():
        lines += describe(result)
    (RESULTS / "sequential_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
