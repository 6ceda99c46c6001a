"""Data adapters, validation and the synthetic shapes dataset (no model needed)."""

import PIL.Image
import pytest
from datasets import Dataset

import dq_kit as dq
from dq_kit import data
from dq_kit.data.shapes import COLOURS, POSITIONS, SHAPES, shapes_dataset


def test_shapes_dataset_is_seeded_split_and_in_trl_format():
    splits = shapes_dataset(20, seed=3, task="describe", test_size=0.25)
    assert splits.num_rows == {"train": 15, "test": 5}
    again = shapes_dataset(20, seed=3, task="describe", test_size=0.25)
    assert splits["train"]["answer"] == again["train"]["answer"]
    assert splits["train"]["answer"] != shapes_dataset(20, seed=4, task="describe")["train"]["answer"][:15]
    row = splits["train"][0]
    user, assistant = row["messages"]
    assert user["role"] == "user" and [item["type"] for item in user["content"]] == ["image", "text"]
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}
    words = row["answer"].split()
    assert words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES and words[-1] in POSITIONS
    image = row["images"][0]
    assert image.size == (56, 56) and image.mode == "RGB"


@pytest.mark.parametrize("task", ["colour", "shape", "position", "count", "mixed"])
def test_shapes_tasks(task):
    ds = shapes_dataset(12, task=task, test_size=None)
    assert isinstance(ds, Dataset) and len(ds) == 12
    allowed = {"colour": set(COLOURS), "shape": set(SHAPES), "position": set(POSITIONS), "count": {"1", "2", "3", "4"}}
    for row in ds:
        if task != "mixed":
            assert row["answer"] in allowed[task]
    assert data.check(ds).ok


def test_colour_is_visible_in_the_pixels():
    row = dq.data.shapes_example(7, task="colour")
    colours = {colour for _, colour in row["images"][0].getcolors(56 * 56)}
    assert COLOURS[row["answer"]] in colours


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown task"):
        shapes_dataset(4, task="nope")
    with pytest.raises(ValueError, match="test split"):
        shapes_dataset(4, test_size=4)


def test_vqa_columns_with_paths_and_urls_are_resolved_locally(tmp_path):
    (tmp_path / "host" / "img").mkdir(parents=True)
    dq.tiny.tiny_image(0).save(tmp_path / "ok.png")
    dq.tiny.tiny_image(1).convert("L").save(tmp_path / "host" / "img" / "gray.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "small.png")
    raw = Dataset.from_dict(
        {
            "image_path": ["ok.png", "https://host/img/gray.png", "broken.png", "missing.png", "small.png", "ok.png"],
            "query": ["What colour?"] * 6,
            "answers": [["red", "crimson"], ["blue"], ["x"], ["y"], ["z"], [""]],
            "id": list(range(6)),
        }
    )
    converted = data.convert(raw)
    assert converted[0]["messages"][1]["content"][0]["text"] == "red"  # first of several answers
    assert converted[1]["images"] == ["https://host/img/gray.png"]

    report = data.check(converted, base_dir=tmp_path)
    assert report.bad_indices == [2, 3, 4, 5]
    reasons = {problem.index: problem.reason for problem in report.problems}
    assert "cannot be opened" in reasons[2] and "not found" in reasons[3]
    assert "min_side" in reasons[4] and "no text" in reasons[5]

    with pytest.raises(data.DataError, match=r"row 3: .*not found"):
        data.validate(converted, base_dir=tmp_path)
    with pytest.warns(UserWarning, match="4 of 6 rows are invalid"):
        clean = data.validate(converted, base_dir=tmp_path, drop=True)
    assert clean["id"] == [0, 1]
    assert all(row["images"][0].mode == "RGB" for row in clean)  # the grey image was converted


def test_url_without_local_copy_is_reported_not_fetched(tmp_path):
    raw = Dataset.from_dict({"image_url": ["https://example.com/a.png"], "question": ["?"], "answer": ["a"]})
    report = data.check(data.convert(raw), base_dir=tmp_path)
    assert "never downloads" in report.problems[0].reason


def test_caption_dataset_and_large_images_are_downscaled():
    raw = Dataset.from_dict({"image": [PIL.Image.new("RGB", (300, 150), (1, 2, 3))], "caption": ["a wide picture"]})
    with pytest.raises(data.DataError, match="question"):
        data.convert(raw)
    ds = data.prepare(raw, default_question="Describe the image.", max_side=100, system="Be brief.")
    row = ds[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["images"][0].size == (100, 50)


def test_messages_format_with_string_contents():
    image = dq.tiny.tiny_image(2)
    raw = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "images": [image]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "images": [image]},
            {"messages": [{"role": "user", "content": "only a question"}], "images": [image]},
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "images": [image]},
        ]
    )
    report = data.check(data.convert(raw))
    reasons = [problem.reason for problem in report.problems]
    assert report.bad_indices == [1, 2, 3]
    assert "alternate" in reasons[0] and "no assistant turn" in reasons[1] and "start with a user turn" in reasons[2]
    ds = data.prepare(raw.select([0]))
    assert ds[0]["messages"][0]["content"][0]["type"] == "image"  # placeholder inserted for the image


def test_placeholder_count_mismatch_is_caught():
    image = dq.tiny.tiny_image(0)
    row = dq.data.shapes_example(0)
    raw = Dataset.from_list([{"messages": row["messages"], "images": [image, image]}])
    assert "2 image(s)" in data.check(raw).problems[0].reason


def test_clear_errors_for_unusable_inputs():
    with pytest.raises(data.DataError, match="messages"):
        data.validate(Dataset.from_dict({"x": [1]}))
    with pytest.raises(data.DataError, match="image column"):
        data.convert(Dataset.from_dict({"question": ["q"], "answer": ["a"]}))
    with pytest.raises(data.DataError, match="one split"):
        data.check(shapes_dataset(4))
