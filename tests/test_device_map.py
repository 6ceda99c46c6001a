"""A model loaded with a per-layer device_map: analysed and served as on one device; offloaded layers refused with advice.

The CPU is one device, so a map of CPU entries checks that dq_kit passes per-layer maps and
max_memory through and measures the same numbers; layers on two GPUs (accelerate moving
activations between them) need a machine with two GPUs.
"""

import pytest
import torch

import dq_kit as dq

CALIBRATION = ["A red circle on the left.", "Two blue squares and a green triangle."]


def split_map(model, where_last):
    """Every top-level piece of the llama model mapped by name, the last decoder layer to ``where_last``."""
    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{index}": "cpu" for index in range(layers - 1)})
    device_map[f"model.layers.{layers - 1}"] = where_last
    return device_map


def test_analysis_of_a_model_loaded_with_a_layer_device_map_matches(tiny_path):
    path = tiny_path("llama")
    whole, tokenizer = dq.load(path, quant="16bit")
    spread, _ = dq.load(path, quant="16bit", device_map=split_map(whole, "cpu"), max_memory={"cpu": 2**30})
    reference = dq.analyze(whole, tokenizer, CALIBRATION, progress=False)
    report = dq.analyze(spread, tokenizer, CALIBRATION, progress=False)
    columns = ["weight_rel_error", "act_local_error", "act_accum_error", "sensitivity"]
    assert report.table["module"].tolist() == reference.table["module"].tolist()
    assert (report.table[columns] - reference.table[columns]).abs().max().max() == 0.0
    sequential = dq.analyze(path, tokenizer, CALIBRATION, sequential=True, progress=False)
    assert (sequential.table[columns] - reference.table[columns]).abs().max().max() < 1e-5


def test_dynamic_model_with_a_layer_device_map_generates_as_on_one_device(tiny_path):
    path = tiny_path("llama")
    model, tokenizer = dq.load(path, quant="dynamic")
    spread, _ = dq.load(path, quant="dynamic", device_map=split_map(model, "cpu"))
    ids = tokenizer("A red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, spread(ids).logits)


def test_offloaded_layers_are_refused_with_what_to_do(tiny_path, tmp_path):
    path = tiny_path("llama")
    skeleton, tokenizer = dq.load(path, quant="16bit")
    offloaded, _ = dq.load(path, quant="16bit", device_map=split_map(skeleton, "disk"), offload_folder=str(tmp_path))
    with pytest.raises(dq.AnalysisError, match=r"offloaded .*model.layers.1.*sequential=True"):
        dq.analyze(offloaded, tokenizer, CALIBRATION, progress=False)
