"""Bad input gets a clear DQError (or a warning where a result is still usable), never a raw traceback,
and never a silently wrong result."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset

import dq_kit as dq
from dq_kit.cli import main as cli


@pytest.fixture(scope="module")
def llama_report():
    model, tokenizer = dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")
    return dq.analyze(model, tokenizer, ["A red circle.", "Two blue squares."], progress=False)


# ---- dq.plan arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"budget": "ten"}, r"budget must be a number .* got 'ten' \(str\)"),
        ({"budget": float("nan")}, "budget must be finite"),
        ({"budget": float("inf")}, "budget must be finite"),
        ({"budget": None}, "budget=None leaves nothing to plan by"),
        ({"budget": True}, r"budget must be a number .* got True \(bool\)"),
        ({"threshold": "x"}, "threshold must be a number"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"top_k": 2.5}, r"top_k must be a whole number .* got 2.5"),
        ({"top_k": "3"}, r"top_k must be a whole number .* got '3'"),
        ({"budget_bytes": 1.5}, "budget_bytes must be a whole number"),
    ],
)
def test_plan_arguments_are_checked(llama_report, arguments, match):
    with pytest.raises(dq.PlanError, match=match):
        dq.plan(llama_report, **arguments)


def test_a_budget_above_one_warns(llama_report):
    with pytest.warns(UserWarning, match=r"budget=5.0 allows \+500%"):
        dq.plan(llama_report, budget=5.0)


def test_reports_with_missing_or_wrong_meta(llama_report):
    with pytest.raises(dq.AnalysisError, match="needs a number 'bytes_4bit' and lacks it"):
        dq.plan(dq.QuantReport(llama_report.table))
    with pytest.raises(dq.AnalysisError, match="needs a number 'bytes_4bit' and has 'y'"):
        dq.plan(dq.QuantReport(llama_report.table, meta={**llama_report.meta, "bytes_4bit": "y"}))
    with pytest.raises(dq.AnalysisError, match="needs a number 'kl_uniform'"):
        dq.predicted_kl(dq.QuantReport(llama_report.table, meta={}), dq.Plan())
    with pytest.raises(dq.AnalysisError, match="meta is a dict"):
        dq.QuantReport(llama_report.table, meta=[1])
    with pytest.raises(dq.AnalysisError, match="pandas DataFrame"):
        dq.QuantReport([1, 2])


# ---- another model's plan -------------------------------------------------------------------------


def test_plans_record_the_model_identity_and_warn_on_another_size(tmp_path):
    model = dq.tiny.build_tiny_model("llama")
    plan = dq.Plan.preset(model)
    assert plan.identity == {"name_or_path": None, "num_layers": 2, "hidden_size": 64}
    assert dq.Plan.load(plan.save(tmp_path / "plan.json")).identity == plan.identity
    deeper = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 3}))
    with pytest.warns(UserWarning, match="made for another llama model .*2 layers of width 64 against 3 layers of width 64"):
        plan.check(deeper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.check(dq.tiny.build_tiny_model("llama", seed=1))  # same architecture and size: a copy or a fine-tune


def test_predicted_kl_refuses_another_models_plan(llama_report):
    with pytest.raises(dq.PlanError, match="made for a 'qwen2_vl' model, the report for a 'llama' one"):
        dq.predicted_kl(llama_report, dq.Plan.preset(dq.tiny.build_tiny_model("qwen2_vl")))
    with pytest.raises(dq.PlanError, match="names 1 module.* this report does not list .*model.layers.7.mlp.up_proj"):
        dq.predicted_kl(llama_report, dq.Plan(keep=("model.layers.7.mlp.up_proj",), model_type="llama"))
    other = dq.Plan(model_type="llama", identity={"name_or_path": "big", "num_layers": 30, "hidden_size": 576})
    with pytest.warns(UserWarning, match="made for another llama model than the report"):
        dq.predicted_kl(llama_report, other)


# ---- plan files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"keep": "model.layers.0.mlp.up_proj"}, r"'keep' is str .*expected list"),
        ({"double_quant": "false"}, r"'double_quant' is str 'false', expected bool"),
        ({"version": "2"}, r"'version' is str '2', expected int"),
        ({"keep": [1]}, r"'keep' holds 1, expected module names"),
        ({"corrections": ["a"]}, r"'corrections' is list"),
    ],
)
def test_plan_files_with_wrong_types(tmp_path, fields, match):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "dq_kit.plan", **fields}))
    with pytest.raises(dq.PlanError, match=match):
        dq.Plan.load(path)


# ---- dq.load ----------------------------------------------------------------------------------------


def test_load_errors_name_the_problem(tiny_path, tmp_path):
    path = tiny_path("llama")
    with pytest.raises(dq.ModelNotFoundError, match="is a file; pass the model folder that holds config.json"):
        dq.load(path / "config.json")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(dq.DQError, match="not valid JSON") as caught:
        dq.load(corrupt)
    assert "network" not in str(caught.value)
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(dq.DQError, match=r"model.safetensors is unreadable .*truncated or corrupt"):
        dq.load(truncated, quant="16bit")
    if not torch.cuda.is_available():
        with pytest.raises(dq.DQError, match="asks for a CUDA GPU, but torch sees none"):
            dq.load(path, device_map="cuda")
        with pytest.raises(dq.DQError, match="asks for a CUDA GPU"):
            dq.load(path, device_map={"": 0})
    bare = tmp_path / "bare"
    shutil.copytree(path, bare, ignore=shutil.ignore_patterns("token*", "chat*", "special*"))
    with pytest.raises(dq.DQError, match="processor=False"):
        dq.load(bare, quant="16bit")


def test_encoder_only_models_are_refused(tmp_path):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(dq.UnsupportedModelError, match="'bert' is an encoder model .*untrained head"):
        dq.load(tmp_path / "bert", quant="16bit", processor=False)


def test_gguf_models_load_and_quantize(tmp_path):
    file = dq.tiny.save_tiny_gguf(tmp_path / "tiny.gguf")
    reference = dq.tiny.build_tiny_model("llama")
    model16, tokenizer = dq.load(tmp_path, quant="16bit", gguf_file=file.name)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model16.state_dict()[name], tensor), name
    assert model16.hf_quantizer is None and tokenizer("a red circle")["input_ids"]
    model4 = dq.quantize(model16)  # a GGUF-loaded model is a full-precision source, not "already quantized"
    assert type(model4.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    dynamic, _ = dq.load(tmp_path, quant="dynamic", gguf_file=file.name, processor=False)
    dq.verify(dynamic, dynamic.dq_plan)
    dq.save(dynamic, tmp_path / "ckpt")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").config.model_type == "llama"
    with pytest.raises(dq.ModelNotFoundError, match="No GGUF file 'nope.gguf'"):
        dq.load(tmp_path, gguf_file="nope.gguf")
    with pytest.raises(dq.ModelNotFoundError, match="gguf_file="):
        dq.load(file)


# ---- analysis ---------------------------------------------------------------------------------------


def test_text_only_calibration_of_a_vlm_warns():
    model, processor = dq.tiny.build_tiny_model("qwen2_vl"), dq.tiny.tiny_processor("qwen2_vl")
    with pytest.warns(UserWarning, match="None of the 2 calibration samples has an image"):
        report = dq.analyze(model, processor, ["A red circle.", "Two blue squares."], metrics=("activation",), progress=False)
    assert (report.table.loc[report.table["tower"] == "vision", "act_local_error"].fillna(0) == 0).all()


# ---- data, evaluation, generation ---------------------------------------------------------------------


def test_data_functions_refuse_lists_and_empty_datasets():
    for function in (dq.data.validate, dq.data.prepare, dq.data.check, dq.data.convert):
        with pytest.raises(dq.DataError, match=r"Dataset.from_list\(rows\)"):
            function([{"image": "x.png", "caption": "a"}])
        with pytest.raises(dq.DataError, match="empty"):
            function(Dataset.from_dict({"messages": [], "images": []}))


def test_evaluation_and_generation_errors(tmp_path):
    model, processor = dq.tiny.build_tiny_model("qwen2_vl"), dq.tiny.tiny_processor("qwen2_vl")
    with pytest.raises(dq.DQError, match="at least one row"):
        dq.evaluate_answers(model, processor, [])
    with pytest.raises(dq.DQError, match="needs the model's processor"):
        dq.generate(model, None, None, "Hi")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(dq.DQError, match="dq.generate: the image .*could not be opened"):
        dq.generate(model, processor, broken, "What is it?")


# ---- sft_trainer --------------------------------------------------------------------------------------


def _chat(answer: str | None) -> dict:
    turns = [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"messages": turns}


def test_sft_trainer_refuses_data_with_nothing_to_learn(tmp_path):
    model, tokenizer = dq.load(dq.tiny.save_tiny("llama", tmp_path / "m"), quant="16bit")
    settings = {"output_dir": str(tmp_path / "run"), "max_steps": 1}
    with pytest.raises(dq.DataError, match="Nothing to learn: none of the 3 rows"):
        dq.sft_trainer(model, tokenizer, Dataset.from_list([_chat(None)] * 3), **settings)
    with pytest.warns(UserWarning, match=r"2 of 3 train rows have no assistant answer .*left out \(rows \[0, 2\]\)"):
        trainer = dq.sft_trainer(model, tokenizer, Dataset.from_list([_chat(None), _chat("Yes."), _chat(None)]), **settings)
    assert len(trainer.train_dataset) == 1
    with pytest.raises(dq.DataError, match=r"Nothing to learn: preparing the data for training left none of its 1 rows"):
        dq.sft_trainer(model, tokenizer, Dataset.from_list([_chat("Yes.")]), max_length=2, **settings)
    wrong_roles = {"messages": [{"role": "robot", "content": [{"type": "text", "text": "Hi"}]}]}
    with pytest.raises(dq.DataError, match="(?s)rows that would fail during training.*unknown role"):
        dq.sft_trainer(model, tokenizer, Dataset.from_list([wrong_roles, _chat("Yes.")]), **settings)


def test_sft_trainer_refuses_a_missing_image_before_training(tiny_path, tmp_path):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    row = dq.data.shapes_example(0)
    rows = Dataset.from_list([{"messages": row["messages"], "images": [str(tmp_path / "gone.png")]}])
    with pytest.raises(dq.DataError, match="image 0 cannot be opened"):
        dq.sft_trainer(model, processor, rows, output_dir=str(tmp_path / "run"), max_steps=1)


def test_sft_trainer_says_where_it_writes(tiny_path, tmp_path, capsys):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    dq.sft_trainer(model, processor, dq.data.shapes_dataset(4, test_size=None), output_dir=str(tmp_path / "run"), max_steps=1)
    assert f"checkpoints and logs go to {tmp_path / 'run'}" in capsys.readouterr().out.splitlines()[0]


# ---- saving a model with LoRA adapters ------------------------------------------------------------------


def test_saving_a_model_with_lora_adapters_says_what_to_do(tmp_path):
    model = dq.quantize(dq.tiny.build_tiny_model("llama"))
    peft_model = dq.add_lora(model, r=2, gradient_checkpointing=False)
    for target in (model, peft_model):
        with pytest.raises(dq.DQError, match=r"carries LoRA adapter\(s\) \['default'\].*dq.save_adapter.*merge_to_16bit"):
            dq.save(target, tmp_path / "ckpt")


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_refuses_a_nan_budget_and_a_folder_as_out(llama_report, tmp_path, capsys):
    report = llama_report.save(tmp_path / "report.json")
    assert cli(["plan", str(report), "--budget", "nan", "--out", str(tmp_path / "plan.json")]) == 2
    assert "budget must be finite" in capsys.readouterr().err
    assert cli(["plan", str(report), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert cli(["analyze", "/no/such/model", "--out", str(notes), "--quiet"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err and notes.read_text() == "mine"


# ---- memory estimate units, progress switch --------------------------------------------------------------


def test_memory_estimate_of_a_small_model_uses_fitting_units():
    text = str(dq.estimate_memory(dq.tiny.build_tiny_model("llama")))
    assert "131.4 K parameters" in text and "MiB" in text and "0.00" not in text


def test_one_switch_turns_every_bar_off(monkeypatch):
    from dq_kit.progress import progress_enabled

    monkeypatch.setenv("DQ_PROGRESS", "0")
    assert not progress_enabled(None) and progress_enabled(True)
    monkeypatch.setenv("DQ_PROGRESS", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress_enabled(None), "no bars in a log file"


# ---- the README's Quick start runs as written -------------------------------------------------------------


def test_readme_quick_start_runs_as_written(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme[readme.index("## Quick start"):], re.DOTALL).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(block)
    env = {**os.environ, "DQ_PROGRESS": "0", "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "demo-dynamic" / "config.json").is_file()
    assert (tmp_path / "demo-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "demo-finetuned" / "dq_plan.json").is_file()
    assert "Variants compared with 16bit" in run.stdout
