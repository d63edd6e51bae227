"""The output guard: every writer (train's run directory, export, replay, plot) asks here before it
writes, so that no command destroys a user's files.

Rules, for a target path:

* an empty path, the current directory (or one of its parents) and the root are refused: a run or an
  export written there by accident would mix with the user's own files;
* a target that exists and is not empty is written only if it is one of this project's own outputs:
  a run directory (``trajectory.jsonl``/``config.json`` written by the trainer), an HF folder written by
  :func:`zo_deepspeed.checkpoint.export_hf` (it carries :data:`MARKER`), a run's ``export/``, or a plot
  file of the format its suffix names; a model folder (``config.json`` + weights) is never a target;
* a target that is, contains or lies inside a path the command reads (``--model``, ``--log``,
  ``--run-dir``) is refused where replacing it would delete that input;
* writers write to a temporary sibling and rename it into place (export_hf, plot, the run's files).

Each refusal is an :class:`OutputRefused` (a ValueError: the CLI prints it as one line, exit 2) that
names the target and the fix. Nothing here writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["OutputRefused", "MARKER", "check_run_dir", "check_output_dir", "check_output_file", "is_run_dir",
           "is_model_folder", "is_own_export", "marker_text", "show_setting", "RUN_DIR_LEFTOVERS"]

MARKER = ".zo_deepspeed_output.json"  # written into every HF folder export_hf writes
# what a run start leaves before its config.json exists (the lock, DeepSpeed's monitors)
RUN_DIR_LEFTOVERS = (".lock", "monitor")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
PLOT_FORMATS = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".svg": (b"<?xml", b"<svg")}


class OutputRefused(ValueError):
    """A write that would overwrite or mix with files this project did not write; the message names the fix."""


def marker_text(what: str, **info) -> str:
    """The content of :data:`MARKER` for an output of kind ``what`` (export, replay)."""
    return json.dumps({"written_by": "zo_deepspeed", "what": what, **info}) + "\n"


def _entries(p: Path) -> list[str]:
    try:
        return sorted(e.name for e in p.iterdir())
    except OSError:
        return []


def is_model_folder(p: Path) -> bool:
    """An HF model folder: config.json next to weight files."""
    p = Path(p)
    return (p / "config.json").is_file() and any((p / w).exists() for w in WEIGHT_FILES)


def is_own_export(p: Path) -> bool:
    """An HF folder written by export_hf (marker), or a run directory's ``export/``."""
    p = Path(p)
    if (p / MARKER).is_file():
        return True
    return p.name == "export" and is_run_dir(p.parent)


def _json_head(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def is_run_dir(p: Path) -> bool:
    """A directory a zo-deepspeed training run wrote: its trajectory log's header, or its config.json
    (which holds the resolved ds_config), or only what a start leaves before those exist."""
    from .trajectory import FORMAT

    p = Path(p)
    if not p.is_dir():
        return False
    head = _json_head(p / "trajectory.jsonl")
    if isinstance(head, dict) and head.get("format") == FORMAT:
        return True
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and "resolved_ds_config" in cfg:
            return True
    except (OSError, ValueError):
        pass
    names = _entries(p)
    return bool(names) and set(names) <= set(RUN_DIR_LEFTOVERS)


def show_setting(key: str, value) -> str:
    """How the user wrote the setting: ``section.key=value`` or ``--flag value``."""
    return f"{key} {value}" if key.startswith("--") else f"{key}={value}"


def _example(key: str) -> str:
    return f"{key} runs/my_run" if key.startswith("--") else f"{key}=runs/my_run"


def _blank_or_cwd(path: str | os.PathLike, key: str) -> Path:
    text = os.fspath(path)
    if not text.strip():
        raise OutputRefused(f"{key} is empty: that would write into the current directory; name a new folder "
                            f"(e.g. {_example(key)})")
    p = Path(os.path.abspath(Path(text).expanduser()))  # normalised: "runs/.." is the current directory
    at = show_setting(key, text)
    cwd = Path(os.path.abspath(Path.cwd()))
    if p == cwd or p in cwd.parents or p == Path(p.anchor):
        raise OutputRefused(f"{at} is the current directory (or a parent of it): the output would mix "
                            f"with the files there; name a new folder inside it (e.g. {_example(key)})")
    return p


def _same_or_nested(a: Path, b: Path) -> str | None:
    """How ``a`` (a target) relates to ``b`` (an input): 'is', 'contains' or None."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    return None


def check_run_dir(path: str | os.PathLike, *, resume: bool = False, key: str = "train.output_dir") -> Path:
    """The run directory ``path`` of a training run, checked: a new or empty folder, or a run directory
    of this project (whether it may be continued is the trainer's check: --resume)."""
    p = _blank_or_cwd(path, key)
    at = show_setting(key, path)
    if resume and Path(path).expanduser().absolute() == Path.cwd().absolute() and is_run_dir(p):
        return p  # `cd runs/x && zo-deepspeed train --resume train.output_dir=.`
    if p.exists() and not p.is_dir():
        raise OutputRefused(f"{at} is a file, not a folder; pick a new folder for the run")
    if not p.exists() or not _entries(p) or is_run_dir(p):
        return p
    if is_model_folder(p):
        raise OutputRefused(f"{at} is a model folder (config.json and weights): a run written there would "
                            f"overwrite its config.json; pick a new folder (e.g. {key}=runs/my_run)")
    raise OutputRefused(f"{at} is not empty and is not a zo-deepspeed run directory; pick a new or empty "
                        "folder for the run")


def check_output_dir(path: str | os.PathLike, key: str, inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Path:
    """An HF output folder (export, replay): new, empty, or one export_hf wrote; never one of ``inputs``
    ((name, path) pairs: the model, the log, the run directory) nor a folder holding one of them."""
    p = _blank_or_cwd(path, key)
    at = show_setting(key, path)
    for name, src in inputs:
        rel = _same_or_nested(p, Path(src))
        if rel == "is":
            raise OutputRefused(f"{at} is the {name}: writing it would replace that input; pass a "
                                f"new folder for {key}")
        if rel:
            raise OutputRefused(f"{at} contains the {name} {src}: writing it would delete that "
                                f"input; pass a new folder for {key}")
    if p.exists() and not p.is_dir():
        raise OutputRefused(f"{at} is a file, not a folder; pass a new folder for {key}")
    if p.exists() and _entries(p) and not is_own_export(p):
        kind = "a model folder" if is_model_folder(p) else "not empty"
        raise OutputRefused(f"{at} is {kind} and was not written by zo-deepspeed export or replay: writing "
                            f"it would delete its files; pass a new or empty folder for {key}")
    return p


def check_output_file(path: str | os.PathLike, key: str, inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Path:
    """A plot file: suffix .png/.pdf/.svg; an existing file is replaced only if it is such a file already."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputRefused(f"{key} is empty; name the image file to write (e.g. {key} curves.png)")
    p = Path(text).expanduser().absolute()
    at = show_setting(key, path)
    if p.is_dir():
        raise OutputRefused(f"{at} is a directory; pass a file name such as {Path(text) / 'curves.png'}")
    for name, src in inputs:
        if _same_or_nested(p, Path(src)):
            raise OutputRefused(f"{at} is the {name}; pass a new file name for {key}")
    suffix = p.suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise OutputRefused(f"{at}: unknown image type {p.suffix or '(no suffix)'!r}; end the name in "
                            f"{', '.join(PLOT_FORMATS)}")
    if p.exists():
        try:
            with open(p, "rb") as f:
                head = f.read(512)
        except OSError:
            head = b""
        if not any(head.lstrip().startswith(m) for m in PLOT_FORMATS[suffix]):
            raise OutputRefused(f"{at} exists and is not a {suffix[1:].upper()} image: writing it would "
                                f"destroy it; pass a new file name for {key}")
    if not p.parent.is_dir():
        raise OutputRefused(f"{at}: folder {p.parent} does not exist; create it or pass another path")
    return p
