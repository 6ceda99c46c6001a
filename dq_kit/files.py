"""Atomic JSON writes and friendly JSON reads for everything dq_kit saves."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DQError


def _usual_mode(directory: bool) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give under the current umask (temp files get 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the new one, never half.

    The file gets the usual permissions (as ``open(path, "w")`` would create it), not a temp file's 0600.

    Example:
        >>> import tempfile
        >>> path = atomic_write_text(Path(tempfile.mkdtemp()) / "note.txt", "hello")
        >>> path.read_text(), oct(path.stat().st_mode & 0o777) == oct(_usual_mode(directory=False))
        ('hello', True)
    """
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that takes a file name (safetensors, ...);
    on success it is renamed onto ``path`` with the usual permissions, on an exception removed.

    Example:
        >>> import tempfile
        >>> with atomic_file(Path(tempfile.mkdtemp()) / "data.bin") as tmp:
        ...     _ = tmp.write_bytes(b"abc")
        >>> tmp.exists()
        False
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _usual_mode(directory=False))
        with open(tmp, "rb") as handle:  # on disk before it takes the name
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``path``; on success it replaces ``path`` by rename.

    A reader sees the old folder or the complete new one, never a half-written one: an existing
    folder is moved aside, the new one renamed into place, then the old one deleted. On an
    exception the staging folder is removed and ``path`` is left (or put back) as it was.

    Example:
        >>> with atomic_directory("/tmp/dq-atomic-demo") as staging:
        ...     _ = (staging / "a.txt").write_text("hello")
        >>> (Path("/tmp/dq-atomic-demo") / "a.txt").read_text()
        'hello'
    """
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    staging.chmod(_usual_mode(directory=True))
    backup = staging.with_suffix(".old")
    try:
        yield staging
        if path.exists():
            os.replace(path, backup)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backup.exists() and not path.exists():
            os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Serialise ``data`` as indented JSON and write it atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str, error: type[DQError] = DQError) -> Any:
    """Read a JSON file, raising ``error`` with a clear message when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} file {path} is not valid JSON ({exc}); it may be truncated or corrupt — re-create it.") from exc
