"""The processor comes second in every function; the older order (data first) still works, with a FutureWarning."""

from __future__ import annotations

import warnings

import pytest

import dq_kit as dq

TEXTS = ["A red circle on a blue background.", "Two green squares."]


@pytest.fixture(scope="module")
def llama():
    return dq.tiny.build_tiny_model("llama"), dq.tiny.tiny_processor("llama")


def test_analyze_old_order_warns_and_gives_the_same_report(llama):
    model, tok = llama
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = dq.analyze(model, tok, TEXTS, progress=False)
    with pytest.warns(FutureWarning, match=r"analyze\(model, processor, calibration\)"):
        old = dq.analyze(model, TEXTS, tok, progress=False)
    assert old.table["sensitivity"].tolist() == new.table["sensitivity"].tolist()
    with pytest.warns(FutureWarning):
        only_data = dq.analyze(model, TEXTS, progress=False, metrics=("weight",))
    assert len(only_data.table) == len(new.table)


def test_compare_old_order_warns_and_gives_the_same_result(llama):
    model, tok = llama
    sample = {"messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}]}
    new = dq.compare({"16bit": model}, tok, [sample], max_new_tokens=2)
    with pytest.warns(FutureWarning, match=r"compare\(variants, processor, samples\)"):
        old = dq.compare({"16bit": model}, [sample], tok, max_new_tokens=2)
    assert old.summary.equals(new.summary)
