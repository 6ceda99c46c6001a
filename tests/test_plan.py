import json

import pytest
from transformers.quantizers.quantizers_utils import should_convert_module

import dq_kit as dq
from dq_kit.models import registry


@pytest.fixture(scope="module")
def qwen():
    return dq.tiny.build_tiny_model("qwen2_vl")


def vision_names(model):
    return sorted(i.name for i in registry.linear_modules(model) if i.tower == "vision")


def test_json_round_trip(tmp_path, qwen):
    plan = dq.Plan.preset(qwen)
    path = plan.save(tmp_path / "sub" / "plan.json")
    loaded = dq.Plan.load(path)
    assert loaded == plan
    assert loaded.keep and loaded.fixed == ("lm_head",)
    data = json.loads(path.read_text())
    assert data["format"] == "dq_kit.plan" and data["model_type"] == "qwen2_vl"
    assert not list(tmp_path.glob("sub/.*tmp")), "atomic write left a temporary file"


def test_bnb_config_lists_exact_names(qwen):
    plan = dq.Plan.preset(qwen)
    config = plan.bnb_config()
    assert config.llm_int8_skip_modules == plan.skip_modules
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert all(name in {i.name for i in registry.linear_modules(qwen)} for name in config.llm_int8_skip_modules)


def test_transformers5_no_longer_matches_substrings(qwen):
    """The reason Plan.from_patterns exists: 'visual' stopped skipping the vision tower."""
    assert should_convert_module("model.visual.blocks.0.attn.qkv", ["visual"]) is True


def test_legacy_substring_pattern_expands_to_exact_names_with_a_warning(qwen):
    with pytest.warns(UserWarning, match="substrings"):
        plan = dq.Plan.from_patterns(qwen, ["visual", "lm_head"])
    assert list(plan.keep) == sorted(i.name for i in registry.linear_modules(qwen) if "visual" in i.name)
    assert set(vision_names(qwen)) < set(plan.keep)  # the vision tower and the merger
    assert plan.fixed == ("lm_head",)
    for name in plan.keep:  # the exact names do skip under transformers 5 rules
        assert should_convert_module(name, plan.skip_modules) is False


def test_regex_and_suffix_patterns(qwen):
    plan = dq.Plan.from_patterns(qwen, [r"model\.language_model\.layers\.1\..*proj", "mlp.fc2"])
    assert "model.language_model.layers.1.mlp.down_proj" in plan.keep
    assert "model.language_model.layers.0.mlp.down_proj" not in plan.keep
    assert {n for n in plan.keep if n.endswith("fc2")} == {n for n in vision_names(qwen) if n.endswith("fc2")}


def test_pattern_matching_nothing_is_an_error_with_a_suggestion(qwen):
    with pytest.raises(dq.PlanError, match=r"model\.visual\.merger\.mlp\.2") as err:
        dq.Plan.from_patterns(qwen, ["model.visual.merger.mlp.3"])
    assert "did you mean" in str(err.value)


def test_plan_naming_absent_module_fails_check(qwen):
    plan = dq.Plan(keep=("model.language_model.layers.9.mlp.down_proj",), model_type="qwen2_vl")
    with pytest.raises(dq.PlanError, match="layers.9.mlp.down_proj"):
        plan.check(qwen)


def test_plan_for_another_architecture_fails_check(qwen):
    plan = dq.Plan.preset(dq.tiny.build_tiny_model("llama"))
    with pytest.raises(dq.PlanError, match="made for a 'llama' model"):
        plan.check(qwen)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"format": "dq_kit.plan", "keep": ["a", ', "not valid JSON"),
        ("[1, 2, 3]", "Not a dq_kit plan"),
        ('{"keep": ["x"]}', "Not a dq_kit plan"),
        ('{"format": "dq_kit.plan", "version": 99}', "newer"),
        ('{"format": "dq_kit.plan", "quant_type": "int3"}', "quant_type"),
        ('{"format": "dq_kit.plan", "keep": [""]}', "non-empty"),
    ],
)
def test_corrupt_plan_files(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(dq.PlanError, match=match):
        dq.Plan.load(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(dq.PlanError, match="not found"):
        dq.Plan.load(tmp_path / "nope.json")


def test_with_modules_adds_and_removes(qwen):
    plan = dq.Plan.uniform(qwen).with_modules(keep=["model.visual.blocks.0.mlp.fc1"])
    assert plan.keep == ("model.visual.blocks.0.mlp.fc1",)
    assert plan.reasons["model.visual.blocks.0.mlp.fc1"] == {"rule": "manual"}
    assert plan.with_modules(quantize=["model.visual.blocks.0.mlp.fc1"]).keep == ()


def test_plans_from_hub_ids_use_shipped_configs():
    plan = dq.Plan.preset("meta-llama/Llama-3.2-11B-Vision-Instruct")
    assert len(plan.keep) == 7  # 8 cross-attention layers, all but the first keep o_proj
    assert all(name.endswith("cross_attn.o_proj") for name in plan.keep)
