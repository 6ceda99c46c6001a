import json
import math

import pytest

import dq_kit as dq
from dq_kit.data.chat import encode_answer
from dq_kit.evaluation.compare import ComparisonResult, compare
from dq_kit.quant.quantization import quantize


def sample(seed, question, answer):
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [dq.tiny.tiny_image(seed)],
    }


SAMPLES = [
    sample(1, "What shape do you see?", "A red square on a blue background."),
    sample(2, "What colour is the shape?", "The shape is green."),
]


@pytest.fixture(scope="module")
def qwen_variants(tiny_path):
    path = tiny_path("qwen2_vl")
    m16, processor = dq.load(path, quant="16bit")
    m4 = quantize(dq.load(path, quant="16bit", processor=False)[0], dq.Plan.uniform(m16))
    md = quantize(dq.load(path, quant="16bit", processor=False)[0], dq.Plan.preset(m16))
    return {"16bit": m16, "4bit": m4, "dynamic": md}, processor


def test_compare_three_variants_of_a_tiny_vlm(qwen_variants, tmp_path):
    variants, processor = qwen_variants
    result = compare(variants, processor, SAMPLES, max_new_tokens=6)

    summary = result.summary.set_index("variant")
    assert list(result.summary.columns) == [
        "variant", "GiB", "KL mean", "KL se", "KL p99", "top-1 agreement %", "perplexity", "gap closed %"
    ]
    assert list(summary.index) == ["16bit", "4bit", "dynamic"] and result.reference == "16bit"
    assert summary.loc["16bit", "KL mean"] == 0 and summary.loc["16bit", "top-1 agreement %"] == 100
    assert summary.loc["4bit", "KL mean"] > summary.loc["dynamic", "KL mean"] > 0
    assert summary.loc["4bit", "KL p99"] >= summary.loc["4bit", "KL mean"] and summary.loc["4bit", "KL se"] > 0
    assert summary.loc["4bit", "gap closed %"] == 0 and summary.loc["16bit", "gap closed %"] == 100
    assert 0 < summary.loc["dynamic", "gap closed %"] <= 100
    assert summary.loc["16bit", "GiB"] > summary.loc["dynamic", "GiB"] > summary.loc["4bit", "GiB"]
    assert all(math.isfinite(p) and p > 1 for p in summary["perplexity"])

    assert list(result.answers.columns) == ["question", "expected", "16bit", "4bit", "dynamic"]
    assert result.answers.loc[1, "expected"] == "The shape is green."
    assert result.answers.loc[0, "question"] == "What shape do you see?"

    page = result.to_html()
    assert page == result._repr_html_()
    assert "<th>Description</th><th>Size</th><th>Result</th>" in page and page.count("<table") == 1 + len(SAMPLES)
    assert "NF4, 1 of" in page and "16-bit (float32)" in page
    assert "✓" in page or "✗" in page

    path = result.save(tmp_path / "comparison.json")
    assert json.loads(path.read_text())["format"] == "dq_kit.comparison"
    again = ComparisonResult.load(path)
    assert again.answers.equals(result.answers) and again.summary.round(12).equals(result.summary.round(12))


def test_reference_is_the_first_variant_without_a_16bit_one(qwen_variants):
    variants, processor = qwen_variants
    result = compare({"dynamic": variants["dynamic"], "4bit": variants["4bit"]}, processor, SAMPLES[:1], max_new_tokens=2)
    assert result.reference == "dynamic"
    assert result.summary["gap closed %"].tolist() == [100.0, 0.0]


def test_answer_tokens_are_the_assistant_turn(qwen_variants):
    _, processor = qwen_variants
    chat = encode_answer(processor, SAMPLES[1])
    scored = processor.tokenizer.decode(chat.full["input_ids"][0, chat.answer_start : chat.answer_end])
    assert scored == "The shape is green.<|im_end|>"
    assert chat.prompt["input_ids"].shape[1] == chat.answer_start


# ---- bad input ------------------------------------------------------------------------------


def test_variants_of_different_architectures_are_refused(qwen_variants):
    variants, processor = qwen_variants
    with pytest.raises(dq.DQError, match="same model in different precisions"):
        compare({"16bit": variants["16bit"], "other": dq.tiny.build_tiny_model("llama")}, processor, SAMPLES)


def test_empty_inputs_are_refused(qwen_variants):
    variants, processor = qwen_variants
    with pytest.raises(dq.DQError, match="No samples"):
        compare(variants, processor, [])
    with pytest.raises(dq.DQError, match="No variants"):
        compare({}, processor, SAMPLES)


def test_sample_without_an_answer_is_named(qwen_variants):
    variants, processor = qwen_variants
    bad = {"messages": SAMPLES[0]["messages"][:1], "images": SAMPLES[0]["images"]}
    with pytest.raises(dq.DQError, match="sample 1: needs a user turn followed by an assistant turn"):
        compare(variants, processor, [SAMPLES[0], bad])
    with pytest.raises(dq.DQError, match="sample 0: expected a dict with 'messages'"):
        compare(variants, processor, [{"text": "hello"}])


def test_sample_whose_images_do_not_fit_its_messages_is_named(qwen_variants):
    variants, processor = qwen_variants
    bad = {"messages": SAMPLES[0]["messages"], "images": []}
    with pytest.raises(dq.DQError, match="sample 0: could not encode it"):
        compare(variants, processor, [bad])
