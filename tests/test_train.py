"""sft_trainer: answer-only labels, device defaults, resuming after an interruption, learning shown."""

import pytest
import torch
from transformers import TrainerCallback

import dq_kit as dq
from dq_kit.data.shapes import shapes_dataset
from dq_kit.training.lora import add_lora
from dq_kit.training.sft import last_checkpoint, sft_trainer

FAST = {"per_device_train_batch_size": 2, "logging_steps": 1, "disable_tqdm": True, "activation_checkpointing": False}


@pytest.fixture(scope="module")
def shapes():
    return shapes_dataset(24, seed=1, task="mixed", test_size=8)


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama", "llava"])
def test_labels_cover_only_the_answer_tokens(tiny_path, tmp_path, shapes, family):
    model, processor = dq.load(tiny_path(family), quant="dynamic")
    trainer = sft_trainer(add_lora(model, r=2), processor, shapes["train"], output_dir=tmp_path, max_steps=1, **FAST)
    rows = [shapes["train"][i] for i in range(3)]
    batch = trainer.data_collator(rows)
    tokenizer = processor.tokenizer
    for input_ids, labels, row in zip(batch["input_ids"], batch["labels"], rows):
        kept = labels != -100
        assert kept.any() and not kept.all()
        assert torch.equal(labels[kept], input_ids[kept])
        positions = kept.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))  # one contiguous answer span
        assert tokenizer.decode(input_ids[kept]) == row["answer"] + tokenizer.eos_token  # the answer and its end-of-turn token


def test_defaults_follow_the_device_and_full_loss_option(tiny_path, tmp_path, shapes):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="4bit")
    trainer = sft_trainer(add_lora(model, r=2), processor, shapes["train"], output_dir=tmp_path, max_steps=1)
    args = trainer.args
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16 and not args.fp16
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    assert args.assistant_only_loss and args.logging_steps <= 10 and args.max_length is None
    full = sft_trainer(trainer.model, processor, shapes["train"], responses_only=False, output_dir=tmp_path, max_steps=1)
    labels = full.data_collator([shapes["train"][0]])["labels"]
    assert (labels != -100).float().mean() > 0.9  # the prompt is in the loss too


def test_clear_errors(tiny_path, shapes):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    with pytest.raises(dq.DQError, match="single split"):
        sft_trainer(model, processor, shapes)
    with pytest.raises(dq.DQError, match="messages"):
        sft_trainer(model, processor, shapes["train"].remove_columns("messages"))


class _Interrupt(Exception):
    pass


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt(f"simulated crash after step {self.step}")


def _trainer(tiny_path, output_dir, data, callbacks=None):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="dynamic")
    settings = FAST | {"save_steps": 2, "max_steps": 4, "learning_rate": 1e-3, "warmup_steps": 0}
    return sft_trainer(add_lora(model, r=2), processor, data, output_dir=output_dir, callbacks=callbacks, **settings)


def _lora_state(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}


def test_interrupted_training_resumes_to_the_same_result(tiny_path, tmp_path, shapes):
    data = shapes["train"].select(range(8))
    reference = _trainer(tiny_path, tmp_path / "reference", data)
    assert reference.train().global_step == 4

    run = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        _trainer(tiny_path, run, data, callbacks=[_StopAt(3)]).train()
    assert last_checkpoint(run).name == "checkpoint-2"
    (run / "checkpoint-3").mkdir()  # a checkpoint killed while being written: no weights, truncated state
    (run / "checkpoint-3" / "trainer_state.json").write_text("{trunc")

    resumed = _trainer(tiny_path, run, data)
    output = resumed.train(resume_from_checkpoint=True)
    assert output.global_step == 4 and resumed.state.global_step == 4
    expected, got = _lora_state(reference), _lora_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    assert last_checkpoint(tmp_path / "empty") is None  # resume_from_checkpoint=True then starts from scratch


def test_lora_on_4bit_model_learns_a_task(tiny_path, tmp_path):
    """Held-out answer-token loss and exact match before and after a short LoRA fine-tune of a 4-bit model."""
    from dq_kit.evaluation.scores import evaluate_answers

    splits = shapes_dataset(200, seed=7, task="colour", test_size=24)
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="dynamic")
    settings = FAST | {"per_device_train_batch_size": 8, "max_steps": 25, "learning_rate": 5e-3, "warmup_steps": 0, "save_strategy": "no"}
    trainer = sft_trainer(add_lora(model, r=16, alpha=32), processor, splits["train"], splits["test"], output_dir=tmp_path, **settings)
    before_loss = trainer.evaluate()["eval_loss"]
    before = evaluate_answers(trainer.model, processor, splits["test"], max_new_tokens=4, batch_size=12)
    trainer.train()
    after_loss = trainer.evaluate()["eval_loss"]
    after = evaluate_answers(trainer.model, processor, splits["test"], max_new_tokens=4, batch_size=12)
    print(f"answer-token loss {before_loss:.3f} -> {after_loss:.3f}; exact match {before.exact_match:.2f} -> {after.exact_match:.2f}")
    assert after_loss < before_loss - 0.5  # measured here: 6.06 -> 4.94 (randomly initialised tiny model)
    assert after.exact_match >= before.exact_match


def test_unknown_training_option_is_a_clear_error(tiny_path):
    import dq_kit as dq

    model, processor = dq.load(tiny_path("qwen2_vl"), quant="16bit")
    splits = dq.data.shapes_dataset(8, task="colour", test_size=None)
    with pytest.raises(dq.DQError, match=r"Unknown training option\(s\) \['warmup_ratios'\]"):
        dq.sft_trainer(dq.add_lora(model, r=4), processor, splits, warmup_ratios=0.1)


def test_fsdp_needs_one_storage_dtype(tiny_path, shapes):
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="dynamic")
    with pytest.raises(dq.DQError, match=r"FSDP needs every parameter in one dtype.*quant_storage=torch.bfloat16"):
        sft_trainer(add_lora(model, r=2), processor, shapes["train"], fsdp="full_shard", use_cpu=False, max_steps=1)


def test_sharding_on_the_cpu_is_refused_not_silently_dropped(tiny_path, shapes, monkeypatch):
    """On the CPU, transformers' Trainer runs accelerate's MULTI_CPU mode: it wraps the model in DDP and ignores
    FSDP / ZeRO-3 settings, so FSDP-QLoRA cannot be exercised here; it is covered by `make gpu-check`."""
    model, processor = dq.load(tiny_path("qwen2_vl"), quant="dynamic", quant_storage=torch.float32)
    lora = add_lora(model, r=2)
    with pytest.raises(dq.DQError, match="need GPUs: on the CPU the trainer runs plain data parallelism"):
        sft_trainer(lora, processor, shapes["train"], fsdp="full_shard", max_steps=1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(dq.DQError, match="need GPUs"):
        sft_trainer(lora, processor, shapes["train"], max_steps=1)
