"""generate and evaluate_answers on every family; the answer-scoring helpers."""

import pandas as pd
import pytest

import dq_kit as dq
from dq_kit.data.shapes import shapes_dataset
from dq_kit.evaluation.generation import generate
from dq_kit.evaluation.scores import AnswerScores, evaluate_answers, normalize_answer, token_f1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llama"])
def test_generate_returns_only_the_answer(tiny_path, tmp_path, family, capsys):
    model, processor = dq.load(tiny_path(family), quant="dynamic")
    if family == "llama":
        answer = generate(model, processor, None, "What is in the image?", max_new_tokens=4, stream=True)
    else:
        path = tmp_path / "shape.png"
        dq.tiny.tiny_image(3).save(path)
        answer = generate(model, processor, str(path), "What is in the image?", max_new_tokens=4, stream=True)
        assert generate(model, processor, dq.tiny.tiny_image(3), "What is in the image?", max_new_tokens=4) == answer
    assert isinstance(answer, str) and "What is in the image" not in answer
    assert "<|im_start|>" not in answer and "[INST]" not in answer
    assert answer.strip() in capsys.readouterr().out.replace("\n", "") or not answer  # streamed to stdout


def test_text_model_rejects_an_image(tiny_path):
    model, tokenizer = dq.load(tiny_path("llama"), quant="16bit")
    with pytest.raises(ValueError, match="text-only"):
        generate(model, tokenizer, dq.tiny.tiny_image(0), "Hi", max_new_tokens=2)


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama", "llava"])
def test_batched_evaluation_matches_one_by_one(tiny_path, family):
    model, processor = dq.load(tiny_path(family), quant="16bit")
    ds = shapes_dataset(5, seed=2, task="colour", test_size=None)
    scores = evaluate_answers(model, processor, ds, max_new_tokens=3, batch_size=2)
    assert isinstance(scores, AnswerScores) and isinstance(scores.table, pd.DataFrame)
    assert list(scores.table.columns) == ["index", "question", "reference", "prediction", "exact", "f1"]
    assert scores.table["reference"].tolist() == ds["answer"]
    assert scores.summary == {"n": 5, "exact_match": scores.exact_match, "token_f1": scores.token_f1}
    single = [generate(model, processor, row["images"][0], row["messages"][0]["content"][1]["text"], max_new_tokens=3) for row in ds]
    assert scores.table["prediction"].tolist() == single  # left padding does not change greedy answers


def test_scoring_helpers():
    assert normalize_answer("The Red square!") == "red square"
    assert token_f1("a red square on the left", "a red square on the left") == 1.0
    assert token_f1("red circle", "red square") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("blue", "") == 0.0
    table = pd.DataFrame({"exact": [True, False], "f1": [1.0, 0.5]})
    assert AnswerScores(table).exact_match == 0.5 and AnswerScores(table).token_f1 == 0.75


def test_a_tokenizer_without_chat_template_is_a_clear_error(tiny_path):
    model, tokenizer = dq.load(tiny_path("gemma3_text"), quant="16bit")
    tokenizer.chat_template = None  # a base model, or a GGUF file that carries none
    with pytest.raises(dq.DQError, match="has no chat template"):
        dq.generate(model, tokenizer, None, "Hello?", max_new_tokens=2)
