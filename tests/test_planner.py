import itertools
import random

import pandas as pd
import pytest

import dq_kit as dq
from dq_kit.analysis.report import QuantReport
from dq_kit.planning import plan, predicted_kl
from dq_kit.quant.footprint import nf4_weight_bytes


def synthetic_report(sizes, scores, names=None, model_type="llama", family="causal_lm", nf4_total=None):
    names = names or [f"model.layers.{i}.mlp.down_proj" for i in range(len(sizes))]
    table = pd.DataFrame(
        {
            "module": names,
            "tower": "language",
            "group": "language_mlp",
            "layer": pd.array(range(len(names)), dtype="Int64"),
            "numel": sizes,
            "bytes_16bit": [2 * n for n in sizes],
            "bytes_nf4": [nf4_weight_bytes(n) for n in sizes],
            "sensitivity": scores,
        }
    )
    meta = {
        "model_type": model_type,
        "family": family,
        "output_heads": ["lm_head"],
        "kl_uniform": float(sum(scores)),
        "bytes_4bit": nf4_total or int(table.bytes_nf4.sum()) + 10_000,
    }
    return QuantReport(table, meta=meta)


def cost(report, names):
    t = report.table.set_index("module")
    return int(sum(t.at[n, "bytes_16bit"] - t.at[n, "bytes_nf4"] for n in names))


def best_by_brute_force(report, capacity):
    t = report.table
    best = 0.0
    for r in range(len(t) + 1):
        for combo in itertools.combinations(range(len(t)), r):
            names = [t.module[i] for i in combo]
            if cost(report, names) <= capacity:
                best = max(best, float(t.sensitivity.iloc[list(combo)].sum()))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    sizes = [64 * rng.choice([1, 2, 4, 16, 64, 100]) * 64 for _ in range(9)]
    scores = [rng.random() for _ in sizes]
    report = synthetic_report(sizes, scores)
    capacity = int(report.meta["bytes_4bit"] * 0.3)
    chosen = plan(report, budget_bytes=capacity, fuse=False)
    assert cost(report, chosen.keep) <= capacity
    value = float(report.table.set_index("module").loc[list(chosen.keep), "sensitivity"].sum())
    assert value == pytest.approx(best_by_brute_force(report, capacity), rel=0.02)


def test_knapsack_beats_greedy_ratio_on_a_classic_counter_example():
    # greedy by score/byte takes the small item first and then cannot afford the big one
    sizes = [64 * 64, 64 * 64 * 10]
    scores = [0.011, 0.1]
    report = synthetic_report(sizes, scores)
    capacity = cost(report, [report.table.module[1]])
    chosen = plan(report, budget_bytes=capacity, fuse=False)
    assert chosen.keep == (report.table.module[1],)


def test_budget_fraction_respects_total_footprint_and_records_reasons():
    sizes = [64 * 64 * k for k in (1, 2, 3, 4, 5, 6)]
    report = synthetic_report(sizes, [0.1, 0.5, 0.2, 0.05, 0.3, 0.4], nf4_total=10**6)
    for budget in (0.0, 0.05, 0.1, 0.3):
        chosen = plan(report, budget=budget)
        assert cost(report, chosen.keep) <= budget * report.meta["bytes_4bit"]
        assert chosen.fixed == ("lm_head",) and chosen.source == "budget"
        for name in chosen.keep:
            assert chosen.reasons[name]["rule"] == "budget" and chosen.reasons[name]["rank"] >= 1
    assert plan(report, budget=0.0).keep == ()
    assert predicted_kl(report, plan(report, budget=0.3)) < report.meta["kl_uniform"]


def test_fused_projections_share_one_decision():
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    sizes = [64 * 64] * 6
    report = synthetic_report(sizes, [0.5, 0.0, 0.0, 0.01, 0.3, 0.0], names=names, nf4_total=10**6)
    chosen = plan(report, top_k=1, fuse=True)
    assert set(chosen.keep) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    unfused = plan(report, top_k=1)
    assert unfused.keep == ("model.layers.0.self_attn.q_proj",)


def test_threshold_and_top_k():
    report = synthetic_report([64 * 64] * 4, [0.4, 0.1, 0.3, 0.2])
    assert set(plan(report, threshold=0.25).keep) == set(report.table.module[[0, 2]])
    assert plan(report, top_k=2).keep == tuple(sorted(report.table.module[[0, 2]]))
    with pytest.raises(dq.PlanError, match="at most one"):
        plan(report, threshold=0.1, top_k=2)


def test_overrides():
    report = synthetic_report([64 * 64] * 4, [0.4, 0.1, 0.3, 0.2])
    names = report.table.module.tolist()
    chosen = plan(report, budget=10.0, quantize=[names[0]], keep=[names[1]])
    assert names[0] not in chosen.keep and names[1] in chosen.keep
    assert chosen.reasons[names[1]] == {"rule": "keep"}
    regex = plan(report, budget=10.0, keep=[r"model\.layers\.[23]\..*"], quantize=names[:2])
    assert set(regex.keep) == set(names[2:])
    with pytest.raises(dq.PlanError, match="matches no module"):
        plan(report, keep=["model.layers.9.mlp.down_proj"])
    with pytest.raises(dq.PlanError, match="both in keep= and quantize="):
        plan(report, keep=[names[0]], quantize=[names[0]])


def test_bad_budgets():
    report = synthetic_report([64 * 64 * 64] * 2, [0.4, 0.1], nf4_total=10**7)
    with pytest.raises(dq.PlanError, match=">= 0"):
        plan(report, budget=-0.1)
    with pytest.raises(dq.PlanError, match="too small for any module"):
        plan(report, budget=0.001)
    with pytest.raises(dq.PlanError, match="more than the budget"):
        plan(report, budget=0.001, keep=[report.table.module[0]])
    with pytest.raises(dq.PlanError, match="no 'nope' column"):
        plan(report, score="nope")


def test_preset_start_for_mllama_names():
    names = [
        "model.language_model.layers.1.cross_attn.o_proj",
        "model.language_model.layers.3.cross_attn.o_proj",
        "model.language_model.layers.2.mlp.down_proj",
    ]
    report = synthetic_report([64 * 64] * 3, [0.0, 0.0, 0.5], names=names, model_type="mllama", family="mllama", nf4_total=10**6)
    report.table["group"] = ["cross_attention", "cross_attention", "language_mlp"]
    report.table["layer"] = pd.array([1, 3, 2], dtype="Int64")
    chosen = plan(report, budget=0.5, preset=True)
    assert "model.language_model.layers.3.cross_attn.o_proj" in chosen.keep
    assert "model.language_model.layers.1.cross_attn.o_proj" not in chosen.keep
    assert "model.language_model.layers.2.mlp.down_proj" in chosen.keep
    assert chosen.reasons["model.language_model.layers.3.cross_attn.o_proj"]["rule"] == "preset:mllama"
