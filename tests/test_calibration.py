"""Calibration data: the default set and normalisation of strings, chat samples and model-input dicts."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

import dq_kit as dq
from dq_kit.data.calibration import default_calibration, image_token_ids, prepare_calibration
from dq_kit.errors import CalibrationError


def test_default_calibration_is_deterministic_and_varied():
    a, b = default_calibration(n=8, seed=3), default_calibration(n=8, seed=3)
    assert [s["messages"] for s in a] == [s["messages"] for s in b]
    assert all(x.tobytes() == y.tobytes() for s, t in zip(a, b) for x, y in zip(s["images"], t["images"]))
    with_images = [s for s in a if s["images"]]
    assert 0 < len(with_images) < len(a)  # image chats plus text-only chats
    assert len({s["messages"][0]["content"][-1]["text"] for s in a}) > 3
    assert all(isinstance(img, PIL.Image.Image) for s in with_images for img in s["images"])
    assert not any(s["images"] for s in default_calibration(n=8, images=False))
    with pytest.raises(CalibrationError):
        default_calibration(n=0)


def test_chat_samples_score_answer_tokens_not_images():
    family = "qwen2_vl"
    processor, config = dq.tiny.tiny_processor(family), dq.tiny.tiny_config(family)
    (sample,) = prepare_calibration(default_calibration(n=1), processor, config)
    ids = sample.inputs["input_ids"][0]
    assert "pixel_values" in sample.inputs and sample.score_mask.shape == ids.shape
    targets = ids[1:][sample.score_mask[:-1]]
    assert config.image_token_id not in targets.tolist()
    answer = processor.tokenizer.decode(targets)
    assert answer.startswith("The image shows") and answer.rstrip().endswith("<|im_end|>")
    assert image_token_ids(processor, config) == {config.image_token_id, config.video_token_id}


def test_strings_and_ready_dicts():
    tokenizer = dq.tiny.tiny_processor("llama")
    text = prepare_calibration(["A red circle on a blue background."], tokenizer, dq.tiny.tiny_config("llama"))[0]
    assert text.num_scored == text.num_tokens - 1
    ids = list(range(10, 30))
    ready = prepare_calibration([{"input_ids": ids, "labels": [-100] * 10 + ids[10:]}])[0]
    assert ready.inputs["input_ids"].shape == (1, 20) and "labels" not in ready.inputs
    assert ready.score_mask.nonzero().flatten().tolist() == list(range(9, 19))


def test_bad_calibration_names_the_sample(tmp_path):
    processor = dq.tiny.tiny_processor("qwen2_vl")
    good = default_calibration(n=2)
    with pytest.raises(CalibrationError, match="empty"):
        prepare_calibration([], processor)
    with pytest.raises(CalibrationError, match="sample 1.*could not be opened"):
        prepare_calibration([good[0], {**good[1], "images": [str(tmp_path / "missing.png")]}], processor)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="sample 0"):
        prepare_calibration([{**good[0], "images": [str(broken)]}], processor)
    with pytest.raises(CalibrationError, match="sample 0.*1 image item.*holds 0"):
        prepare_calibration([{**good[0], "images": []}], processor)
    with pytest.raises(CalibrationError, match="cannot process images"):
        prepare_calibration([good[0]], dq.tiny.tiny_processor("llama"))
    with pytest.raises(CalibrationError, match="sample 0 is a int"):
        prepare_calibration([3], processor)
    with pytest.raises(CalibrationError, match="processor or tokenizer"):
        prepare_calibration(["text"], None)


def test_processor_that_does_not_fit_the_model():
    config = dq.tiny.tiny_config("llama")
    config.vocab_size = 100
    with pytest.raises(CalibrationError, match="does not belong"):
        prepare_calibration(["hello"], dq.tiny.tiny_processor("llama"), config)
    with pytest.raises(CalibrationError, match="token id 200"):
        prepare_calibration([{"input_ids": torch.tensor([1, 200])}], None, config)
