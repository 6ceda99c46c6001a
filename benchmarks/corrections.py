"""Error-correcting adapters benchmark: held-out KL gap closed per byte by three per-module menus.

For each model, ``dq.analyze(..., corrections=True)`` on the calibration set, then ``dq.plan`` at
+2.5 / 5 / 10 / 20% over the all-NF4 footprint with

* **keep only** (``menu="keep"``): NF4 or 16-bit per module (dq.plan before corrections);
* **corrections only** (``menu="corrections"``): NF4 or NF4 + activation-weighted rank-r correction;
* **full menu** (``menu="full"``, the default with corrections): NF4, NF4 + rank-r or 16-bit.

Every plan is applied for real: ``dq.quantize(copy_of_16bit_model, plan, report=report)`` (bitsandbytes
NF4 + the frozen PEFT ``dq_correction`` adapter), and scored on held-out samples never used for
calibration: mean per-token KL(16-bit || quantized) of the next-token distribution on answer tokens;
gap closed = (KL_NF4 - KL) / KL_NF4. Footprint = ``dq.estimate_memory`` (NF4 modules + kept modules
+ correction factors at 2 bytes per parameter). Analysis time and the peak memory it adds (VmHWM of
this process, reset before each run) are measured with and without corrections.

Same models and data as ``quality.py`` (run ``benchmarks/prepare_models.py`` first). Writes
``results/corrections.{json,md}`` and the "Error-correcting adapters" section of ``results/quality.md``.

Run: ``.venv/bin/python benchmarks/corrections.py`` (``--models smollm2-135m`` for one model).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from quality import LOADERS, HeldOut  # noqa: E402

import dq_kit as dq  # noqa: E402
from dq_kit.quant.footprint import correction_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BUDGETS = (0.025, 0.05, 0.10, 0.20)
MENUS = {"keep only": "keep", "corrections only": "corrections", "full menu": "full"}
CALIBRATION = 32  # the protocol of the reference numbers: 32 calibration / 32 held-out texts
SECTION_START = "<!-- corrections: start -->"
SECTION_END = "<!-- corrections: end -->"


def peak_rss() -> int:
    """VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def analysis_cost(name: str, corrections: bool) -> dict[str, float]:
    """Seconds and added peak memory of ``dq.analyze`` in a fresh process (so that neither run inherits the other's heap)."""
    command = [sys.executable, __file__, "--measure-analysis", name, *(["--corrections"] if corrections else [])]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_analysis(name: str, corrections: bool) -> dict[str, float]:
    """In this process: load the model and its calibration set, then time ``dq.analyze`` and the peak it adds."""
    spec = LOADERS[name](False)
    reset_peak()
    before = current_rss()
    started = time.perf_counter()
    report = dq.analyze(spec["model"], spec["processor"], spec["calibration"][:CALIBRATION], metrics=("weight", "sensitivity"),
                        corrections=corrections, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_added_bytes": peak_rss() - before,
            "corrections_s": float(report.meta["timing"].get("corrections_s", 0.0))}


def run_model(spec: dict[str, Any]) -> dict[str, Any]:
    model, processor = spec["model"], spec["processor"]
    calibration = spec["calibration"][:CALIBRATION]
    plain = analysis_cost(spec["name"], corrections=False)
    corrected = analysis_cost(spec["name"], corrections=True)
    report = dq.analyze(model, processor, calibration, metrics=("weight", "sensitivity"), corrections=True, progress=False)
    heldout = HeldOut(model, spec["heldout"], processor)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def measure(plan: dq.Plan) -> dict[str, Any]:
        quantized = dq.quantize(copy.deepcopy(model), plan, report=report).eval()
        result = heldout.evaluate(quantized)
        del quantized
        estimate = dq.estimate_memory(model, plan)
        return {**result, "footprint": estimate.plan_overhead, "kept": len(plan.keep), "corrected": len(plan.corrections),
                "correction_bytes": estimate.correction_bytes, "ranks": sorted(set(plan.corrections.values())),
                "predicted_kl": dq.predicted_kl(report, plan)}

    nf4 = measure(dq.Plan.uniform(model))
    points = [{"menu": "uniform NF4", "budget": 0.0, **nf4}]
    for budget in BUDGETS:
        for label, menu in MENUS.items():
            plan = dq.plan(report, budget=budget, menu=menu)
            points.append({"menu": label, "budget": budget, **measure(plan)})
    for point in points:
        point["gap_closed"] = (nf4["kl"] - point["kl"]) / nf4["kl"] if nf4["kl"] > 0 else float("nan")
    return {
        "model": spec["name"],
        "title": spec["title"],
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes,
        "calibration_samples": len(calibration),
        "heldout_samples": len(spec["heldout"]),
        "heldout_tokens": heldout.tokens,
        "ranks": report.meta.get("correction_ranks"),
        "kl_nf4": nf4["kl"],
        "analysis": {
            "without_corrections_s": round(plain["seconds"], 1),
            "with_corrections_s": round(corrected["seconds"], 1),
            "without_corrections_peak_added_bytes": plain["peak_added_bytes"],
            "with_corrections_peak_added_bytes": corrected["peak_added_bytes"],
            "corrections_s": round(corrected["corrections_s"], 1),
        },
        "points": points,
    }


def moment_peaks() -> list[dict[str, Any]]:
    """The largest second-moment matrix (the extra peak of fitting one module) of big models, from their shipped configs."""
    rows = []
    for name in ("Qwen/Qwen2-VL-2B-Instruct", "meta-llama/Llama-3.2-11B-Vision-Instruct"):
        skeleton = dq.modeling.meta_model(dq.modeling.resolve_config(name, prefer_shipped=True))
        widths = sorted({info.in_features for info in dq.registry.linear_modules(skeleton)})
        widest = widths[-1]
        factors = max(correction_bytes(64, info.in_features, info.out_features) for info in dq.registry.linear_modules(skeleton))
        rows.append({"model": name, "widest_input": widest, "moment_bytes": 4 * widest**2,
                     "moment_group_cap_bytes": 2**30, "largest_factor_bytes_r64": factors})
    return rows


def write_markdown(results: list[dict[str, Any]], peaks: list[dict[str, Any]], seconds: float) -> str:
    lines = [
        "## Error-correcting adapters (NF4 + activation-weighted low-rank corrections)",
        "",
        "`benchmarks/corrections.py`. Per-module menus at the same bytes: **keep only** = NF4 or 16-bit (`dq.plan(report, "
        "menu=\"keep\")`); **corrections only** = NF4 or NF4 + rank-r correction (`menu=\"corrections\"`); **full menu** = NF4, "
        "NF4 + rank-r or 16-bit (`menu=\"full\"`, the default for a report with corrections). Each plan is applied with "
        "`dq.quantize(copy, plan, report=report)` (real bitsandbytes NF4 + the frozen PEFT `dq_correction` adapter) and scored on "
        "held-out samples; footprint = NF4 modules + kept modules + correction factors at 2 bytes per parameter "
        "(`dq.estimate_memory`).",
        "",
    ]
    for result in results:
        analysis = result["analysis"]
        lines += [
            f"### {result['title']}",
            "",
            f"{result['params'] / 1e6:.1f} M parameters; calibration {result['calibration_samples']} samples, held-out "
            f"{result['heldout_samples']} samples / {result['heldout_tokens']} scored tokens; ranks {result['ranks']}. "
            f"KL uniform NF4 = {result['kl_nf4']:.4g} (held-out).",
            "",
            "| budget | menu | footprint | held-out KL (± SE) | gap closed | top-1 | 16-bit | corrected (ranks) | predicted KL |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in result["points"]:
            budget = "0" if not p["budget"] else f"+{p['budget']:.1%}"
            ranks = f"{p['corrected']} ({', '.join(map(str, p['ranks']))})" if p["corrected"] else "0"
            lines.append(
                f"| {budget} | {p['menu']} | +{p['footprint']:.1%} | {p['kl']:.4g} ± {p['kl_se']:.2g} | {p['gap_closed']:.1%} | "
                f"{p['top1']:.1%} | {p['kept']} | {ranks} | {p['predicted_kl']:.4g} |"
            )
        lines += [
            "",
            f"Analysis ({result['calibration_samples']} samples, weight + sensitivity): {analysis['without_corrections_s']} s without "
            f"corrections, {analysis['with_corrections_s']} s with (fitting: {analysis['corrections_s']} s); peak memory added "
            f"{analysis['without_corrections_peak_added_bytes'] / 2**20:.0f} MiB without, "
            f"{analysis['with_corrections_peak_added_bytes'] / 2**20:.0f} MiB with (model weights "
            f"{result['weight_bytes'] / 2**20:.0f} MiB; each analysis in a fresh process, VmHWM over the RSS before it).",
            "",
        ]
    lines += [
        "Extra peak of fitting on large models (from the shipped configs): second moments are collected for groups of modules "
        "of at most 1 GiB at a time (whole model) or one decoder layer at a time (sequential), so the extra peak is about one "
        "group, plus the factors kept for the report:",
        "",
        "| model | widest Linear input | its second moment (fp32) | largest rank-64 factors (bf16) |",
        "|---|---|---|---|",
        *[f"| {r['model']} | {r['widest_input']} | {r['moment_bytes'] / 2**20:.0f} MiB | {r['largest_factor_bytes_r64'] / 2**20:.1f} MiB |"
          for r in peaks],
        "",
        f"Total run time {seconds:.0f} s on {torch.get_num_threads()} thread(s).",
    ]
    return "\n".join(lines)


def update_quality_md(section: str) -> None:
    """Put ``section`` between the markers in ``results/quality.md`` (appended the first time)."""
    path = RESULTS / "quality.md"
    text = path.read_text() if path.is_file() else ""
    block = f"{SECTION_START}\n{section}\n{SECTION_END}"
    if SECTION_START in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + block + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    dq.files.atomic_write_text(path, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(LOADERS), help=f"comma-separated subset of {list(LOADERS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--from-json", action="store_true", help="only re-render the markdown from corrections.json")
    parser.add_argument("--measure-analysis", help=argparse.SUPPRESS)  # internal: one analysis in a fresh process
    parser.add_argument("--corrections", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_analysis:
        print(json.dumps(measure_analysis(args.measure_analysis, args.corrections)))
        return
    started = time.perf_counter()
    json_path = RESULTS / "corrections.json"
    if args.from_json:
        payload = json.loads(json_path.read_text())
    else:
        previous = {r["model"]: r for r in json.loads(json_path.read_text())["results"]} if json_path.is_file() else {}
        for name in args.models.split(","):
            print(f"== {name}", flush=True)
            previous[name] = run_model(LOADERS[name](False))
            payload = {"results": [previous[n] for n in LOADERS if n in previous], "moment_peaks": moment_peaks(),
                       "seconds": time.perf_counter() - started}
            dq.files.write_json(json_path, payload)
    section = write_markdown(payload["results"], payload["moment_peaks"], payload["seconds"])
    dq.files.atomic_write_text(RESULTS / "corrections.md", "# Error-correcting adapters benchmark\n\n" + section + "\n")
    update_quality_md(section)
    print(section)


if __name__ == "__main__":
    main()
