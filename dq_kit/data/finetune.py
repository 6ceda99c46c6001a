"""Datasets for fine-tuning: adapters to TRL's conversational vision format, validation, synthetic shapes.

TRL's format, which :func:`dq_kit.sft_trainer` trains on::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": [<PIL.Image>]}

:func:`convert` restructures the common shapes (image + question + answer columns; ``messages``
+ ``images``; an image path or URL column), :func:`validate` opens every image and checks every
conversation *before* training, reporting bad rows by index (or dropping them), and
:func:`prepare` does both. No network is used: URLs are resolved to files under ``base_dir``.

Example:
    >>> import dq_kit as dq
    >>> from datasets import Dataset
    >>> raw = Dataset.from_dict({"image": [dq.tiny.tiny_image(0)], "question": ["Colour?"], "answer": ["red"]})
    >>> ds = dq.data.prepare(raw)
    >>> ds[0]["messages"][1]
    {'role': 'assistant', 'content': [{'type': 'text', 'text': 'red'}]}
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
from datasets import Dataset, Features, Image, List, Value

from ..errors import DataError
from ..progress import progress_bar
from .chat import MESSAGES_FEATURE
from .images import load_image

__all__ = [
    "MESSAGES_FEATURE",
    "DataError",
    "RowProblem",
    "ValidationReport",
    "check",
    "convert",
    "load_image",
    "prepare",
    "validate",
]

IMAGE_COLUMNS = ("images", "image", "img", "image_path", "image_url", "image_file", "file_name", "filename", "path", "url")
QUESTION_COLUMNS = ("question", "query", "prompt", "instruction", "input", "user")
ANSWER_COLUMNS = ("answer", "answers", "response", "output", "caption", "label", "assistant", "text")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RowProblem:
    """Why row ``index`` of a dataset cannot be trained on."""

    index: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.reason}"


@dataclass
class ValidationReport:
    """The result of :func:`check`: how many rows were checked and which ones are bad, with reasons."""

    n_rows: int
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return not self.problems

    @property
    def bad_indices(self) -> list[int]:
        """Indices of the bad rows, ascending."""
        return [problem.index for problem in self.problems]

    def __str__(self) -> str:
        if self.ok:
            return f"All {self.n_rows} rows are valid."
        shown = "\n".join(f"  {problem}" for problem in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"{len(self.problems)} of {self.n_rows} rows are invalid:\n{shown}{more}"


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _find(columns: list[str], candidates: tuple[str, ...], given: str | None, what: str, required: bool = True) -> str | None:
    if given is not None:
        if given not in columns:
            raise DataError(f"The {what} column {given!r} is not in the dataset (columns: {columns}).")
        return given
    found = next((name for name in candidates if name in columns), None)
    if found is None and required:
        raise DataError(
            f"Could not find a {what} column among {columns}; tried {list(candidates)}. Pass {what}='<column name>'."
        )
    return found


def _text_items(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    items = []
    for item in content:
        kind = item.get("type")
        items.append({"type": "image", "text": None} if kind in ("image", "image_url") else {"type": kind, "text": item.get("text")})
    return items


def _normalise_messages(messages: list[dict[str, Any]], n_images: int) -> list[dict[str, Any]]:
    """Structured contents everywhere; image placeholders added to the first user turn if none exist."""
    out = [{"role": message.get("role"), "content": _text_items(message.get("content"))} for message in messages]
    has_placeholder = any(item["type"] == "image" for message in out for item in message["content"])
    if n_images and not has_placeholder:
        first_user = next((message for message in out if message["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = [{"type": "image", "text": None} for _ in range(n_images)] + first_user["content"]
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def convert(
    dataset: Dataset,
    *,
    image: str | None = None,
    question: str | None = None,
    answer: str | None = None,
    messages: str | None = None,
    system: str | None = None,
    default_question: str | None = None,
) -> Dataset:
    """Restructure ``dataset`` into TRL's conversational vision format (``messages`` + ``images``).

    Recognised shapes (column names are detected, or given explicitly):

    * chat: a ``messages`` column (string or structured contents) and an image / images column;
      image placeholders are added to the first user turn when the messages carry none;
    * VQA / captions: image + question + answer columns (``answers`` lists keep their first
      entry; a caption dataset without questions uses ``default_question``);
    * an image column may hold images, file paths or URLs: paths and URLs are resolved later by
      :func:`validate` / :func:`load_image`, locally (no download).

    Other columns are kept. Images are not opened here: run :func:`validate` (or use :func:`prepare`).

    Example:
        >>> from datasets import Dataset
        >>> raw = Dataset.from_dict({"image_path": ["cat.png"], "query": ["What is it?"], "response": ["A cat."]})
        >>> convert(raw)[0]["images"], convert(raw)[0]["messages"][0]["content"][1]["text"]
        (['cat.png'], 'What is it?')
    """
    _require_rows(dataset)
    columns = list(dataset.column_names)
    image_column = _find(columns, IMAGE_COLUMNS, image, "image", required=False)
    messages_column = messages or ("messages" if "messages" in columns else None)
    if messages_column is not None:
        if messages_column not in columns:
            raise DataError(f"The messages column {messages_column!r} is not in the dataset (columns: {columns}).")

        def chat_row(row: dict[str, Any]) -> dict[str, Any]:
            images = _as_list(row[image_column]) if image_column else []
            turns = list(row[messages_column])
            if system is not None and (not turns or turns[0].get("role") != "system"):
                turns = [{"role": "system", "content": system}, *turns]
            return {"messages": _normalise_messages(turns, len(images)), "images": images}

        converter, used = chat_row, {messages_column, image_column}
    else:
        if image_column is None:
            raise DataError(f"Could not find an image column among {columns}; tried {list(IMAGE_COLUMNS)}. Pass image='<column name>'.")
        answer_column = _find(columns, ANSWER_COLUMNS, answer, "answer")
        remaining = [name for name in columns if name != answer_column]
        question_column = _find(remaining, QUESTION_COLUMNS, question, "question", required=default_question is None)

        def vqa_row(row: dict[str, Any]) -> dict[str, Any]:
            images = _as_list(row[image_column])
            reply = row[answer_column]
            reply = reply[0] if isinstance(reply, (list, tuple)) and reply else reply
            asked = row[question_column] if question_column else default_question
            turns = [{"role": "system", "content": system}] if system is not None else []
            turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": None if reply is None else str(reply)}]
            return {"messages": _normalise_messages(turns, len(images)), "images": images}

        converter, used = vqa_row, {image_column, answer_column, question_column}
    dropped = [name for name in used if name is not None and name not in ("messages", "images")]
    features = {name: feature for name, feature in dataset.features.items() if name not in used}
    source = dataset.features.get(image_column) if image_column else None
    image_feature = source.feature if isinstance(source, List) else source
    features["messages"] = MESSAGES_FEATURE
    features["images"] = List(image_feature if isinstance(image_feature, Image) else Value("string"))
    if isinstance(image_feature, Image):
        dataset = dataset.cast_column(image_column, List(Image(decode=False)) if isinstance(source, List) else Image(decode=False))
        features["images"] = List(Image(decode=False))
    return dataset.map(converter, remove_columns=dropped, features=Features(features), desc="converting")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _conversation_problem(messages: Any, n_images: int) -> str | None:
    if not isinstance(messages, (list, tuple)) or not messages:
        return "no messages"
    roles = [message.get("role") if isinstance(message, dict) else None for message in messages]
    unknown = sorted({str(role) for role in roles if role not in ROLES})
    if unknown:
        return f"unknown role(s) {unknown}; roles must be one of {ROLES}"
    if "system" in roles[1:]:
        return "a system message is allowed only first"
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[0] != "user":
        return "the conversation must start with a user turn (after an optional system message)"
    for position, (previous, current) in enumerate(zip(turns, turns[1:]), start=1):
        if previous == current:
            return f"roles must alternate user/assistant; turn {position} repeats {current!r}"
    if "assistant" not in turns:
        return "no assistant turn: nothing to learn from"
    placeholders = 0
    for message in messages:
        content = message.get("content")
        items = _text_items(content) if content is None or isinstance(content, str) else content
        if message["role"] == "assistant" and not any((item.get("text") or "").strip() for item in items if item.get("type") == "text"):
            return "an assistant turn has no text"
        placeholders += sum(1 for item in items if item.get("type") in ("image", "image_url"))
    all_strings = all(isinstance(message.get("content"), str) for message in messages)
    if placeholders != n_images and not (all_strings and placeholders == 0):
        return f"{placeholders} image placeholder(s) in the messages but {n_images} image(s) in the row"
    return None


def _image_problem(image: PIL.Image.Image, min_side: int, max_aspect: float) -> str | None:
    width, height = image.size
    if min(width, height) < min_side:
        return f"image is {width}x{height}, smaller than min_side={min_side}"
    if max(width, height) / min(width, height) > max_aspect:
        return f"image is {width}x{height}, more elongated than max_aspect={max_aspect}"
    return None


def _check_row(
    row: dict[str, Any], base_dir: str | os.PathLike | None, min_side: int, max_side: int | None, max_aspect: float
) -> tuple[str | None, list[PIL.Image.Image]]:
    references = _as_list(row.get("images"))
    problem = _conversation_problem(row.get("messages"), len(references))
    if problem:
        return problem, []
    images = []
    for position, reference in enumerate(references):
        try:
            image = load_image(reference, base_dir)
        except (OSError, TypeError, ValueError, PIL.Image.DecompressionBombError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"image {position} cannot be opened: {detail}", []
        problem = _image_problem(image, min_side, max_aspect)
        if problem:
            return f"image {position}: {problem}", []
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), PIL.Image.Resampling.BICUBIC)
        images.append(image)
    return None, images


def _undecoded(dataset: Dataset) -> Dataset:
    feature = dataset.features.get("images")
    if isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
        return dataset.cast_column("images", List(Image(decode=False)))
    return dataset


def _require_rows(dataset: Any) -> None:
    """Raise :class:`DataError` unless ``dataset`` is one ``datasets.Dataset`` split with at least one row."""
    if isinstance(dataset, dict):
        raise DataError(f"Pass one split (e.g. dataset['train']), not a dict of splits {list(dataset)}.")
    if isinstance(dataset, (list, tuple)):
        raise DataError(f"Pass a datasets.Dataset, not a {type(dataset).__name__}: wrap the rows with "
                        "datasets.Dataset.from_list(rows) (each row a dict of columns).")
    if not isinstance(dataset, Dataset):
        raise DataError(f"Pass a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise DataError("The dataset is empty (0 rows): there is nothing to convert, check or train on.")


def _require_format(dataset: Dataset) -> None:
    _require_rows(dataset)
    missing = [name for name in ("messages",) if name not in dataset.column_names]
    if missing:
        raise DataError(
            f"The dataset has no 'messages' column (columns: {dataset.column_names}). "
            "Convert it first: dq.data.prepare(dataset) or dq.data.convert(dataset)."
        )


def check(
    dataset: Dataset,
    *,
    base_dir: str | os.PathLike | None = None,
    min_side: int = 8,
    max_aspect: float = 100.0,
    progress: bool | None = None,
) -> ValidationReport:
    """Check every row without changing anything: each image opens, sizes are sane, the conversation
    has alternating user/assistant roles, an assistant answer and one placeholder per image.

    Example:
        >>> import dq_kit as dq
        >>> print(check(dq.data.shapes_dataset(4, test_size=None)))
        All 4 rows are valid.
    """
    _require_format(dataset)
    dataset = _undecoded(dataset)
    problems = []
    for index, row in enumerate(progress_bar(dataset, progress, "checking rows")):
        problem, _ = _check_row(row, base_dir, min_side, None, max_aspect)
        if problem:
            problems.append(RowProblem(index, problem))
    return ValidationReport(len(dataset), problems)


def validate(
    dataset: Dataset,
    *,
    drop: bool = False,
    base_dir: str | os.PathLike | None = None,
    min_side: int = 8,
    max_side: int | None = 1024,
    max_aspect: float = 100.0,
) -> Dataset:
    """Return a training-ready copy of ``dataset``: every image opened, RGB, at most ``max_side``
    pixels on its longest side (downscaled, aspect kept), and every conversation checked.

    Bad rows (unreadable or missing image, image smaller than ``min_side`` or more elongated than
    ``max_aspect``, roles that do not alternate, no assistant answer, placeholder/image count
    mismatch) raise :class:`DataError` listing each row index and reason, or with ``drop=True``
    are removed with a warning that lists them. Either way nothing fails mid-epoch.

    Example:
        >>> import dq_kit as dq
        >>> from datasets import Dataset
        >>> raw = Dataset.from_dict({"image": ["missing.png", "also-missing.png"], "question": ["?", "?"], "answer": ["a", "b"]})
        >>> validate(convert(raw), drop=True).num_rows        # doctest: +SKIP
        0
    """
    _require_format(dataset)
    dataset = _undecoded(dataset)

    def clean(row: dict[str, Any]) -> dict[str, Any]:
        problem, images = _check_row(row, base_dir, min_side, max_side, max_aspect)
        return {"images": images, "_dq_problem": problem or ""}

    features = dataset.features.copy()
    features["images"] = List(Image())
    features["_dq_problem"] = Value("string")
    checked = dataset.map(clean, features=Features(features), desc="validating")
    reasons = checked["_dq_problem"]
    report = ValidationReport(len(checked), [RowProblem(index, reason) for index, reason in enumerate(reasons) if reason])
    if not report.ok and not drop:
        raise DataError(f"{report}\nFix these rows, or pass drop=True to remove them.")
    if not report.ok:
        warnings.warn(f"Dropped bad rows. {report}", stacklevel=2)
        bad = set(report.bad_indices)
        checked = checked.select([index for index in range(len(checked)) if index not in bad])
    if not len(checked):
        raise DataError(f"No valid row is left to train on. {report}")
    return checked.remove_columns("_dq_problem")


def prepare(
    dataset: Dataset,
    *,
    drop: bool = False,
    base_dir: str | os.PathLike | None = None,
    max_side: int | None = 1024,
    **columns: Any,
) -> Dataset:
    """:func:`convert` then :func:`validate`: from a raw dataset to one :func:`dq_kit.sft_trainer` can train on.

    ``columns`` are :func:`convert`'s keyword arguments (``image=``, ``question=``, ``answer=``,
    ``messages=``, ``system=``, ``default_question=``).

    Example:
        >>> import dq_kit as dq
        >>> from datasets import Dataset
        >>> raw = Dataset.from_dict({"image": [dq.tiny.tiny_image(1)], "caption": ["a shape"]})
        >>> prepare(raw, default_question="Describe the image.")[0]["messages"][0]["content"][1]["text"]
        'Describe the image.'
    """
    return validate(convert(dataset, **columns), drop=drop, base_dir=base_dir, max_side=max_side)
