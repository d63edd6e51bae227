"""MeZO's protocol: the run settings of each task, where MeZO sets them, and the rules that apply them.

Sources are princeton-nlp/MeZO ``large_models/`` (run.py at 7b2471e, utils.py at 9fe98cb, mezo.sh at a0966b5;
file:line). Every setting is a default of a run's config (``data.*``, ``train.objective``) that an explicit value
overrides; :func:`zo_deepspeed.run_config.resolve_run_config` fills them in from the task.

==========================  =======================================================  ===========================
setting                     MeZO                                                     zo_deepspeed default
==========================  =======================================================  ===========================
data.num_train              1000 (mezo.sh:9 TRAIN)                                   Task.default_num_train
data.num_dev                500 (mezo.sh:10); CB and COPA 100 (mezo.sh:27-31)        Task.default_num_dev
data.num_test               1000 (mezo.sh:11 EVAL, run.py --num_eval)                Task.default_num_test
data.test_seed              the run seed when training (run.py:480), 0 for ICL        zo.seed
data.max_length             2048 (run.py:45), at most the model's context             min(2048, model context)
data.max_new_tokens         50 (run.py:81); the prompt keeps max_length - 50          Task.max_new_tokens
                            (utils.py:162-163)
generation stop             the newline token or EOS (run.py:82, 218), then strip      generate_answers
                            (run.py:221)
data.answer_first_line      MeZO scores the whole decoded text (a newline inside a    true: the first line (the
                            longer token such as "\\n\\n" does not stop it)          recipe sets false)
train.objective             classification: CE over the candidates' mean option      Task.resolved_objective()
                            log-likelihoods (mezo.sh:63 --train_as_classification,
                            utils.py:69, 88) = ``choice``; COPA, ReCoRD, SQuAD, DROP:
                            LM loss on the gold option (mezo.sh:26-42, run.py:58
                            only_train_option) = ``loss``
data.bos_token_id           OPT: 0 (run.py:175-176); others: the tokenizer's          bos_rule()
data.boolq_title            no title: Google's BoolQ (tasks.py BoolQDataset)          false (strip SuperGLUE's)
sampling                    numpy permutation under temp_seed (tasks.py               Task.sampler "mezo"
                            Dataset.sample_subset)
==========================  =======================================================  ===========================

The training loop's protocol (20,000 steps, dev every 4,000, the best checkpoint by dev loss, the lr/eps grid) is
the ``mezo`` recipe's (:mod:`zo_deepspeed.recipe`), not a default of ``zo-deepspeed train``, whose default job
is a 40-step demonstration.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from .base import Task
from .registry import get_task
from .encoding import LeadingIds, _leading_special_ids

__all__ = ["MEZO_MAX_LENGTH", "data_defaults", "configured_task", "fit_max_length", "model_context", "bos_rule",
           "encoding_tokenizer"]

MEZO_MAX_LENGTH = 2048  # run.py:45
OPT_BOS_TOKEN_ID = 0    # run.py:175-176


def data_defaults(task: str | Task) -> dict[str, Any]:
    """The data.* values a run of ``task`` takes when they are left null (MeZO's; see the module table)."""
    t = get_task(task)
    return {"num_train": t.default_num_train, "num_dev": t.default_num_dev, "num_test": t.default_num_test,
            "max_length": t.default_max_length, "max_new_tokens": t.max_new_tokens}


def configured_task(data) -> Task:
    """The task of a run's ``data`` section with its per-run options set (BoolQ: ``keep_title``)."""
    task = get_task(data.task)
    opts = {"keep_title": data.boolq_title} if "keep_title" in task.options else {}
    return task.with_options(**opts)


def model_context(model_config) -> int | None:
    """Positions a model takes, from its HF config (max_position_embeddings / n_positions); None if it says not."""
    mc = model_config
    return next((int(getattr(mc, k)) for k in ("max_position_embeddings", "n_positions") if getattr(mc, k, None)),
                None)


def fit_max_length(cfg, model_path: str, *, verbose: bool = True):
    """``cfg`` with a defaulted data.max_length lowered to the model's context where that is shorter: MeZO's
    2048 is "the max length the model can take" (run.py:45, OPT's context). Call it only for a max_length that
    was not set explicitly (an explicit one longer than the context is refused by build.check_model_inputs)."""
    from transformers import AutoConfig

    ctx = model_context(AutoConfig.from_pretrained(model_path))
    if ctx is None or cfg.data.max_length <= ctx:
        return cfg
    if verbose:
        print(f"[zo_deepspeed] data.max_length: the default {cfg.data.max_length} (MeZO's) is longer than the model's "
              f"context; using {ctx}", flush=True)
    return replace(cfg, data=replace(cfg.data, max_length=ctx))


def bos_rule(model_path: str, tokenizer, override: int | None = None) -> list[int] | None:
    """The token each row starts with, where it is not what the tokenizer prepends; None to keep the tokenizer's.

    ``override`` (data.bos_token_id) wins; else MeZO's rule: OPT models start with token 0 instead of the
    tokenizer's BOS 2 (run.py:175-176, "HF tokenizer bug fix"). Only a tokenizer that prepends a token is changed."""
    if not _leading_special_ids(tokenizer):
        return None
    if override is not None:
        return [int(override)]
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(model_path), "model_type", None) == "opt":
        return [OPT_BOS_TOKEN_ID]
    return None


def encoding_tokenizer(tokenizer, model_path: str, override: int | None = None, *, verbose: bool = False):
    """The tokenizer the task encoders use: ``tokenizer``, or a :class:`LeadingIds` view of it (see
    :func:`bos_rule`). The tokenizer itself (what an export saves) is not changed."""
    lead = bos_rule(model_path, tokenizer, override)
    if lead is None or lead == _leading_special_ids(tokenizer):
        return tokenizer
    if verbose:
        print(f"[zo_deepspeed] rows start with token {lead[0]} instead of the tokenizer's "
              f"{_leading_special_ids(tokenizer)[0]}" + (" (MeZO's rule for OPT)" if override is None else ""),
              file=sys.stdout, flush=True)
    return LeadingIds(tokenizer, lead)
