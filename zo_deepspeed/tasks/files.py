"""Local data files: reading one (format by extension; a JSON file's layout by its content: JSON lines, a list of
records, SQuAD's ``{"data": [...]}``, DROP's ``{passage_id: {passage, qa_pairs}}``; a ``datasets``
``save_to_disk`` folder), rows as read-only views with one-line errors, and the task data errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["DATA_EXTENSIONS", "TaskDataError", "TaskFileNotFoundError", "Row", "read_table", "is_saved_dataset"]

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class TaskDataError(ValueError):
    """Bad task input (file, field, label). The message is one line naming the file/field."""


class TaskFileNotFoundError(TaskDataError, FileNotFoundError):
    """A data file or directory does not exist."""


def _is_null(value: Any) -> bool:
    """None, or NaN (what an empty CSV cell becomes)."""
    return value is None or (isinstance(value, float) and value != value)


class Row(Mapping):
    """Read-only view of one data row; ``row[key]`` raises a one-line error for a missing/null value."""

    def __init__(self, data: Mapping[str, Any], task: str, source: str, index: int):
        self._data, self.task, self.source, self.index = data, task, source, index

    def __getitem__(self, key: str) -> Any:
        value = self._data.get(key)
        if _is_null(value):
            raise self.error(f"field '{key}' is missing or null")
        return value

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, default: Any = None) -> Any:
        value = self._data.get(key)
        return default if _is_null(value) else value

    def text(self, key: str) -> str:
        return str(self[key])

    def sub(self, value: Any, what: str) -> "Row":
        """A Row over a nested mapping (``what`` names it in error messages)."""
        if not isinstance(value, Mapping):
            raise self.error(f"{what} is not an object")
        return Row(value, self.task, self.source, self.index)

    def error(self, message: str) -> TaskDataError:
        return TaskDataError(f"{self.task}: row {self.index} of {self.source}: {message}")


def _example_id(row: Row, fallback: Any) -> str:
    for key in ("idx", "id", "guid", "qid"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, Mapping):  # HF MultiRC/ReCoRD idx structs
            return "-".join(str(v) for v in value.values())
        return str(value)
    return str(fallback)


# ----------------------------------------------------------------------------------------- reading files

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


class _Records:
    """Rows built in Python (DROP's official file), with the two things loading reads of a ``datasets.Dataset``."""

    def __init__(self, rows: list[dict]):
        self._rows = rows
        self.column_names = list(dict.fromkeys(k for r in rows for k in r))
        self.num_rows = len(rows)

    def to_list(self) -> list[dict]:
        return [dict(r) for r in self._rows]


def _json_object(path: Path) -> tuple[str, Any] | None:
    """What a file holding one JSON object is: ("squad", None) for SQuAD's ``{"version", "data": [...]}``,
    ("drop", rows) for DROP's official ``{passage_id: {"passage", "qa_pairs", ...}}`` (one row per passage, its id
    as ``section_id``); None for JSON lines, a list of records or one record. An object of nested objects or lists
    that is neither: TaskDataError."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None  # JSON lines
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        return "squad", None
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) and "qa_pairs" in v for v in obj.values()):
        return "drop", [{"section_id": k, **v} for k, v in obj.items()]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, (dict, list)) for v in obj.values()):
        return None  # one record (a one-row JSON file)
    keys = ", ".join(list(obj)[:5])
    raise TaskDataError(f"{path} holds one JSON object (keys: {keys}) that is none of the known layouts: JSON lines "
                        "or a list of records (SuperGLUE, HF datasets exports), SQuAD's {\"data\": [...]}, DROP's "
                        "{passage_id: {\"passage\", \"qa_pairs\"}}")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _bad_line(path: Path) -> str | None:
    """'line N: what' for the first line of a JSON-lines file that is not UTF-8 or not a JSON object."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"line {line}: not UTF-8 text ({e.reason} at byte {e.start})"
    if text.lstrip().startswith("["):
        return None  # a JSON list: the reader's own message
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            return f"line {i}: not JSON ({getattr(e, 'msg', e)}); each line must be one JSON object"
        if not isinstance(obj, dict):
            return f"line {i}: a JSON {type(obj).__name__}, not an object; each line must be one JSON object"
    return None


def read_table(path: str | Path):
    """Load one local data file with ``datasets.load_dataset`` and return the ``datasets.Dataset``.

    Formats by extension: .jsonl/.json (JSON lines, a JSON list, SQuAD's ``{"data": [...]}``, or DROP's official
    ``{passage_id: {...}}``, told apart by content), .csv, .tsv (GLUE: tab-separated, no quoting), .parquet; or a
    ``save_to_disk`` folder. Raises :class:`TaskDataError` (one line) for a missing, empty or unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise TaskFileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise TaskDataError(f"{path} is a datasets DatasetDict folder (save_to_disk): pass it as the data directory "
                                f"(its split folders are found) or load one split folder, e.g. {path}/train")
        if not is_saved_dataset(path):
            raise TaskDataError(f"expected a data file but got a directory: {path}")
        from datasets import load_from_disk
        try:
            ds = load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - report any reader failure as one line
            raise TaskDataError(f"could not read {path} as a datasets save_to_disk folder: {_one_line(exc)}") from exc
        if ds.num_rows == 0:
            raise TaskDataError(f"empty dataset: {path} has no rows")
        return ds
    suffix = path.suffix.lower()
    formats = {".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}),
               ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}), ".parquet": ("parquet", {})}
    if suffix not in formats:
        raise TaskDataError(f"unsupported data file type '{suffix}' for {path} (use one of {', '.join(DATA_EXTENSIONS)})")
    builder, kwargs = formats[suffix]
    if suffix != ".parquet" and _is_blank(path):
        raise TaskDataError(f"empty dataset: {path} has no rows")
    if suffix == ".json":
        layout = _json_object(path)
        if layout and layout[0] == "squad":
            kwargs = dict(kwargs, field="data")
        elif layout and layout[0] == "drop":
            return _Records(layout[1])
    from datasets import load_dataset
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - report any reader failure as one line
        where = _bad_line(path) if builder == "json" else None
        if where:
            raise TaskDataError(f"could not read {path}: {where}") from None
        raise TaskDataError(f"could not read {path} as {builder}: {_one_line(exc)}") from exc
    if ds.num_rows == 0:
        raise TaskDataError(f"empty dataset: {path} has no rows")
    return ds
