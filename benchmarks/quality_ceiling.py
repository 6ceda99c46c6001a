"""How much of the NF4 KL gap can *any* choice of 16-bit modules close? An oracle upper bound.

The quality benchmark (``quality.py``) scores dq_kit's plan on held-out samples. This benchmark asks
what the best possible module-level plan would reach on the same held-out samples, by cheating:
it chooses the modules *on the held-out set itself*. To make the hundreds of measurements affordable,
every quantized weight is its exact bitsandbytes NF4 round trip (dequantized, so switching a module
is a pointer swap); the uniform-NF4 KL is also measured with real bitsandbytes layers for comparison.

* **oracle gain, knapsack** -- for every module, the measured held-out KL drop when that one module
  goes back to 16-bit while every other module stays NF4 (its gain in the context of the all-NF4
  model), then the same exact knapsack ``dq.plan`` uses, on those gains;
* **oracle greedy** -- lazy greedy on measured held-out KL: the module with the best stale
  gain per byte is re-measured in the current plan's context and taken if it still leads.

Both use the evaluation data for the choice, so no honest plan computed from calibration data can be
expected to beat them by more than noise: they bound what module-level choices can do on this model.
Run ``benchmarks/prepare_models.py`` and ``benchmarks/quality.py`` first (the dq.analyze report is
reused from ``.cache/reports/``). Writes ``results/quality_ceiling.{json,md}``.

Run: ``.venv/bin/python benchmarks/quality_ceiling.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from quality import CACHE, LOADERS, RESULTS, HeldOut, Switchable

import dq_kit as dq
from dq_kit.analysis import QuantReport
from dq_kit.analysis.activations import quantize_roundtrip, swapped
from dq_kit.analysis.sensitivity import spearman


class FakeQuant:
    """The model with every quantizable weight replaced by its exact bitsandbytes NF4 round trip (fast to switch)."""

    def __init__(self, model, report: QuantReport) -> None:
        self.model = model
        self.dequantized = {name: quantize_roundtrip(model.get_submodule(name).weight.detach()) for name in report.table["module"]}

    @contextlib.contextmanager
    def with_plan(self, plan: dq.Plan) -> Iterator[Any]:
        with swapped(self.model, {n: w for n, w in self.dequantized.items() if n not in plan.keep}):
            yield self.model


BUDGETS = (0.05, 0.10, 0.20)


def leave_one_in_gains(report: QuantReport, switch: FakeQuant, heldout: HeldOut, kl_nf4: float) -> dict[str, float]:
    """Held-out KL drop of putting each module alone back to 16-bit (all others NF4)."""
    base = dq.plan(report, 0.0)
    gains = {}
    names = list(report.table["module"])
    for index, name in enumerate(names):
        with switch.with_plan(base.with_modules(keep=[name])) as model:
            gains[name] = kl_nf4 - heldout.evaluate(model)["kl"]
        if index % 10 == 0:
            print(f"  leave-one-in {index + 1}/{len(names)}: {name} gain {gains[name]:.5f}", flush=True)
    return gains


def lazy_greedy(report: QuantReport, gains: dict[str, float], budget: float, switch: FakeQuant, heldout: HeldOut,
                kl_nf4: float, max_evaluations: int) -> tuple[dq.Plan, int, bool]:
    """Greedy on measured held-out KL, re-measuring the leading candidate in context (lazy evaluation)."""
    rows = report.table.set_index("module")
    cost = {name: int(rows.at[name, "bytes_16bit"] - rows.at[name, "bytes_nf4"]) for name in rows.index}
    room = int(budget * report.meta["bytes_4bit"])
    stale = dict(gains)
    base = dq.plan(report, 0.0)
    keep: list[str] = []
    current = kl_nf4
    evaluations = 0
    complete = False
    while evaluations < max_evaluations:
        fitting = sorted((n for n in stale if cost[n] <= room and stale[n] > 0), key=lambda n: stale[n] / cost[n], reverse=True)
        if not fitting:
            complete = True  # nothing that still helps fits the budget
            break
        leader = fitting[0]
        with switch.with_plan(base.with_modules(keep=keep + [leader])) as model:
            kl = heldout.evaluate(model)["kl"]
        evaluations += 1
        stale[leader] = current - kl
        runner_up = stale[fitting[1]] / cost[fitting[1]] if len(fitting) > 1 else float("-inf")
        if stale[leader] > 0 and stale[leader] / cost[leader] >= runner_up:
            keep.append(leader)
            room -= cost[leader]
            current = kl
            del stale[leader]
    return base.with_modules(keep=keep), evaluations, complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(LOADERS))
    parser.add_argument("--max-evaluations", type=int, default=150, help="held-out evaluations per greedy budget")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="knapsack budgets, comma-separated")
    parser.add_argument("--greedy-budgets", default="0.05,0.1", help="budgets for the (slow) oracle greedy")
    parser.add_argument("--gains-from", type=Path, help="reuse the single-module gains of an earlier quality_ceiling.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-json", action="store_true", help="only re-render quality_ceiling.md from quality_ceiling.json")
    args = parser.parse_args()
    if args.from_json:
        payload = json.loads((RESULTS / "quality_ceiling.json").read_text())
        (RESULTS / "quality_ceiling.md").write_text(markdown(payload))
        print(markdown(payload))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = LOADERS[args.model](False)
    model, processor = spec["model"], spec["processor"]
    cached = CACHE / f"report-{spec['name']}-{len(spec['calibration'])}.json"
    if not cached.is_file():
        raise SystemExit(f"{cached} is missing: run benchmarks/quality.py first.")
    report = QuantReport.load(cached)
    heldout = HeldOut(model, spec["heldout"], processor)
    uniform = dq.plan(report, 0.0)
    with Switchable(model).with_plan(uniform) as quantized:
        kl_real = heldout.evaluate(quantized)["kl"]
    switch = FakeQuant(model, report)
    with switch.with_plan(uniform) as quantized:
        kl_nf4 = heldout.evaluate(quantized)["kl"]
    print(f"held-out KL uniform NF4 {kl_nf4:.4f} (real bitsandbytes layers: {kl_real:.4f})", flush=True)
    tick = time.perf_counter()
    if args.gains_from:
        earlier = json.loads(args.gains_from.read_text())
        gains, gains_s = earlier["gains"], earlier["timing_s"]["leave_one_in"]
    else:
        gains = leave_one_in_gains(report, switch, heldout, kl_nf4)
        gains_s = time.perf_counter() - tick
    report.table["oracle_gain"] = report.table["module"].map(gains)
    points: list[dict[str, Any]] = []

    def measure(label: str, budget: float, plan: dq.Plan, **extra: Any) -> None:
        with switch.with_plan(plan) as quantized:
            result = heldout.evaluate(quantized)
        footprint = dq.estimate_memory(model, plan).plan_overhead
        point = {"strategy": label, "budget": budget, "footprint": footprint, "kept": len(plan.keep),
                 "gap_closed": (kl_nf4 - result["kl"]) / kl_nf4, **result, **extra}
        points.append(point)
        print(json.dumps(point), flush=True)

    for budget in map(float, args.budgets.split(",")):
        measure("dq_kit plan (Fisher)", budget, dq.plan(report, budget, fuse=False))
        measure("oracle gain, knapsack", budget, dq.plan(report, budget, score="oracle_gain", fuse=False))
    greedy_s = {}
    for budget in map(float, args.greedy_budgets.split(",")):
        tick = time.perf_counter()
        plan, evaluations, complete = lazy_greedy(report, gains, budget, switch, heldout, kl_nf4, args.max_evaluations)
        greedy_s[budget] = round(time.perf_counter() - tick, 1)
        measure("oracle greedy" if complete else "oracle greedy (stopped at the evaluation cap)", budget, plan, evaluations=evaluations)
    positive = sorted(gains.values(), reverse=True)
    fisher = report.table.set_index("module")["sensitivity"]
    payload = {
        "model": spec["name"],
        "title": spec["title"],
        "heldout_samples": len(heldout.samples),
        "heldout_tokens": heldout.tokens,
        "kl_nf4": kl_nf4,
        "kl_nf4_real_bitsandbytes": kl_real,
        "sum_of_gains": sum(gains.values()),
        "top_gains": positive[:10],
        "negative_gains": sum(1 for g in gains.values() if g < 0),
        "spearman_fisher_vs_gain": spearman([fisher[n] for n in gains], list(gains.values())),
        "points": points,
        "gains": gains,
        "timing_s": {"leave_one_in": round(gains_s, 1), "greedy": greedy_s, "total": round(time.perf_counter() - started, 1)},
        "threads": args.threads,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_ceiling.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "quality_ceiling.md").write_text(markdown(payload))
    print(markdown(payload))


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"# Quality ceiling: the best module-level plan, chosen on the held-out set itself ({payload['title']})",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Held-out: {payload['heldout_samples']} samples, {payload['heldout_tokens']} scored tokens; KL uniform NF4 "
        f"{payload['kl_nf4']:.4f} with the dequantized NF4 weights used for every point here "
        f"({payload['kl_nf4_real_bitsandbytes']:.4f} with real bitsandbytes layers). Sum of the single-module gains: {payload['sum_of_gains']:.4f} "
        f"({payload['sum_of_gains'] / payload['kl_nf4']:.0%} of the gap); the ten largest: "
        + ", ".join(f"{g:.4f}" for g in payload["top_gains"]) + ".",
        "",
        "| budget | strategy | footprint | held-out KL (± SE) | gap closed | top-1 | modules |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(payload["points"], key=lambda p: (p["budget"], p["strategy"])):
        lines.append(
            f"| +{p['budget']:.0%} | {p['strategy']} | +{p['footprint']:.1%} | {p['kl']:.4f} ± {p['kl_se']:.4f} "
            f"| {p['gap_closed']:.1%} | {p['top1']:.1%} | {p['kept']} |"
        )
    best = {}
    for p in payload["points"]:
        if p["strategy"].startswith("oracle"):
            best[p["budget"]] = max(best.get(p["budget"], float("-inf")), p["gap_closed"])
    ours = {p["budget"]: p["gap_closed"] for p in payload["points"] if p["strategy"] == "dq_kit plan (Fisher)"}
    lines += [
        "",
        (
            "Spearman rank correlation of the Fisher sensitivity (calibration chats) with the single-module held-out gains: "
            f"{payload['spearman_fisher_vs_gain']:.2f} ({payload['negative_gains']} of the {len(payload['gains'])} gains are "
            "negative: restoring those modules alone makes held-out KL slightly worse)."
        ),
        "",
        "dq_kit's plan against the best oracle, gap closed: "
        + ", ".join(f"+{b:.0%}: {ours[b]:.1%} vs {best[b]:.1%}" for b in sorted(best) if b in ours) + ".",
        "",
        f"Timing (s, {payload['threads']} torch thread(s), 2 shared CPU cores): {payload['timing_s']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
