"""An offline, seeded, synthetic VQA dataset of coloured shapes, drawn with PIL.

Every row is in TRL's conversational vision format (``messages`` + ``images``) plus two plain
columns, ``task`` and ``answer``. Small (56 px) images keep tiny models fast on a CPU, and the
answers are short and exact, so learning shows as exact-match accuracy.

Example:
    >>> from dq_kit.data.shapes import shapes_dataset
    >>> splits = shapes_dataset(20, seed=0, task="describe")
    >>> splits["train"][0]["answer"]
    'a red circle on the left'
"""

from __future__ import annotations

import random

import PIL.Image
import PIL.ImageDraw
from datasets import Dataset, DatasetDict, Features, Image, List, Value

from ..progress import progress_bar
from ..synthetic import drawing
from ..synthetic.drawing import PALETTE
from .chat import MESSAGES_FEATURE

COLOURS: dict[str, tuple[int, int, int]] = {name: PALETTE[name] for name in ("red", "green", "blue", "yellow")}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
BACKGROUND = (250, 250, 250)
QUESTIONS: dict[str, str] = {
    "describe": "Describe the picture in one sentence.",
    "colour": "What colour is the shape?",
    "shape": "What shape do you see?",
    "position": "Where is the shape?",
    "count": "How many shapes are there?",
}
TASKS: tuple[str, ...] = (*QUESTIONS, "mixed")
MAX_COUNT = 4

FEATURES = Features(
    {
        "messages": MESSAGES_FEATURE,
        "images": List(Image()),
        "task": Value("string"),
        "answer": Value("string"),
    }
)


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: str) -> None:
    """Draw one filled ``shape`` ("circle", "square", "triangle") of a named colour inside ``box``.

    Example:
        >>> image = PIL.Image.new("RGB", (56, 56), BACKGROUND)
        >>> draw_shape(PIL.ImageDraw.Draw(image), "circle", (10, 10, 30, 30), "red")
        >>> image.getpixel((20, 20))
        (220, 40, 40)
    """
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; choose from {SHAPES}.")
    drawing.draw_shape(draw, shape, box, COLOURS[colour])


def _single(rng: random.Random, size: int) -> tuple[PIL.Image.Image, dict[str, str]]:
    colour, shape, position = rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS)
    extent = rng.randint(size * 5 // 16, size * 3 // 8)
    third = size // 3
    column = POSITIONS.index(position)
    left = column * third + rng.randint(0, max(0, third - extent))
    left = min(left, size - extent)
    top = rng.randint(0, size - extent)
    image = PIL.Image.new("RGB", (size, size), BACKGROUND)
    draw_shape(PIL.ImageDraw.Draw(image), shape, (left, top, left + extent - 1, top + extent - 1), colour)
    return image, {"colour": colour, "shape": shape, "position": position}


def _several(rng: random.Random, size: int) -> tuple[PIL.Image.Image, int]:
    count = rng.randint(1, MAX_COUNT)
    cell = size // 2
    image = PIL.Image.new("RGB", (size, size), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for index in rng.sample(range(4), count):
        extent = rng.randint(cell * 9 // 16, cell * 3 // 4)
        left = (index % 2) * cell + rng.randint(0, cell - extent)
        top = (index // 2) * cell + rng.randint(0, cell - extent)
        draw_shape(draw, rng.choice(SHAPES), (left, top, left + extent - 1, top + extent - 1), rng.choice(sorted(COLOURS)))
    return image, count


def shapes_example(index: int, seed: int = 0, task: str = "describe", size: int = 56) -> dict:
    """Row ``index`` of the synthetic dataset: the same ``(index, seed, task, size)`` always gives the same row.

    Example:
        >>> row = shapes_example(0, task="colour")
        >>> row["messages"][1]["content"][0]["text"] == row["answer"], row["images"][0].size
        (True, (56, 56))
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {TASKS}.")
    rng = random.Random(f"dq-shapes-{seed}-{index}")
    if task == "mixed":
        task = rng.choice(tuple(QUESTIONS))
    if task == "count":
        image, count = _several(rng, size)
        answer = str(count)
    else:
        image, attributes = _single(rng, size)
        answer = (
            f"a {attributes['colour']} {attributes['shape']} on the {attributes['position']}"
            if task == "describe"
            else attributes[task]
        )
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": QUESTIONS[task]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
        "task": task,
        "answer": answer,
    }


def shapes_dataset(
    n: int,
    seed: int = 0,
    task: str = "describe",
    size: int = 56,
    test_size: float | None = 0.2,
    *,
    progress: bool | None = None,
) -> DatasetDict | Dataset:
    """``n`` seeded synthetic shape questions, split into train and test (a ``DatasetDict``).

    Tasks: ``"describe"`` ("a red square on the left"), ``"colour"``, ``"shape"``, ``"position"``
    (left / middle / right), ``"count"`` (1-4 shapes) and ``"mixed"`` (one of them per row).
    ``test_size`` is a fraction or a row count; ``None`` or ``0`` returns a single ``Dataset``.
    Rows ``0..n_train-1`` are the train split and the rest the test split, so a larger ``n`` with
    the same seed extends the training set.

    Example:
        >>> import dq_kit as dq
        >>> splits = dq.data.shapes_dataset(10, seed=1, task="count", test_size=2)
        >>> splits.num_rows
        {'train': 8, 'test': 2}
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    rows = [shapes_example(index, seed, task, size) for index in progress_bar(range(n), progress, "drawing shapes")]
    if not test_size:
        return Dataset.from_list(rows, features=FEATURES)
    n_test = int(round(test_size * n)) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"test_size={test_size!r} leaves {n_test} of {n} rows for the test split; it needs 1 to {n - 1}.")
    return DatasetDict(
        train=Dataset.from_list(rows[: n - n_test], features=FEATURES),
        test=Dataset.from_list(rows[n - n_test :], features=FEATURES),
    )
