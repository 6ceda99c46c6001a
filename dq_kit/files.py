"""Safe writes for everything dq_kit saves.

Every write is atomic (a reader, or a process killed mid-save, leaves the old output or the
complete new one, never half of one), and no writer replaces what dq_kit did not write: an
existing target is replaced only when it is empty or an earlier output of the same kind,
unless the caller passes ``overwrite=True``. Staging folders left by a killed save are removed
by the next save to the same path.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DQError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_MAX_HEADER_BYTES = 100 * 2**20
_MAX_DOCUMENT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Output:
    """What a writer produces, so that an existing target can be recognised as an earlier output of the same kind.

    Attributes:
        what: the output in words ("model checkpoint", "LoRA adapter", "dq_kit plan").
        marker: for a folder output, the file every such folder holds (``config.json``).
        file_format: for a file output, its ``"format"`` field (a JSON document's, or the
            metadata of a safetensors file).

    Example:
        >>> Output("LoRA adapter", marker="adapter_config.json").is_folder
        True
    """

    what: str
    marker: str | None = None
    file_format: str | None = None

    @property
    def is_folder(self) -> bool:
        return self.marker is not None

    def is_earlier_output(self, path: Path) -> bool:
        """True when ``path`` holds an earlier output of this kind (or an empty folder, for a folder output)."""
        if self.is_folder:
            return path.is_dir() and (not any(path.iterdir()) or (path / self.marker).is_file())
        return path.is_file() and _file_format(path) == self.file_format


def check_target(path: str | os.PathLike, output: Output, overwrite: bool = False) -> Path:
    """Raise :class:`DQError` unless ``output`` may be written at ``path``; return the resolved path.

    A path that is absent, an empty folder, or an earlier output of the same kind may be replaced;
    anything else only with ``overwrite=True``. A folder is never replaced by a file.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "thesis.txt").write_text("years of work")
        >>> check_target(folder, Output("LoRA adapter", marker="adapter_config.json"))
        Traceback (most recent call last):
        ...
        dq_kit.errors.DQError: ... holds other files (thesis.txt) and is not a LoRA adapter; refusing to replace it. Choose a new or empty folder, or pass overwrite=True to replace it.
    """
    path = Path(path).expanduser().resolve()
    if not output.is_folder and path.is_dir():
        raise DQError(f"{path} is a folder; the {output.what} is written as a file. Give a file path such as {path / 'out.json'}.")
    if (not path.exists()) or overwrite or output.is_earlier_output(path):
        return path
    if path.is_dir():
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise DQError(f"{path} holds other files ({shown}) and is not a {output.what}; refusing to replace it. "
                      "Choose a new or empty folder, or pass overwrite=True to replace it.")
    kind = "a file" if output.is_folder else f"a file that is not a {output.what}"
    raise DQError(f"{path} is {kind}; refusing to replace it. Choose another path, or pass overwrite=True to replace it.")


@contextmanager
def atomic_directory(path: str | os.PathLike, output: Output, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``path``; on success it takes the place of ``path`` in one step.

    The target is checked first (:func:`check_target`). Where the OS can (Linux ``renameat2``
    with ``RENAME_EXCHANGE``) the new and old folders are swapped atomically, so ``path`` always
    holds a complete output; elsewhere the old folder is moved aside for a moment, and a save
    killed in that moment is recovered by the next save or load of ``path``. On an exception the
    staging folder is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_directory("/tmp/dq-atomic-demo", Output("demo", marker="a.txt")) as staging:
        ...     _ = (staging / "a.txt").write_text("hello")
        >>> (Path("/tmp/dq-atomic-demo") / "a.txt").read_text()
        'hello'
    """
    recover_interrupted(path)  # first: an output put back is checked like any other
    path = check_target(path, output, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=".tmp", dir=path.parent))
    staging.chmod(_usual_mode(directory=True))
    backup = staging.with_suffix(".old")
    try:
        yield staging
        check_target(path, output, overwrite)  # nothing else took the path meanwhile
        if not path.exists():
            os.replace(staging, path)
        elif _exchange(staging, path):
            _remove(staging)  # now holds the old output
        else:
            os.replace(path, backup)
            os.replace(staging, path)
            _remove(backup)
    except BaseException:
        _remove(staging)
        if backup.exists() and not path.exists():  # failed between the two moves: the old output goes back
            os.replace(backup, path)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that takes a file name (safetensors, ...);
    on success it is renamed onto ``path`` with the usual permissions, on an exception removed.

    The caller checks the target first (:func:`check_target`); this only stages and renames.

    Example:
        >>> import tempfile
        >>> with atomic_file(Path(tempfile.mkdtemp()) / "data.bin") as tmp:
        ...     _ = tmp.write_bytes(b"abc")
        >>> tmp.exists()
        False
    """
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(path)
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=".tmp", dir=path.parent)
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


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Serialise ``data`` as indented JSON and write it atomically (no target check: for files inside a staging folder)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_json(path: str | os.PathLike, data: dict[str, Any], output: Output, overwrite: bool = False) -> Path:
    """Write a dq_kit JSON document atomically, replacing only an earlier one of the same ``"format"``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> _ = path.write_text("mine")
        >>> save_json(path, {"format": "demo"}, Output("demo file", file_format="demo"))
        Traceback (most recent call last):
        ...
        dq_kit.errors.DQError: ... is a file that is not a demo file; refusing to replace it. Choose another path, or pass overwrite=True to replace it.
    """
    check_target(path, output, overwrite)
    return write_json(path, data)


def read_json(path: str | os.PathLike, what: str, error: type[DQError] = DQError) -> Any:
    """Read a JSON file, raising ``error`` with a clear message when it is missing or corrupt."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} file expected, but {path} is a folder.")
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} file {path} is not valid JSON ({exc}); it may be truncated or corrupt — re-create it.") from exc


def recover_interrupted(path: str | os.PathLike) -> bool:
    """Tidy what killed saves to ``path`` left behind: put back an output that was moved aside, and
    remove stale staging folders and files (``.NAME.*.tmp`` / ``.NAME.*.old``) of processes that
    are gone. Returns True when an output was put back (and warns saying so).

    Example:
        >>> recover_interrupted("/tmp/dq-never-saved-here")
        False
    """
    path = Path(path).expanduser().resolve()
    if not path.parent.is_dir():
        return False
    stale = _stale_staging(path.parent, re.escape(path.name))
    recovered = False
    backups = sorted((e for e, kind in stale if kind == "old"), key=lambda e: e.stat().st_mtime, reverse=True)
    if backups and not path.exists():
        os.replace(backups[0], path)
        recovered = True
        warnings.warn(f"{path} was missing after an interrupted save; the previous output was put back from {backups[0].name}.",
                      stacklevel=3)
    for entry, _ in stale:
        if entry.exists() or entry.is_symlink():
            _remove(entry)
    return recovered


def remove_stale_staging(folder: str | os.PathLike, name_pattern: str) -> None:
    """Remove staging files and folders of killed saves in ``folder`` whose target name matches the
    regex ``name_pattern`` (for writers whose target names change from save to save).

    Example:
        >>> remove_stale_staging("/tmp", r"r\\.corrections\\.[0-9a-f]{8}\\.safetensors")
    """
    for entry, _ in _stale_staging(Path(folder), name_pattern):
        _remove(entry)


# ---- helpers ------------------------------------------------------------------------------------


def _stale_staging(folder: Path, name_pattern: str) -> list[tuple[Path, str]]:
    """``(entry, "tmp" | "old")`` for the staging entries of targets matching ``name_pattern`` whose process is gone."""
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"\.(?:{name_pattern})\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.(tmp|old)")
    stale = []
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _alive(match.group(1)):
            stale.append((entry, match.group(2)))
    return stale



def _file_format(path: Path) -> str | None:
    """The ``"format"`` a dq_kit file declares: a JSON document's field, or a safetensors file's metadata."""
    try:
        with open(path, "rb") as handle:
            if path.suffix == ".safetensors":
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if size < _MAX_HEADER_BYTES else None
                data = header.get("__metadata__") if isinstance(header, dict) else None
            elif path.stat().st_size < _MAX_DOCUMENT_BYTES:
                data = json.loads(handle.read())
            else:
                return None  # larger than any document dq_kit writes
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _staging_prefix(path: Path) -> str:
    """``.NAME.PID.``: the owner's process id lets a later save tell a live staging folder from a stale one."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: str | None) -> bool:
    if pid is None:  # a staging name without a process id (older dq_kit): stale
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    rename = getattr(_libc(), "renameat2", None) if sys.platform == "linux" else None
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _usual_mode(directory: bool) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give under the current umask (temp files get 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask
