"""The shipped demo model: it answers held-out images, and a LoRA fine-tune on its dynamic 4-bit
version teaches it a new skill (naming the colour alone)."""

from __future__ import annotations

import dq_kit as dq
from dq_kit.demo.model import demo_model_path
from dq_kit.demo.pipeline import teach_skill


def test_shipped_demo_model_captions_held_out_images():
    model, processor = dq.load(demo_model_path(), quant="16bit")
    held_out = dq.data.shapes_dataset(24, seed=4242, task="describe", test_size=None)
    assert dq.evaluate_answers(model, processor, held_out, max_new_tokens=12).exact_match >= 0.6


def test_lora_on_the_dynamic_demo_model_teaches_a_new_skill():
    model, processor = dq.load(demo_model_path(), quant="dynamic")
    splits = dq.data.shapes_dataset(400, seed=3003, task="colour", test_size=48)
    _, before, after = teach_skill(model, processor, splits, steps=800, lr=2e-3)
    assert before.exact_match <= 0.05  # it answers with a whole caption before
    assert after.exact_match >= 0.6  # and with the colour alone, mostly right, after
