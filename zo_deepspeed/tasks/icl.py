"""In-context learning and calibration: the zero-shot and ICL rows of MeZO's Table 1, rendered as MeZO's
``encode_prompt`` renders them (utils.py:124-146).

* :func:`demo_sets`: one set of k demonstrations per evaluation example, drawn from the whole train split as MeZO
  does without ``train_set_seed`` (tasks.py ``Dataset.sample_train_sets``): per-example seeds
  ``RandomState(seed).randint(0, 10000, n)`` (MeZO: ``temp_seed(0)``), then each set the first k of
  ``RandomState(example seed).permutation(len(train))``.
* :func:`icl_examples`: each example's prompt after its demonstrations: every demonstration is its prompt and gold
  option (or answer), stripped, joined by the task's separator ("\\n\\n") and stripped; then the separator, the
  prompt, and the whole left-stripped (utils.py:124-125, 146). With k = 0 this is the zero-shot prompt.
* :func:`calibration_examples`: the calibration (surface-form competition) rows: each candidate after the
  template's calibration prompt, without (``sfc``, utils.py:141-143) or after the demonstrations (``icl_sfc``,
  utils.py:146). A candidate's calibrated score is the sum of its option-token log-likelihoods given the prompt
  minus that given the calibration prompt (run.py one_step_pred); uncalibrated candidates are compared by the mean
  (length-normalized) log-likelihood.

One deliberate difference: MeZO tokenizes each prompt and its option as one string; zo_deepspeed tokenizes them
separately (the option tokens are then the same in every example; see the README).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .base import Example, Task

__all__ = ["demo_sets", "icl_prompt", "icl_examples", "calibration_examples", "CALIBRATIONS"]

CALIBRATIONS = ("none", "sfc", "icl_sfc")


def demo_sets(pool_size: int, n_eval: int, k: int, seed: int = 0) -> list[list[int]]:
    """Indices into the train pool of each evaluation example's k demonstrations (MeZO's rule, see above)."""
    if k <= 0:
        return [[] for _ in range(n_eval)]
    if pool_size < 1:
        raise ValueError("in-context demonstrations need a train split with examples")
    import numpy as np

    seeds = np.random.RandomState(seed).randint(0, 10000, n_eval)
    return [np.random.RandomState(int(s)).permutation(pool_size)[:k].tolist() for s in seeds]


def _shots(task: Task, demos: Sequence[Example]) -> str:
    return task.demo_separator.join(task.demonstration(d) for d in demos).strip()


def icl_prompt(task: Task, demos: Sequence[Example], prompt: str) -> str:
    """``prompt`` after the demonstrations, as MeZO's encode_prompt joins them (utils.py:124-125, 146)."""
    return (_shots(task, demos) + task.demo_separator + prompt).lstrip()


def icl_examples(task: Task, examples: Sequence[Example], pool: Sequence[Example] = (), k: int = 0,
                 seed: int = 0) -> tuple[list[Example], list[list[Example]]]:
    """(the examples with their demonstrations prepended, each example's demonstrations)."""
    sets = demo_sets(len(pool), len(examples), k, seed)
    demos = [[pool[j] for j in s] for s in sets]
    return [replace(ex, prompt=icl_prompt(task, d, ex.prompt)) for ex, d in zip(examples, demos)], demos


def calibration_examples(task: Task, examples: Sequence[Example], demos: Sequence[Sequence[Example]] | None = None,
                         mode: str = "sfc") -> list[Example]:
    """Each example with its prompt replaced by the calibration prompt: alone (``sfc``: MeZO's ``--sfc``) or after
    the example's demonstrations (``icl_sfc``: MeZO's ``--icl_sfc``)."""
    if mode not in ("sfc", "icl_sfc"):
        raise ValueError(f"calibration mode must be sfc or icl_sfc, got {mode!r}")
    out = []
    for i, ex in enumerate(examples):
        cal = task.calibration_prompt(ex)
        if mode == "icl_sfc":
            cal = icl_prompt(task, demos[i] if demos else (), cal)
        out.append(replace(ex, prompt=cal))
    return out
