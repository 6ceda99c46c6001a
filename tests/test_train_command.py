"""`dq-kit train`: the scripted fine-tuning run, in one process, across two processes (torchrun, gloo on CPU), resumed, and refused on bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

import dq_kit as dq
from dq_kit.cli import main
from dq_kit.training.job import TrainingJob, World, adapter_fingerprint, per_device_batch

QUIET = ["--sft", "disable_tqdm=true", "--sft", "activation_checkpointing=false"]


def test_two_processes_train_one_identical_adapter(tiny_path, tmp_path):
    output = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DQ_PROGRESS": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dq_kit.cli", "train", str(tiny_path("qwen2_vl")), "--output", str(output),
               "--samples", "16", "--steps", "3", "--batch-size", "4", "--lora-r", "4", *QUIET]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment, check=False)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    fingerprints = dict(re.findall(r"rank (\d) of 2: adapter fingerprint ([0-9a-f]{64})", finished.stdout))
    assert set(fingerprints) == {"0", "1"}, finished.stdout[-3000:]
    assert fingerprints["0"] == fingerprints["1"]  # gradients were averaged: both copies took the same steps
    assert "2 process(es) x 2 rows per step" in finished.stdout
    assert finished.stdout.count("Adapter written to") == 1
    assert sorted(p.name for p in output.iterdir()) == ["adapter", "checkpoints", "dq_train.json"]  # no staging left behind

    base, _ = dq.load(tiny_path("qwen2_vl"), quant="dynamic", processor=False)
    reloaded = PeftModel.from_pretrained(base, output / "adapter", is_trainable=True)
    assert adapter_fingerprint(reloaded) == fingerprints["0"]
    assert any(name.endswith("lora_B.default.weight") and parameter.abs().sum() > 0 for name, parameter in reloaded.named_parameters())


def test_train_then_resume_from_the_last_checkpoint(tiny_path, tmp_path, capsys):
    arguments = ["train", str(tiny_path("qwen2_vl")), "--output", str(tmp_path / "run"), "--samples", "8", "--batch-size", "2",
                 "--lora-r", "2", "--sft", "save_steps=2", *QUIET]
    assert main([*arguments, "--steps", "2"]) == 0
    settings = json.loads((tmp_path / "run" / "dq_train.json").read_text())
    assert settings["steps"] == 2 and settings["sft"]["save_steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    capsys.readouterr()

    assert main([*arguments, "--steps", "3"]) == 2  # an earlier run is neither continued nor replaced unasked
    assert "--resume" in capsys.readouterr().err

    assert main([*arguments, "--steps", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Resuming from" in out and "checkpoint-2" in out and "3 steps" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    assert main([*arguments, "--steps", "3", "--resume", "--lora-r", "4"]) == 2  # the checkpoints hold a rank-2 adapter
    assert "other lora_r (lora_r=2)" in capsys.readouterr().err

    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main([*arguments, "--steps", "1", "--overwrite", "--dataset", "/no/such/data"]) == 2  # refused: nothing removed
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

    assert main([*arguments, "--steps", "1", "--overwrite"]) == 0  # starts over: the earlier checkpoints go
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-2").exists()
    assert json.loads((tmp_path / "run" / "dq_train.json").read_text())["steps"] == 1


def test_a_data_folder_with_its_own_columns(tiny_path, tmp_path, capsys):
    raw = Dataset.from_dict({
        "img": [dq.tiny.tiny_image(seed) for seed in range(6)],
        "query": ["What colour is it?"] * 6,
        "label": ["red", "blue", "green", "red", "blue", "green"],
    })
    raw.save_to_disk(tmp_path / "data")
    arguments = ["train", str(tiny_path("llava")), "--output", str(tmp_path / "run"), "--dataset", str(tmp_path / "data"),
                 "--image", "img", "--question", "query", "--answer", "label", "--steps", "1", "--batch-size", "2", *QUIET]
    assert main(arguments) == 0
    assert "6 training rows" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (["--sft", "learning_rat=1e-4"], "no field 'learning_rat'. Did you mean learning_rate"),
    (["--sft", "max_steps=5"], "set it with --steps"),
    (["--sft", "save_steps"], "KEY=VALUE"),
    (["--batch-size", "3", "--sft", "gradient_accumulation_steps=2"], "give a multiple of 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lora-r", "0"], "--lora-r must be at least 1"),
    (["--sft", "seed=3"], "set it with --seed"),
    (["--sft", "gradient_accumulation_steps=0"], "gradient_accumulation_steps=0: give a whole number"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--dataset", "/no/such/data.jsonl"], "could not be read"),
    pytest.param(["--sft", 'fsdp="full_shard auto_wrap"'], "FSDP / DeepSpeed ZeRO-3 need GPUs",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="sharding is refused only without a GPU")),
])
def test_bad_options_are_refused_before_any_work(tiny_path, tmp_path, capsys, bad, message):
    output = tmp_path / "run"
    assert main(["train", str(tiny_path("qwen2_vl")), "--output", str(output), *bad]) == 2
    assert message in capsys.readouterr().err
    assert not (output / "checkpoints").exists()


def test_spreading_one_model_is_refused_under_several_processes(tiny_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(tiny_path("qwen2_vl")), "--output", str(tmp_path / "run"), "--spread"]) == 2
    assert "this run has 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_with_other_files_is_left_alone(tiny_path, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["train", str(tiny_path("qwen2_vl")), "--output", str(tmp_path), *extra]) == 2
        assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_dataset_without_answers_is_refused(tiny_path, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
             "images": [dq.tiny.tiny_image(seed)]} for seed in range(3)]
    Dataset.from_list(rows).save_to_disk(tmp_path / "data")
    with pytest.warns(UserWarning, match="Dropped bad rows"):
        status = main(["train", str(tiny_path("qwen2_vl")), "--output", str(tmp_path / "run"), "--dataset", str(tmp_path / "data")])
    assert status == 2
    error = capsys.readouterr().err
    assert "No valid row is left" in error and "no assistant turn" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_language_model_trains_on_a_jsonl_file(tiny_path, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": answer}]}
            for answer in ("Blue.", "Grey.", "Blue.", "Red.")]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    arguments = ["train", str(tiny_path("qwen3")), "--output", str(tmp_path / "run"), "--dataset", str(tmp_path / "chats.jsonl"),
                 "--steps", "2", "--batch-size", "2", "--lora-r", "2", "--sft", "bf16=False", *QUIET]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "4 training rows" in out and "2 steps" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_shapes_need_a_vision_model(tiny_path, tmp_path, capsys):
    assert main(["train", str(tiny_path("llama")), "--output", str(tmp_path / "run")]) == 2
    assert "is a text model" in capsys.readouterr().err


def test_the_batch_splits_over_the_processes():
    job = TrainingJob("model", "out", batch_size=16, sft={"gradient_accumulation_steps": 2})
    assert per_device_batch(job, World(size=4)) == 2
    with pytest.raises(dq.DQError, match="does not split over 3 process"):
        per_device_batch(job, World(size=3))


def test_world_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_environment()
    assert (world.size, world.rank, world.local_rank, world.is_main) == (4, 3, 1, False)


def test_fingerprint_follows_trainable_values_only():
    layer = torch.nn.Linear(2, 2)
    first = adapter_fingerprint(layer)
    layer.bias.requires_grad_(False)
    frozen_bias = adapter_fingerprint(layer)
    assert frozen_bias != first
    with torch.no_grad():
        layer.bias.add_(1)
    assert adapter_fingerprint(layer) == frozen_bias  # frozen values are not part of it
    with torch.no_grad():
        layer.weight.add_(1)
    assert adapter_fingerprint(layer) != frozen_bias
