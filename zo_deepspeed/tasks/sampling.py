"""Seeded sampling of training/dev/test sets (MeZO protocol: 1,000 train / 500 dev / 1,000 test).

Two ways to draw a subset (``method``): ``"mezo"`` takes the first n of ``numpy.random.RandomState(seed)
.permutation(len(rows))``, which is what MeZO's ``Dataset.sample_subset`` draws under ``temp_seed(seed)``: on the
same files (same row order) and seed, the same examples as MeZO. ``"python"`` shuffles with ``random.Random(seed)``
(the built-in rotten_tomatoes task keeps it). Every helper uses its own generator; nothing touches the global RNGs.
"""
from __future__ import annotations

import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from .base import Example, Task, TaskDataError
from .registry import get_task


def permutation(n: int, seed: int, method: str = "python") -> list[int]:
    """A seeded permutation of range(n): ``method`` "mezo" (numpy's legacy RandomState, as MeZO) or "python"."""
    if method == "mezo":
        import numpy as np

        return np.random.RandomState(seed).permutation(n).tolist()
    if method != "python":
        raise ValueError(f"sampling method must be 'mezo' or 'python', got {method!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def sample_examples(examples: Sequence[Example], n: int | None, seed: int, method: str = "python") -> list[Example]:
    """``n`` examples drawn without replacement (all of them, shuffled, if ``n`` is None or too large)."""
    order = permutation(len(examples), seed, method)
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        order = order[:n]
    return [examples[i] for i in order]


def sample_per_class(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` examples per gold label (classification), shuffled. Warns if a class has fewer than ``k``."""
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    by_label: dict[int, list[Example]] = defaultdict(list)
    for ex in examples:
        if ex.label is None:
            raise TaskDataError(f"sample_per_class needs labeled classification examples; {ex.id} has no label")
        by_label[ex.label].append(ex)
    rng = random.Random(seed)
    out: list[Example] = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < k:
            warnings.warn(f"class {label} has only {len(pool)} examples (< k={k}); taking all of them", stacklevel=2)
        out.extend(rng.sample(pool, min(k, len(pool))))
    rng.shuffle(out)
    return out


def split_train_dev(pool: Sequence[Example], num_train: int | None, num_dev: int, seed: int, method: str = "python"
                    ) -> tuple[list[Example], list[Example]]:
    """MeZO: permute the pool with ``seed``, take ``num_train + num_dev``; the last ``num_dev`` are dev.

    If the pool is smaller, dev still gets ``num_dev`` and train gets the rest (with a warning).
    """
    if num_dev < 0:
        raise ValueError(f"num_dev must be >= 0, got {num_dev}")
    want = None if num_train is None else num_train + num_dev
    picked = sample_examples(pool, want, seed, method)
    if num_dev and len(picked) <= num_dev:
        raise TaskDataError(f"only {len(pool)} examples available: not enough for {num_dev} dev examples and a train set")
    if want is not None and len(picked) < want:
        warnings.warn(f"num_train + num_dev = {want} > {len(pool)} available examples; "
                      f"train gets {len(picked) - num_dev}", stacklevel=2)
    cut = len(picked) - num_dev
    return picked[:cut], picked[cut:]


def build_splits(task: str | Task, data_dir: str | Path | None = None, *, seed: int = 0,
                 num_train: int | None = 1000, num_dev: int | None = None, num_test: int | None = 1000,
                 k_per_class: int | None = None, test_seed: int = 0, method: str | None = None
                 ) -> dict[str, list[Example]]:
    """Train/dev/test example lists following MeZO's protocol (``method``: the task's ``sampler`` by default).

    * train/dev: if the task's ``dev_source`` is "train" (GLUE/SuperGLUE/SQuAD/DROP, whose test
      labels are hidden), ``num_train + num_dev`` examples are drawn from the train file with
      ``seed`` and the last ``num_dev`` become dev (MeZO: ``sample_train_sets`` with ``train_set_seed``);
      otherwise (rotten_tomatoes) train is drawn from the train split and dev from the dev split.
    * test: ``num_test`` examples drawn with ``test_seed`` from the task's ``test_source`` split (the
      labeled validation file for SuperGLUE). MeZO draws them with the run's seed when it trains (run.py:480)
      and with 0 for zero-shot/ICL; a run passes ``data.test_seed``, which defaults to ``zo.seed``.
    * ``k_per_class``: few-shot mode; train (and dev, unless num_dev == 0) get k examples per class.
    * ``num_dev=None`` uses the task's default (500; 100 for CB and COPA). ``None`` for num_train /
      num_test means all.
    """
    task = get_task(task)
    method = method or task.sampler
    if num_dev is None:
        num_dev = task.default_num_dev
    train_pool = task.load_split("train", data_dir)
    rng_seed_dev = seed + 1_000_003  # distinct stream for the separate dev pool
    if task.dev_source == "train":
        if k_per_class:
            train = sample_per_class(train_pool, k_per_class, seed)
            taken = {id(ex) for ex in train}
            rest = [ex for ex in train_pool if id(ex) not in taken]
            dev = sample_per_class(rest, k_per_class, rng_seed_dev) if num_dev else []
        else:
            train, dev = split_train_dev(train_pool, num_train, num_dev, seed, method)
    else:
        train = (sample_per_class(train_pool, k_per_class, seed) if k_per_class
                 else sample_examples(train_pool, num_train, seed, method))
        if not num_dev:
            dev = []
        else:
            dev_pool = task.load_split(task.dev_source, data_dir)
            dev = (sample_per_class(dev_pool, k_per_class, rng_seed_dev) if k_per_class
                   else sample_examples(dev_pool, num_dev, rng_seed_dev, method))
    test = sample_examples(task.load_split(task.test_source, data_dir), num_test, test_seed, method)
    return {"train": train, "dev": dev, "test": test}
