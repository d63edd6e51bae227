"""Tokenization helpers for the trainer: training batches, candidate scoring batches, generation prompts.

Token layout of one row: [tokenizer's leading special token, if it adds one (e.g. BOS)] + prompt
tokens + option tokens. Prompt and option are tokenized separately (no special tokens) and
concatenated, so the option tokens are exactly the option's own tokens. Too-long rows lose prompt
tokens from the left, the leading special token kept (MeZO utils.py:167-170); the option is never truncated.
:func:`truncation_report` counts the rows that lose tokens. A row with neither a leading special token nor
prompt tokens (an empty calibration prompt) gets the tokenizer's BOS (else EOS) as its one context token, so
that its first option token is scored too. Batches are right-padded to the longest row, never to
``max_length`` (``labels`` = -100 on prompt and padding, i.e. the loss is only on the option tokens, as MeZO's
``only_train_option``). ``labels`` are aligned with ``input_ids`` (the model shifts them).
"""
from __future__ import annotations

from typing import Any, Sequence

from .base import Example, TaskDataError, postprocess_generation

IGNORE_INDEX = -100


class LeadingIds:
    """A tokenizer whose rows start with ``ids`` instead of what the tokenizer prepends (MeZO sets OPT's BOS to 0,
    run.py:175-176): everything else is the wrapped tokenizer's. The wrapped tokenizer itself is left as it is
    (an export saves it unchanged)."""

    def __init__(self, tokenizer, ids: Sequence[int]):
        self._tokenizer = tokenizer
        self.leading_ids = list(ids)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def _leading_special_ids(tokenizer) -> list[int]:
    """[bos] if the tokenizer prepends its BOS token by default, else [] (a :class:`LeadingIds` says itself)."""
    if isinstance(tokenizer, LeadingIds):
        return list(tokenizer.leading_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _start_ids(tokenizer) -> list[int]:
    """The one context token of a row that would otherwise have none: BOS, else EOS."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return [int(value)]
    raise ValueError("an empty prompt needs a context token, and the tokenizer has neither BOS nor EOS")


def _join(prefix: list[int], prompt_ids: list[int], option_ids: list[int], max_length: int, ex: Example,
          option: str) -> list[int]:
    if not option_ids:
        raise TaskDataError(f"example {ex.id} ({ex.task}): option {option!r} encodes to no tokens")
    budget = max_length - len(prefix) - len(option_ids)
    if budget < 1 and not prefix:
        budget_msg = f"{len(option_ids)} tokens + at least 1 prompt token"
    elif budget < 0:
        budget_msg = f"{len(option_ids)} tokens + {len(prefix)} special"
    else:
        budget_msg = ""
    if budget_msg:
        raise TaskDataError(f"example {ex.id} ({ex.task}): the option alone needs {budget_msg}, more than "
                            f"max_length={max_length}; raise max_length")
    if len(prompt_ids) > budget:
        prompt_ids = prompt_ids[len(prompt_ids) - budget:] if budget > 0 else []
    return prefix + prompt_ids + option_ids


def _collate(rows: Sequence[tuple[list[int], int]], pad_id: int, pad_to_multiple_of: int | None,
             return_tensors: str | None) -> dict[str, Any]:
    if not rows:
        raise ValueError("nothing to encode: no examples")
    width = max(len(ids) for ids, _ in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, attention_mask, labels = [], [], []
    for ids, n_option in rows:
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        attention_mask.append([1] * len(ids) + [0] * pad)
        labels.append([IGNORE_INDEX] * (len(ids) - n_option) + ids[len(ids) - n_option:] + [IGNORE_INDEX] * pad)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if return_tensors == "pt":
        import torch
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    elif return_tensors is not None:
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    return batch


def encode_for_training(tokenizer, examples: Sequence[Example], max_length: int, *,
                        pad_to_multiple_of: int | None = None, return_tensors: str | None = "pt") -> dict[str, Any]:
    """One row per example: prompt + gold option (classification) or prompt + target (generation).

    Returns ``dict(input_ids, attention_mask, labels)`` (LongTensors [n, longest]); labels are -100
    everywhere except the gold option's / target's tokens.
    """
    prefix = _leading_special_ids(tokenizer)
    targets = [ex.target_text() for ex in examples]
    prompt_ids = _tokenize(tokenizer, [ex.prompt for ex in examples])
    target_ids = _tokenize(tokenizer, targets)
    start = [] if prefix or all(prompt_ids) else _start_ids(tokenizer)
    rows = []
    for ex, p, t, text in zip(examples, prompt_ids, target_ids, targets):
        rows.append((_join(prefix or (start if not p else []), p, t, max_length, ex, text), len(t)))
    return _collate(rows, _pad_id(tokenizer), pad_to_multiple_of, return_tensors)


def encode_candidates(tokenizer, examples: Sequence[Example], max_length: int, *,
                      pad_to_multiple_of: int | None = None, return_tensors: str | None = "pt"
                      ) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """One row per (example, candidate), for scoring. Returns ``(batch, mapping)`` where
    ``mapping[row] = (example index, candidate index)``; labels cover only that candidate's tokens."""
    prefix = _leading_special_ids(tokenizer)
    prompt_ids = _tokenize(tokenizer, [ex.prompt for ex in examples])
    flat_options, mapping = [], []
    for i, ex in enumerate(examples):
        if not ex.candidates:
            raise TaskDataError(f"example {ex.id} ({ex.task}) has no candidates to score (generation task?)")
        for j, cand in enumerate(ex.candidates):
            flat_options.append(cand)
            mapping.append((i, j))
    # tokenize each distinct option once (fixed verbalizers repeat across examples)
    distinct = list(dict.fromkeys(flat_options))
    option_ids = dict(zip(distinct, _tokenize(tokenizer, distinct)))
    start = [] if prefix or all(prompt_ids) else _start_ids(tokenizer)
    rows = []
    for (i, j), cand in zip(mapping, flat_options):
        ids = option_ids[cand]
        lead = prefix or (start if not prompt_ids[i] else [])
        rows.append((_join(lead, prompt_ids[i], ids, max_length, examples[i], cand), len(ids)))
    return _collate(rows, _pad_id(tokenizer), pad_to_multiple_of, return_tensors), mapping


def sequence_losses(logits, labels):
    """Mean token cross-entropy per row over positions whose label is not -100 (causal shift applied).

    ``logits`` [rows, seq, vocab], ``labels`` [rows, seq] -> float32 tensor [rows]. Only the labeled
    positions' logits are gathered before the softmax, so memory stays small for large vocabularies.
    """
    import torch
    import torch.nn.functional as F

    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    rows = torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(target)[mask]
    token_logits = logits[:, :-1][mask].float()
    token_loss = F.cross_entropy(token_logits, target[mask], reduction="none")
    total = torch.zeros(target.shape[0], dtype=torch.float32, device=token_loss.device).index_add_(0, rows, token_loss)
    count = mask.sum(dim=1).clamp_min(1).to(total.dtype)
    return total / count


def pick_prediction(row_losses, mapping: Sequence[tuple[int, int]], n_examples: int) -> list[int]:
    """Per example, the candidate index with the lowest mean token loss (ties: the lower index)."""
    if hasattr(row_losses, "tolist"):
        row_losses = row_losses.tolist()
    if len(row_losses) != len(mapping):
        raise ValueError(f"{len(row_losses)} row losses but {len(mapping)} mapping entries")
    best: list[tuple[float, int] | None] = [None] * n_examples
    for loss, (i, j) in zip(row_losses, mapping):
        if not 0 <= i < n_examples:
            raise ValueError(f"mapping refers to example {i}, but n_examples={n_examples}")
        loss = float(loss)
        cur = best[i]
        if cur is None or loss < cur[0] or (loss == cur[0] and j < cur[1]):
            best[i] = (loss, j)
    missing = [i for i, b in enumerate(best) if b is None]
    if missing:
        raise ValueError(f"no candidate rows for example(s) {missing[:5]}")
    return [b[1] for b in best]


def single_token_candidates(tokenizer, examples: Sequence[Example]) -> list[list[int]] | None:
    """Token id of every candidate, per example, if each candidate is exactly one token; else None."""
    distinct = list(dict.fromkeys(c for ex in examples for c in ex.candidates))
    if not distinct or any(not ex.candidates for ex in examples):
        return None
    ids = dict(zip(distinct, _tokenize(tokenizer, distinct)))
    if any(len(v) != 1 for v in ids.values()):
        return None
    return [[ids[c][0] for c in ex.candidates] for ex in examples]


def _logits_of(output):
    return output.logits if hasattr(output, "logits") else output


def score_candidates(forward, tokenizer, examples: Sequence[Example], max_length: int, *, batch_size: int = 16,
                     single_token_fast_path: bool = True) -> tuple[list[int], list[list[float]]]:
    """Score every candidate of every example; return (predictions, per-candidate mean token losses).

    ``forward(**batch)`` is a causal LM call (an HF model, or a wrapper around an engine) returning
    ``.logits`` or a logits tensor. Examples are processed ``batch_size`` at a time, sorted by prompt
    length to limit padding. When every candidate is a single token (sentiment/NLI verbalizers) and
    ``single_token_fast_path`` is on, each example needs one prompt-only forward instead of one per
    candidate: prompts are left-padded with explicit ``position_ids`` and ``logits_to_keep=1``, and
    the candidates' losses are read off the last position (the same numbers as the per-row path, up to
    float rounding). Otherwise rows come from :func:`encode_candidates` and :func:`sequence_losses`.
    """
    import torch

    n = len(examples)
    order = sorted(range(n), key=lambda i: len(examples[i].prompt))
    losses: list[list[float] | None] = [None] * n
    fast = single_token_candidates(tokenizer, examples) if single_token_fast_path else None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        chunk = [examples[i] for i in idx]
        if fast is not None:
            batch = encode_prompts(tokenizer, chunk, max_length - 1, padding_side="left")
            position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
            logits = _logits_of(forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        position_ids=position_ids, logits_to_keep=1, use_cache=False))
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            for row, i in enumerate(idx):
                losses[i] = [-logp[row, t].item() for t in fast[i]]
        else:
            batch, mapping = encode_candidates(tokenizer, chunk, max_length)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            inputs["use_cache"] = False  # scoring only: no KV cache kept alive through the forward
            row_losses = sequence_losses(_logits_of(forward(**inputs)), batch["labels"]).tolist()
            per = [[0.0] * len(ex.candidates) for ex in chunk]
            for loss, (r, j) in zip(row_losses, mapping):
                per[r][j] = loss
            for r, i in enumerate(idx):
                losses[i] = per[r]
    preds = [min(range(len(l)), key=lambda j: (l[j], j)) for l in losses]
    return preds, losses


# ----------------------------------------------------------------------------------------- generation

def generation_prompt(example: Example) -> str:
    """The text to generate from (the rendered prompt, ending in "Answer:" for SQuAD/DROP)."""
    return example.prompt


def gold_answers(example: Example) -> list[str]:
    """The gold answers scored by F1/EM."""
    return list(example.answers)


def encode_prompts(tokenizer, examples: Sequence[Example], max_length: int, *, padding_side: str = "left",
                   return_tensors: str | None = "pt") -> dict[str, Any]:
    """Prompts only (for ``model.generate``): left-padded by default, truncated from the left."""
    prefix = _leading_special_ids(tokenizer)
    pad_id = _pad_id(tokenizer)
    budget = max_length - len(prefix)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt")
    seqs = [(prefix or ([] if ids else _start_ids(tokenizer))) + ids[max(0, len(ids) - budget):]
            for ids in _tokenize(tokenizer, [generation_prompt(e) for e in examples])]
    if not seqs:
        raise ValueError("nothing to encode: no examples")
    width = max(len(s) for s in seqs)
    input_ids, attention_mask = [], []
    for s in seqs:
        pad = [pad_id] * (width - len(s))
        mask_pad = [0] * (width - len(s))
        if padding_side == "left":
            input_ids.append(pad + s)
            attention_mask.append(mask_pad + [1] * len(s))
        else:
            input_ids.append(s + pad)
            attention_mask.append([1] * len(s) + mask_pad)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if return_tensors == "pt":
        import torch
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    return batch


def newline_stop_ids(tokenizer, stop: str = "\n") -> list[int]:
    """Token ids generation stops at: the last token of ``stop`` and EOS (MeZO run.py:218:
    ``eos_token_id=[tokenizer.encode(eos_token)[-1], tokenizer.eos_token_id]`` with eos_token "\n")."""
    ids = []
    if stop:
        encoded = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if encoded:
            ids.append(int(encoded[-1]))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return ids


def generate_answers(model, tokenizer, examples: Sequence[Example], max_length: int, *, device=None,
                     synced: bool = False, max_new_tokens: int = 50, stop: str = "\n") -> list[str]:
    """Greedy answers to the examples' prompts, one batch, decoded as MeZO decodes them (run.py:215-221).

    The prompt keeps at most ``max_length - max_new_tokens`` tokens (MeZO utils.py:162-163 reserves room for
    the answer); decoding is greedy for at most ``max_new_tokens`` tokens and stops at the last token of ``stop``
    (the newline token) or EOS; the text up to there, special tokens dropped, stripped, is the answer. A newline
    inside a longer token ("\n\n") does not stop decoding, as in MeZO. Score the answers as MeZO does with
    ``task.score(examples, answers, raw=False)``, or their first line with ``task.score(examples, answers)``.

    ``synced``: set under ZeRO-3 with several ranks. Each rank then keeps running forwards until every
    rank has finished decoding, because every forward gathers parameters collectively; without it a
    rank that stops early leaves the others waiting in an all-gather forever.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_length - max_new_tokens < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt after {max_new_tokens} new tokens; "
                         "raise data.max_length or lower data.max_new_tokens")
    batch = encode_prompts(tokenizer, examples, max_length - max_new_tokens)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    stops = newline_stop_ids(tokenizer, stop)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                         pad_token_id=_pad_id(tokenizer), eos_token_id=stops)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))  # the rest is padding
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def truncation_report(tokenizer, examples: Sequence[Example], max_length: int, *, reserve: int = 0,
                      targets: bool = False) -> dict[str, int]:
    """How many examples lose prompt tokens to ``max_length`` (never silently: the trainer logs this per split).

    Each example's row is its prompt plus its longest candidate (classification), plus its target
    (``targets``: a training row), or its prompt alone with ``reserve`` tokens kept free for generation. Returns
    ``{"n", "truncated", "longest"}`` (longest: the longest row in tokens, before truncation) and, for
    generation prompts, ``"answer_cut"``: examples whose gold answer appears in the prompt but no longer in the
    part that is kept (e.g. a SQuAD answer span before the last ``max_length`` tokens).
    """
    prefix = len(_leading_special_ids(tokenizer))
    prompts = _tokenize(tokenizer, [ex.prompt for ex in examples])
    options = {}
    texts = [c for ex in examples for c in (ex.candidates if not targets else [ex.target_text()])]
    if texts:
        distinct = list(dict.fromkeys(texts))
        options = {t: len(ids) for t, ids in zip(distinct, _tokenize(tokenizer, distinct))}
    report = {"n": len(examples), "truncated": 0, "longest": 0}
    generation = any(not ex.candidates for ex in examples) and not targets
    if generation:
        report["answer_cut"] = 0
    for ex, ids in zip(examples, prompts):
        opts = [ex.target_text()] if targets else ex.candidates
        extra = max((options[o] for o in opts), default=0) if opts else reserve
        total = prefix + len(ids) + extra
        report["longest"] = max(report["longest"], total)
        if total <= max_length:
            continue
        report["truncated"] += 1
        if generation and ex.answers:
            keep = max(0, max_length - reserve - prefix)
            kept = tokenizer.decode(ids[len(ids) - keep:] if keep else [], skip_special_tokens=True)
            if any(a in ex.prompt for a in ex.answers) and not any(a in kept for a in ex.answers):
                report["answer_cut"] += 1
    return report


__all__ = ["generate_answers", "newline_stop_ids", "truncation_report", "LeadingIds", "IGNORE_INDEX", "encode_for_training", "encode_candidates", "sequence_losses", "pick_prediction",
           "score_candidates", "single_token_candidates", "generation_prompt", "gold_answers", "encode_prompts", "postprocess_generation"]
