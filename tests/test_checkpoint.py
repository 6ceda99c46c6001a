import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dq_kit as dq
from dq_kit.quant.checkpoint import PLAN_FILE, plan_from_checkpoint, prequantized_config, save
from dq_kit.quant.quantization import quantize
from dq_kit.quant.verification import is_quantized

# Reloads the folder with plain transformers + bitsandbytes in a fresh interpreter (dq_kit never imported).
RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers, bitsandbytes as bnb
    from safetensors.torch import load_file, save_file
    path, out = sys.argv[1], sys.argv[2]
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, device_map="cpu")
    transformers.AutoProcessor.from_pretrained(path)
    inputs = load_file(out + "/inputs.safetensors")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous()}, out + "/logits.safetensors")
    linears = {n: isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    print(json.dumps({"dq_kit_imported": "dq_kit" in sys.modules, "unquantized": sorted(n for n, q in linears.items() if not q),
                      "quantized": sum(linears.values())}))
    """
)


class FakeReport:
    metrics = {"KL mean": 0.0123, "top-1 agreement %": 97.5}

    def save(self, path):
        with open(path, "w") as handle:
            json.dump({"metrics": self.metrics}, handle)


def unquantized(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not is_quantized(m))


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def dynamic_qwen(tiny_path):
    """A dynamic tiny Qwen2-VL (quantized in memory), its processor, plan and inputs."""
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    plan = dq.Plan.from_patterns(model, [r"model\.visual\.blocks\.1\..*", r"model\.language_model\.layers\.0\.mlp\.down_proj"])
    quantize(model, plan)
    inputs = dict(dq.tiny.tiny_chat_inputs(processor, "qwen2_vl", image=dq.tiny.tiny_image(7)))
    return model, processor, plan, inputs


def test_saved_checkpoint_reloads_in_plain_transformers(dynamic_qwen, tmp_path):
    model, processor, plan, inputs = dynamic_qwen
    path = save(model, tmp_path / "ckpt", report=FakeReport(), processor=processor)
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", PLAN_FILE, "dq_report.json", "README.md", "processor_config.json"} <= names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "no staging folder may be left behind"
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["llm_int8_skip_modules"] == plan.skip_modules
    assert dq.Plan.load(path / PLAN_FILE) == plan

    card = (path / "README.md").read_text()
    assert "model.visual.blocks.1.attn.qkv" in card and "qwen2_vl" in card and "| Description | Size |" in card
    assert "NF4 on every Linear" in card and "KL mean" in card

    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dq_kit_imported"] is False
    assert report["unquantized"] == unquantized(model) == plan.skip_modules
    assert report["quantized"] == sum(is_quantized(m) for m in model.modules())
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], forward(model, inputs))


def test_dq_load_uses_the_saved_plan(dynamic_qwen, tmp_path):
    model, processor, plan, inputs = dynamic_qwen
    path = save(model, tmp_path / "ckpt", processor=processor)
    # Needs the dq_kit/quant/loading.py integration of dq_kit.quant.checkpoint (plan_from_checkpoint / prequantized_config).
    loaded, _ = dq.load(path)
    assert loaded.dq_plan == plan
    assert unquantized(loaded) == plan.skip_modules
    assert torch.equal(forward(loaded, inputs), forward(model, inputs))
    with pytest.raises(dq.PlanError, match="already quantized"):
        dq.load(path, quant="4bit", processor=False)
    with pytest.raises(dq.PlanError, match="cannot load in 16-bit"):
        dq.load(path, quant="16bit", processor=False)


def test_16bit_model_saved_with_a_plan_loads_dynamic(tiny_path, tmp_path):
    model, processor = dq.load(tiny_path("llama"), quant="16bit")
    plan = dq.Plan.from_patterns(model, [r"model\.layers\.0\.self_attn\.o_proj"])
    path = save(model, tmp_path / "ckpt16", plan=plan, processor=processor)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert "quantizes them with `dq_plan.json` on load" in (path / "README.md").read_text()
    # Needs the dq_kit/quant/loading.py integration of dq_kit.quant.checkpoint.
    loaded, _ = dq.load(path, processor=False)
    assert loaded.dq_plan == plan and unquantized(loaded) == plan.skip_modules


def test_published_substring_skip_list_loads_as_intended(tiny_path, tmp_path):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    with pytest.warns(UserWarning, match="substrings"):
        plan = dq.Plan.from_patterns(model, ["visual"])
    quantize(model, plan)
    path = save(model, tmp_path / "published", processor=processor)
    # Make it look like a transformers-4 era upload: substring skip list, no dq_plan.json.
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = ["visual", "lm_head"]
    (path / "config.json").write_text(json.dumps(config))
    (path / PLAN_FILE).unlink()

    # Needs the dq_kit/quant/loading.py integration of dq_kit.quant.checkpoint.
    with pytest.warns(UserWarning, match="substrings"):
        loaded, _ = dq.load(path, processor=False)
    expected = sorted(["lm_head"] + [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".visual." in n])
    assert unquantized(loaded) == expected == plan.skip_modules
    assert loaded.dq_plan.source == "checkpoint"
    inputs = dq.tiny.tiny_chat_inputs(processor, "qwen2_vl", image=dq.tiny.tiny_image(2))
    assert torch.equal(forward(loaded, inputs), forward(model, inputs))


# ---- plan_from_checkpoint / prequantized_config without loading weights -------------------------


def bnb_config(skip, **extra):
    config = dq.tiny.tiny_config("qwen2_vl")
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": skip, **extra}
    return config


def test_plan_from_checkpoint_expands_and_drops_patterns():
    skeleton = dq.tiny.build_tiny_model("qwen2_vl")
    with pytest.warns(UserWarning) as caught:
        plan = plan_from_checkpoint(bnb_config(["merger", "lm_head", "vision_model.encoder"], bnb_4bit_quant_type="fp4"), skeleton)
    assert plan.keep == ("model.visual.merger.mlp.0", "model.visual.merger.mlp.2") and plan.fixed == ("lm_head",)
    assert plan.quant_type == "fp4" and plan.double_quant is False and plan.source == "checkpoint"
    messages = " ".join(str(w.message) for w in caught)
    assert "vision_model.encoder" in messages and "substrings" in messages
    uniform = plan_from_checkpoint(bnb_config(None), skeleton)  # no skip list: transformers keeps the output head
    assert uniform.keep == () and uniform.fixed == ("lm_head",) and uniform.double_quant is False
    assert plan_from_checkpoint(dq.tiny.tiny_config("qwen2_vl"), skeleton) is None


def test_prequantized_config_writes_exact_names_and_refuses_replanning():
    skeleton = dq.tiny.build_tiny_model("qwen2_vl")
    config = bnb_config(["model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"])
    stored = plan_from_checkpoint(config, skeleton)
    exact = prequantized_config(config, stored, stored, torch.float32)
    assert exact.quantization_config["llm_int8_skip_modules"] == stored.skip_modules
    assert exact.quantization_config["bnb_4bit_compute_dtype"] == "float32"
    assert config.quantization_config["llm_int8_skip_modules"][0] == "model.visual.merger.mlp.0", "the input config is not modified"
    with pytest.raises(dq.PlanError, match="differs on 2 module"):
        prequantized_config(config, dq.Plan.uniform(skeleton), stored, torch.float32)
    with pytest.raises(dq.PlanError, match="cannot load in 16-bit"):
        prequantized_config(config, None, None, torch.float32)


def test_8bit_checkpoints_are_refused():
    config = dq.tiny.tiny_config("qwen2_vl")
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(dq.UnsupportedModelError, match="bitsandbytes 8-bit"):
        plan_from_checkpoint(config, dq.tiny.build_tiny_model("qwen2_vl"))


# ---- atomic writes and bad input --------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(dynamic_qwen, tmp_path):
    model, processor, plan, _ = dynamic_qwen
    path = save(model, tmp_path / "ckpt", processor=processor)
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    class BrokenReport:
        def save(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save(model, path, report=BrokenReport())
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "staging and backup folders are cleaned up"
    save(model, path)  # replacing a good checkpoint with a new one works
    assert "processor_config.json" not in os.listdir(path)
    usual = tmp_path / "usual"
    usual.mkdir()
    (usual / "f.json").write_text("{}")
    assert path.stat().st_mode & 0o777 == usual.stat().st_mode & 0o777, "a checkpoint folder gets the usual permissions"
    assert (path / "dq_plan.json").stat().st_mode & 0o777 == (usual / "f.json").stat().st_mode & 0o777


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(dynamic_qwen, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(dq.DQError, match=r"holds other files \(notes.txt\) and is not a model checkpoint.*overwrite=True"):
        save(dynamic_qwen[0], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    save(dynamic_qwen[0], tmp_path, overwrite=True)  # the caller said so
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "notes.txt").exists()


def test_refuses_a_plan_that_does_not_match_the_model(dynamic_qwen, tmp_path):
    model = dynamic_qwen[0]
    with pytest.raises(dq.PlanError, match="made for a 'llama' model"):
        save(model, tmp_path / "x", plan=dq.Plan.preset(dq.tiny.build_tiny_model("llama")))
    with pytest.raises(dq.VerificationError, match="quantized although the plan keeps them 16-bit"):
        save(model, tmp_path / "x", plan=dq.Plan.preset(model))
    with pytest.raises(dq.PlanError, match=r"layers\.9\.mlp"):
        save(model, tmp_path / "x", plan=model.dq_plan.with_modules(keep=["model.language_model.layers.9.mlp.up_proj"]))
    assert not (tmp_path / "x").exists()
