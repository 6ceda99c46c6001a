"""The one image opener: PIL images, bytes, ``{"bytes", "path"}`` dicts, paths and URLs (resolved to local
files, never downloaded), always as RGB; :func:`open_image` adds the caller's context to a failure.

Example:
    >>> import dq_kit as dq
    >>> load_image(dq.tiny.tiny_image(0).convert("L")).mode
    'RGB'
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import PIL.Image

from ..errors import DQError

__all__ = ["load_image", "open_image"]


def _resolve(reference: str, base_dir: str | os.PathLike | None) -> Path:
    parsed = urlparse(reference)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
        relative = (parsed.netloc + parsed.path).lstrip("/")
        candidates = [base / relative, base / parsed.path.lstrip("/"), base / Path(parsed.path).name]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"URL {reference!r} is not fetched (dq_kit never downloads); looked for a local copy at "
                f"{', '.join(str(path) for path in dict.fromkeys(candidates))}. Download the images and pass base_dir."
            )
        return found
    path = Path(parsed.path if parsed.scheme == "file" else reference).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path


def load_image(reference: Any, base_dir: str | os.PathLike | None = None) -> PIL.Image.Image:
    """Open an image given as a PIL image, bytes, a ``{"bytes", "path"}`` dict, a path or a URL, as RGB.

    Relative paths and URLs resolve under ``base_dir`` (default: the current directory); a URL
    maps to ``base_dir/<host>/<path>``, ``base_dir/<path>`` or ``base_dir/<file name>``. Nothing
    is downloaded.

    Example:
        >>> import dq_kit as dq
        >>> load_image(dq.tiny.tiny_image(0).convert("L")).mode
        'RGB'
    """
    if isinstance(reference, PIL.Image.Image):
        image = reference
    elif isinstance(reference, (bytes, bytearray)):
        image = PIL.Image.open(io.BytesIO(reference))
    elif isinstance(reference, dict) and (reference.get("bytes") or reference.get("path")):
        data = reference.get("bytes")
        image = PIL.Image.open(io.BytesIO(data)) if data else PIL.Image.open(_resolve(reference["path"], base_dir))
    elif isinstance(reference, (str, os.PathLike)):
        image = PIL.Image.open(_resolve(os.fspath(reference), base_dir))
    else:
        raise TypeError(f"cannot read an image from a {type(reference).__name__}")
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(reference: Any, where: str, base_dir: str | os.PathLike | None = None, error: type[DQError] = DQError) -> PIL.Image.Image:
    """:func:`load_image`, with any failure raised as ``error`` whose message starts with ``where``.

    Example:
        >>> open_image("missing.png", "Calibration sample 3: image 0")
        Traceback (most recent call last):
        ...
        dq_kit.errors.DQError: Calibration sample 3: image 0 ('missing.png') could not be opened (FileNotFoundError: ...). Check the path and that the file is a valid image.
    """
    if not isinstance(reference, (PIL.Image.Image, bytes, bytearray, dict, str, os.PathLike)):
        raise error(f"{where} is a {type(reference).__name__}; pass a PIL image or an image path.")
    try:
        return load_image(reference, base_dir)
    except (OSError, ValueError, TypeError) as exc:
        shown = f" ({os.fspath(reference)!r})" if isinstance(reference, (str, os.PathLike)) else ""
        raise error(
            f"{where}{shown} could not be opened ({type(exc).__name__}: {exc}). Check the path and that the file is a valid image."
        ) from exc
