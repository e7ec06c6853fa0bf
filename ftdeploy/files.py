"""Atomic file writes: every artifact is written to a temporary file in its own directory, then
moved over its name with ``os.replace``, so a reader (the next stage, the server, a crash) sees the
old file or the new one, never half of one.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1})
>>> (d / "a.json").read_text()
'{\\n  "x": 1\\n}\\n'
>>> sorted(p.name for p in d.iterdir())  # no temporary file left behind
['a.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (0666 less the umask): mkstemp's 0600 would
    make artifacts unreadable to the other users of a shared folder or a serving container."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path``, on an error it
    is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def relative(path: str | Path, start: str | Path) -> str:
    """``path`` relative to the directory ``start`` (``..`` where needed): what artifacts store, so a
    directory reads the same from any working directory and after it is copied or moved with its
    neighbours.

    >>> relative("/runs/digits", "/runs/digits/export"), relative("/runs/digits/export/model.onnx", "/runs/digits/export")
    ('..', 'model.onnx')
    """
    return os.path.relpath(Path(path).absolute(), Path(start).absolute())


def resolve(stored: str | Path, start: str | Path) -> Path:
    """A path an artifact stored (relative to its directory ``start``, or absolute) as a usable path."""
    stored = Path(stored)
    return stored if stored.is_absolute() else Path(os.path.normpath(Path(start) / stored))
