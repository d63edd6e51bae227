"""Examples and the task base classes (the registry: :mod:`.registry`; reading local files: :mod:`.files`).

A task turns rows of a local data file (JSONL/JSON/CSV/TSV/parquet, read through ``datasets``)
into :class:`Example` objects. Two kinds exist:

* classification / multiple choice: ``prompt`` plus a list of ``candidates`` (the verbalized
  options, each appended verbatim to the prompt); ``label`` is the gold candidate index. Training
  puts the loss only on the gold candidate's tokens; evaluation scores every candidate.
* generation (SQuAD/DROP style): ``prompt`` plus gold ``answers``; training uses ``target``
  (" " + first answer + "\\n" as in MeZO); evaluation generates and scores F1/EM.

Adding a task takes one file::

    from zo_deepspeed.tasks import ClassificationTask, register_task

    @register_task("my_nli")
    class MyNLI(ClassificationTask):
        layouts = {"default": ("premise", "hypothesis", "label")}
        candidates = ("Yes", "No")
        label_map = {0: 0, 1: 1, "entailment": 0, "not_entailment": 1}

        def render(self, row):
            return f"{row['premise']}\\nDoes this mean that \\"{row['hypothesis']}\\" is true? Yes or No?\\n"
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from . import metrics as _metrics
from .files import (DATA_EXTENSIONS, Row, TaskDataError, TaskFileNotFoundError, _example_id, _is_null,
                    is_saved_dataset, read_table)

SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"validation": "dev", "val": "dev", "valid": "dev", "eval": "dev"}


@dataclass
class Example:
    """One evaluation/training unit.

    id: stable identifier (from the file's idx/id when present).
    prompt: the rendered context; each candidate (or the generation target) is appended verbatim.
    candidates: verbalized options (classification / multiple choice); empty for generation.
    label: gold candidate index (None when unlabeled or for generation).
    answers: gold answers (generation; ReCoRD also lists its gold entities here).
    alt_labels: further candidate indices that also count as correct (ReCoRD entity aliases).
    target: training target text for generation (default " " + answers[0]).
    train_label: the candidate trained on and shown as a demonstration, where it is not ``label``
        (ReCoRD: MeZO trains on the first gold answer in sorted order, run.py ``correct_candidate[0]``).
    """
    id: str
    prompt: str
    candidates: list[str] = field(default_factory=list)
    label: int | None = None
    answers: list[str] = field(default_factory=list)
    alt_labels: tuple[int, ...] = ()
    target: str | None = None
    task: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    train_label: int | None = None

    @property
    def kind(self) -> str:
        return "classification" if self.candidates else "generation"

    @property
    def context(self) -> str:
        """Alias of :attr:`prompt`."""
        return self.prompt

    @property
    def gold_labels(self) -> tuple[int, ...]:
        """All candidate indices counted as correct (empty if unlabeled)."""
        if self.label is None:
            return ()
        return (self.label,) + tuple(i for i in self.alt_labels if i != self.label)

    def target_text(self) -> str:
        """Text appended to the prompt for training: the gold candidate, or the generation target."""
        if self.candidates:
            if self.label is None:
                raise TaskDataError(f"example {self.id} ({self.task or 'task'}) has no gold label to train on")
            return self.candidates[self.label if self.train_label is None else self.train_label]
        if self.target is not None:
            return self.target
        if not self.answers:
            raise TaskDataError(f"example {self.id} ({self.task or 'task'}) has no gold answer to train on")
        return " " + self.answers[0]


def _label_key(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip().lower()
        return int(s) if re.fullmatch(r"-?\d+", s) else s
    return value


# ----------------------------------------------------------------------------------------- tasks

class Task:
    """Base class. Subclasses set ``layouts`` and implement :meth:`examples_from_row`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"  # primary metric key returned by score()
    #: accepted file layouts: name -> required columns; the first is the standard one
    layouts: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: column holding the gold label/answers; not required when loading with require_labels=False
    label_field: ClassVar[str | None] = "label"
    #: further label/answer columns that are optional when loading with require_labels=False
    extra_label_fields: ClassVar[tuple[str, ...]] = ()
    #: canonical column -> alternative names accepted (renamed on load when the canonical one is absent)
    field_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: file stems tried for each split inside a data directory
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("train",), "dev": ("val", "validation", "dev"), "test": ("test",)}
    #: MeZO protocol: test examples come from the labeled dev/validation file; dev from the train file
    test_source: ClassVar[str] = "dev"
    dev_source: ClassVar[str] = "train"
    # MeZO's run settings, the defaults of a run's data.* and train.objective (their MeZO sources:
    # zo_deepspeed/tasks/protocol.py)
    default_num_train: ClassVar[int] = 1000
    default_num_dev: ClassVar[int] = 500
    default_num_test: ClassVar[int] = 1000
    default_max_length: ClassVar[int] = 2048
    #: None: "choice" for classification, "loss" for generation
    default_objective: ClassVar[str | None] = None
    #: generation only: greedy tokens decoded (MeZO: 50), stopping at the newline token or EOS
    max_new_tokens: ClassVar[int] = 50
    #: between in-context demonstrations (MeZO: Dataset.train_sep)
    demo_separator: ClassVar[str] = "\n\n"
    #: how build_splits draws subsets: "mezo" (a numpy permutation of the file's rows seeded with the run seed,
    #: as MeZO's Dataset.sample_subset, so a seed picks the same examples) or "python" (random.Random)
    sampler: ClassVar[str] = "mezo"
    #: names :meth:`with_options` accepts (per-run switches of how rows become examples)
    options: ClassVar[tuple[str, ...]] = ()

    def resolved_objective(self) -> str:
        """The training objective of ``train.objective=auto`` for this task."""
        return self.default_objective or ("choice" if self.kind == "classification" else "loss")

    def with_options(self, **options: Any) -> "Task":
        """A copy of this (registered, shared) task with per-run options set, e.g. BoolQ's ``keep_title``."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"task {self.name} has no option {unknown[0]!r} (options: {', '.join(self.options) or 'none'})")
        if all(getattr(self, k) == v for k, v in options.items()):
            return self
        clone = copy.copy(self)
        for k, v in options.items():
            setattr(clone, k, v)
        return clone

    def demonstration(self, example: Example) -> str:
        """The example with its gold option or answer, as an in-context demonstration (MeZO utils.py:124:
        ``template.verbalize(sample, correct_candidate).strip()``)."""
        return (example.prompt + example.target_text()).strip()

    def calibration_prompt(self, example: Example) -> str:
        """What precedes each candidate when scoring its calibration (surface-form competition) term: MeZO's
        ``template.encode_sfc``; empty for most templates."""
        if self.kind != "classification":
            raise ValueError(f"{self.name}: calibration scores candidates; generation tasks have none "
                             "(MeZO raises NotImplementedError for SQuAD/DROP)")
        return ""

    # -- rows -> examples -------------------------------------------------------------------------
    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        raise NotImplementedError

    # -- loading ----------------------------------------------------------------------------------
    def _resolve_columns(self, columns: Sequence[str]) -> dict[str, str]:
        """canonical name -> actual column for aliases that apply."""
        rename = {}
        present = set(columns)
        for canonical, alternatives in self.field_aliases.items():
            if canonical in present:
                continue
            for alt in alternatives:
                if alt in present:
                    rename[canonical] = alt
                    break
        return rename

    def _match_layout(self, columns: Sequence[str], source: str, require_labels: bool) -> str:
        if not self.layouts:
            return "default"
        present = set(columns)
        best: tuple[int, str, list[str]] | None = None
        for name, fields in self.layouts.items():
            needed = [f for f in fields
                      if require_labels or (f != self.label_field and f not in self.extra_label_fields)]
            missing = [f for f in needed if f not in present]
            if not missing:
                return name
            if best is None or len(missing) < best[0]:
                best = (len(missing), name, missing)
        assert best is not None
        missing = best[2]
        what = f"field '{missing[0]}'" if len(missing) == 1 else "fields " + ", ".join(f"'{m}'" for m in missing)
        raise TaskDataError(f"{self.name}: {source} is missing {what} (found columns: {', '.join(columns)})")

    def load_file(self, path: str | Path, *, require_labels: bool = True) -> list[Example]:
        """Read one local file in the task's standard layout into examples."""
        ds = read_table(path)
        source = str(path)
        columns = list(ds.column_names)
        rename = self._resolve_columns(columns)
        layout = self._match_layout(columns + list(rename), source, require_labels)
        examples: list[Example] = []
        for index, data in enumerate(ds.to_list()):
            for canonical, actual in rename.items():
                data[canonical] = data[actual]
            examples.extend(self.examples_from_row(Row(data, self.name, source, index), layout=layout,
                                                   require_label=require_labels))
        if not examples:
            raise TaskDataError(f"{self.name}: empty dataset: {source} yields no usable examples")
        return examples

    def find_split_file(self, split: str, data_dir: str | Path) -> Path:
        split = normalize_split(split)
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise TaskFileNotFoundError(f"{self.name}: data directory not found: {data_dir}")
        stems = self.split_files.get(split, (split,))
        for stem in stems:
            found = [data_dir / f"{stem}{ext}" for ext in DATA_EXTENSIONS if (data_dir / f"{stem}{ext}").is_file()]
            if len(found) > 1:  # never pick one of two silently
                raise TaskDataError(f"{self.name}: {data_dir} holds {' and '.join(f.name for f in found)} for the "
                                    f"{split} split; keep one of them")
            if found:
                return found[0]
            if is_saved_dataset(data_dir / stem):  # datasets' save_to_disk: a split folder (or a DatasetDict's)
                return data_dir / stem
        tried = "|".join(stems)
        raise TaskFileNotFoundError(f"{self.name}: no {split} file in {data_dir} "
                                    f"(looked for {{{tried}}}{{{'|'.join(DATA_EXTENSIONS)}}}, or a datasets "
                                    f"save_to_disk folder {{{tried}}}/)")

    def load_split(self, split: str, data_dir: str | Path | None = None, *,
                   require_labels: bool = True) -> list[Example]:
        """Examples of one split ('train', 'dev' or 'test') from ``data_dir``."""
        if data_dir is None:
            raise TaskDataError(f"{self.name}: no built-in data; pass data_dir with {self.name}'s train/val files "
                                f"in the standard layout")
        return self.load_file(self.find_split_file(split, data_dir), require_labels=require_labels)

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> dict[str, float]:
        raise NotImplementedError

    def objective(self, examples: Sequence[Example], predictions: Sequence[Any]) -> float:
        """The primary metric (higher is better); plain Python, usable as a non-differentiable objective."""
        return self.score(examples, predictions)[self.metric]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} task '{self.name}' ({self.kind})>"


class ClassificationTask(Task):
    """Fixed or per-row candidates; ``label_map`` maps raw label values to candidate indices.

    Label values are normalized before lookup: booleans -> 0/1, numeric strings -> int,
    other strings -> stripped lower case. Keys of ``label_map`` should use these normalized forms.
    """

    kind: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"
    candidates: ClassVar[tuple[str, ...]] = ()
    label_map: ClassVar[dict[Any, int]] = {}
    #: raw label values meaning "unlabeled" (GLUE/SuperGLUE test files use -1)
    unlabeled_values: ClassVar[tuple[Any, ...]] = (-1,)

    def render(self, row: Row) -> str:
        raise NotImplementedError

    def row_candidates(self, row: Row) -> list[str]:
        return list(self.candidates)

    def parse_label(self, row: Row, value: Any = None, *, require_label: bool = True) -> int | None:
        raw = row.get(self.label_field) if _is_null(value) else value
        key = None if _is_null(raw) else _label_key(raw)
        if key is None or key in self.unlabeled_values:
            if require_label:
                if raw is None:
                    raise row.error(f"field '{self.label_field}' is missing or null")
                raise row.error(f"label {raw!r} marks an unlabeled row; load with require_labels=False")
            return None
        if isinstance(raw, bool) and "true" not in self.label_map:  # True -> 1 is a guess (RTE: 0 = entailment)
            known = ", ".join(repr(k) for k in self.label_map)
            raise row.error(f"label {str(raw).lower()} (a boolean) has no meaning for {self.name}: write one of "
                            f"{known}")
        try:
            return self.label_map[key]
        except (KeyError, TypeError):
            known = ", ".join(repr(k) for k in self.label_map)
            raise row.error(f"label {raw!r} is not in the verbalizer (expected one of {known})") from None

    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        label = self.parse_label(row, require_label=require_label)
        return [Example(id=_example_id(row, row.index), prompt=self.render(row), candidates=self.row_candidates(row),
                        label=label, task=self.name, meta={"source": row.source, "row": row.index})]

    def score(self, examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
        golds = []
        for ex in examples:
            if ex.label is None:
                raise TaskDataError(f"{self.name}: example {ex.id} has no gold label to score against")
            golds.append(ex.gold_labels)
        return {"accuracy": _metrics.accuracy(list(predictions), golds)}


class GenerationTask(Task):
    """Free-form answers (SQuAD/DROP style), scored with SQuAD-normalized F1 and exact match."""

    kind: ClassVar[str] = "generation"
    metric: ClassVar[str] = "f1"
    label_field: ClassVar[str | None] = "answers"
    target_suffix: ClassVar[str] = "\n"  # MeZO trains on " {answer}\n" so generation learns to stop
    stop_sequence: ClassVar[str] = "\n"

    def render(self, row: Row) -> str:
        raise NotImplementedError

    def row_answers(self, row: Row, layout: str) -> list[str]:
        raise NotImplementedError

    def make_example(self, row: Row, ex_id: str, prompt: str, answers: list[str],
                     require_label: bool) -> list[Example]:
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        if not answers and require_label:
            raise row.error(f"example {ex_id} has no gold answer")
        target = " " + answers[0].strip() + self.target_suffix if answers else None
        return [Example(id=ex_id, prompt=prompt, answers=answers, target=target, task=self.name,
                        meta={"source": row.source, "row": row.index})]

    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        answers = self.row_answers(row, layout) if (require_label or row.get(self.label_field) is not None) else []
        return self.make_example(row, _example_id(row, row.index), self.render(row), answers, require_label)

    def postprocess(self, generated: str) -> str:
        """Cut a raw generation at the stop sequence and strip it."""
        return postprocess_generation(generated, self.stop_sequence)

    def score(self, examples: Sequence[Example], predictions: Sequence[str], *, raw: bool = True) -> dict[str, float]:
        """F1 and EM. ``raw``: ``predictions`` are raw continuations, cut at the first stop sequence first; False:
        they are final answers already (what :func:`~zo_deepspeed.tasks.generate_answers` returns: decoded up to
        the newline token or EOS and stripped, MeZO's rule), scored as they are."""
        preds = [self.postprocess(p) for p in predictions] if raw else [str(p).strip() for p in predictions]
        golds = []
        for ex in examples:
            if not ex.answers:
                raise TaskDataError(f"{self.name}: example {ex.id} has no gold answers to score against")
            golds.append(ex.answers)
        return {"f1": _metrics.mean_squad_f1(preds, golds), "exact_match": _metrics.mean_exact_match(preds, golds)}


def postprocess_generation(generated: str, stop: str | None = "\n") -> str:
    """Cut ``generated`` at the first ``stop`` (after leading whitespace) and strip it."""
    text = generated.lstrip()
    if stop:
        text = text.split(stop, 1)[0]
    return text.strip()


def normalize_split(split: str) -> str:
    s = split.strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in SPLITS:
        raise ValueError(f"unknown split {split!r} (use train, dev/validation or test)")
    return s
