import warnings

import pytest

import dq_kit as dq
from dq_kit.models import registry


def groups(model):
    counts: dict[str, int] = {}
    for info in registry.linear_modules(model):
        counts[info.group] = counts.get(info.group, 0) + 1
    return counts


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.visual.blocks.0.attn.qkv", ("vision", "vision_attention")),
        ("model.visual.blocks.0.mlp.fc2", ("vision", "vision_mlp")),
        ("model.visual.merger.mlp.0", ("projector", "projector")),
        ("model.multi_modal_projector.linear_1", ("projector", "projector")),
        ("model.vision_tower.transformer.layers.3.attention.o_proj", ("vision", "vision_attention")),
        ("model.vision_tower.transformer.layers.3.feed_forward.down_proj", ("vision", "vision_mlp")),
        ("model.vision_model.global_transformer.layers.0.mlp.fc1", ("vision", "vision_mlp")),
        ("model.language_model.layers.3.cross_attn.o_proj", ("language", "cross_attention")),
        ("model.language_model.layers.2.self_attn.q_proj", ("language", "language_attention")),
        ("model.layers.0.mlp.down_proj", ("language", "language_mlp")),
        ("lm_head", ("head", "lm_head")),
    ],
)
def test_classify(name, expected):
    assert registry.classify(name) == expected


def test_groups_of_every_family_cover_every_linear():
    for family in dq.tiny.FAMILIES:
        model = dq.tiny.build_tiny_model(family)
        infos = registry.linear_modules(model)
        assert {i.group for i in infos} <= set(registry.GROUPS)
        assert sum(groups(model).values()) == len(infos) > 0
        assert groups(model)["lm_head"] == 1
    assert groups(dq.tiny.build_tiny_model("qwen2_vl"))["projector"] == 2
    assert groups(dq.tiny.build_tiny_model("mllama"))["cross_attention"] == 8


def test_mllama_global_vision_layers_are_numbered_after_local_ones():
    model = dq.tiny.build_tiny_model("mllama")
    infos = {i.name: i for i in registry.linear_modules(model)}
    local_layers = {i.layer for i in infos.values() if ".vision_model.transformer." in i.name}
    global_layers = {i.layer for i in infos.values() if ".global_transformer." in i.name}
    assert max(local_layers) < min(global_layers)


def test_language_layer_index_matches_module_name():
    for info in registry.linear_modules(dq.tiny.build_tiny_model("llama")):
        if info.tower == "language":
            assert f".layers.{info.layer}." in info.name


def test_mllama_preset_keeps_non_first_cross_attention_o_proj():
    model = dq.tiny.build_tiny_model("mllama")
    cross_layers = model.config.text_config.cross_attention_layers
    assert len(cross_layers) >= 2
    expected = [f"model.language_model.layers.{i}.cross_attn.o_proj" for i in cross_layers[1:]]
    assert registry.preset_modules(model) == expected


def test_pixtral_preset_keeps_whole_vision_encoder():
    model = dq.tiny.build_tiny_model("llava")
    vision = [i.name for i in registry.linear_modules(model) if i.tower == "vision"]
    assert registry.preset_modules(model) == vision and vision


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_preset_keeps_merger_and_first_language_layers(family):
    model = dq.tiny.build_tiny_model(family)
    kept = registry.preset_modules(model)
    infos = {i.name: i for i in registry.linear_modules(model)}
    assert {infos[n].group for n in kept} >= {"projector", "language_attention", "language_mlp"}
    assert {infos[n].layer for n in kept if infos[n].tower == "language"} == {0, 1}
    assert "lm_head" not in kept


def test_unknown_model_type_is_generic_with_a_warning():
    with pytest.warns(UserWarning, match="no registry entry"):
        family = registry.family_of("some_new_arch")
    assert family is registry.GENERIC


def test_known_families_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model_type in ("qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llama", "qwen2", "phi3"):
            assert registry.family_of(model_type) is not registry.GENERIC
