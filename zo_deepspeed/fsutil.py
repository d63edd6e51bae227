"""Writes that a crash cannot tear: temp file + fsync + rename, and the directory fsync that makes a
rename durable. Every file the package writes whole (checkpoint state, the truncated trajectory log,
config.json) goes through here."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_text", "fsync_dir", "read_text", "DecodeError"]


class DecodeError(ValueError):
    """A text file that is not UTF-8; the message names the file, the line and the byte."""


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a decoding error names the file and line (not just a byte position)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DecodeError(f"{what} {path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")\
            from None


def fsync_dir(path: Path) -> None:
    """fsync a directory: a rename inside it survives a power loss only after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """temp file + fsync + rename: readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
