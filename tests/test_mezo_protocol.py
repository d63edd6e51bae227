"""MeZO's protocol, exactly (issue 14): per-task defaults against MeZO's sources, never-silent truncation, MeZO's
generation rule, in-context prompts as MeZO's encode_prompt renders them, calibration, MeZO's sampling, the OPT BOS
rule, the official file formats of every task, and checkpoint retention keeping the best one. Fast: no DeepSpeed.

MeZO sources are princeton-nlp/MeZO large_models/ at run.py 7b2471e, utils.py 9fe98cb, mezo.sh a0966b5."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness import tiny_llama, tiny_opt, write_jsonl
from zo_deepspeed.evaluate import Evaluator
from zo_deepspeed.run_config import load_run_config, resolve_run_config
from zo_deepspeed.tasks import (Example, LeadingIds, TaskDataError, build_splits, calibration_examples, demo_sets,
                                encode_candidates, encode_for_training, generate_answers, get_task, icl_examples,
                                newline_stop_ids, truncation_report)
from zo_deepspeed.tasks.protocol import bos_rule, configured_task, encoding_tokenizer, fit_max_length

# ----------------------------------------------------------------------------------------- per-task defaults

# task: (num_train, num_dev, num_test, train objective, max_length, max_new_tokens), and where MeZO sets them.
# choice == MeZO's --train_as_classification (CE over the candidates' mean option log-likelihoods, utils.py:69, 88);
# loss == LM loss on the gold option / answer (only_train_option, run.py:58) where mezo.sh passes
# --train_as_classification False (mezo.sh:26-42). Sizes: mezo.sh:9-11 (TRAIN/DEV/EVAL), CB/COPA dev 100
# (mezo.sh:27-31). Lengths: max_length 2048 (run.py:45), max_new_tokens 50 (run.py:81).
MEZO = {
    "sst2":    ((1000, 500, 1000, "choice", 2048, 50), "mezo.sh:9-11, 63; run.py:45, 81"),
    "rte":     ((1000, 500, 1000, "choice", 2048, 50), "mezo.sh:9-11, 63; run.py:45, 81"),
    "cb":      ((1000, 100, 1000, "choice", 2048, 50), "mezo.sh:27-29 (DEV=100), 63; run.py:45, 81"),
    "boolq":   ((1000, 500, 1000, "choice", 2048, 50), "mezo.sh:9-11, 63; run.py:45, 81"),
    "wsc":     ((1000, 500, 1000, "choice", 2048, 50), "mezo.sh:9-11, 63; run.py:45, 81"),
    "wic":     ((1000, 500, 1000, "choice", 2048, 50), "mezo.sh:9-11, 63; run.py:45, 81"),
    "multirc": ((1000, 500, 1000, "choice", 2048, 50), "mezo.sh:9-11, 63; run.py:45, 81"),
    "copa":    ((1000, 100, 1000, "loss", 2048, 50), "mezo.sh:30-33 (DEV=100, classification False); run.py:58"),
    "record":  ((1000, 500, 1000, "loss", 2048, 50), "mezo.sh:34-36 (classification False); run.py:58"),
    "squad":   ((1000, 500, 1000, "loss", 2048, 50), "mezo.sh:40-42; run.py:45, 81-82"),
    "drop":    ((1000, 500, 1000, "loss", 2048, 50), "mezo.sh:37-39; run.py:45, 81-82"),
}


@pytest.mark.parametrize("task", sorted(MEZO))
def test_defaults_are_mezos(task):
    (n_train, n_dev, n_test, objective, max_length, max_new), source = MEZO[task]
    cfg = resolve_run_config(load_run_config(None, [f"data.task={task}", "zo.seed=3"]))
    d = cfg.data
    got = (d.num_train, d.num_dev, d.num_test, cfg.train.objective, d.max_length, d.max_new_tokens)
    assert got == (n_train, n_dev, n_test, objective, max_length, max_new), source
    assert d.test_seed == 3  # MeZO draws the test subset with the run seed (run.py:480)
    assert get_task(task).kind == ("generation" if task in ("squad", "drop") else "classification")


def test_rotten_tomatoes_keeps_the_default_jobs_settings():
    d = resolve_run_config(load_run_config()).data
    assert (d.num_train, d.num_dev, d.num_test, d.max_length, d.test_seed) == (1000, 500, 500, 2048, 0)
    assert get_task("rotten_tomatoes").sampler == "python"  # its train/test examples are the ones it always drew


def test_explicit_values_win_and_null_is_the_tasks_default():
    cfg = resolve_run_config(load_run_config(None, ["data.task=cb", "data.num_dev=7", "data.max_length=300",
                                                    "train.objective=loss", "data.test_seed=5"]))
    assert (cfg.data.num_dev, cfg.data.max_length, cfg.train.objective, cfg.data.test_seed) == (7, 300, "loss", 5)
    cfg = resolve_run_config(load_run_config(None, ["data.task=cb", "data.num_dev=null", "data.num_train=none"]))
    assert (cfg.data.num_train, cfg.data.num_dev) == (1000, 100)  # was: int() of 'none' failed
    assert resolve_run_config(cfg) is cfg


def test_default_max_length_is_at_most_the_models_context(tmp_path):
    tiny_opt(save_to=tmp_path / "opt", max_position_embeddings=256)
    cfg = resolve_run_config(load_run_config(None, ["data.task=rte"]))
    assert fit_max_length(cfg, str(tmp_path / "opt"), verbose=False).data.max_length == 256
    short = resolve_run_config(load_run_config(None, ["data.task=rte", "data.max_length=100"]))
    assert fit_max_length(short, str(tmp_path / "opt"), verbose=False) is short


def test_build_splits_sizes_follow_the_task(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": "h", "label": ["entailment", "contradiction", "neutral"][i % 3],
             "idx": i} for i in range(250)]  # CB has 250 training examples
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", rows[:56])
    s = build_splits("cb", tmp_path, seed=0, num_train=1000, num_test=1000)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [150, 100, 56]  # MeZO: CB trains on 150


# ----------------------------------------------------------------------------------------- sampling

def test_sampling_draws_mezos_examples(tmp_path):
    """MeZO: permutation under temp_seed(seed), the first num_train + num_dev, dev the last num_dev
    (tasks.py Dataset.sample_subset, run.py main); test: the first num_eval of a permutation of the valid split."""
    write_jsonl(tmp_path / "train.jsonl", [{"premise": f"p{i}", "hypothesis": "h", "label": i % 2, "idx": i}
                                           for i in range(40)])
    write_jsonl(tmp_path / "val.jsonl", [{"premise": f"v{i}", "hypothesis": "h", "label": i % 2, "idx": 100 + i}
                                         for i in range(12)])
    s = build_splits("rte", tmp_path, seed=3, num_train=20, num_dev=10, num_test=8, test_seed=3)
    perm = np.random.RandomState(3).permutation(40)[:30].tolist()
    assert [e.id for e in s["train"]] == [str(i) for i in perm[:20]]
    assert [e.id for e in s["dev"]] == [str(i) for i in perm[20:]]
    assert [e.id for e in s["test"]] == [str(100 + i) for i in np.random.RandomState(3).permutation(12)[:8]]


# ----------------------------------------------------------------------------------------- truncation, generation

WORDS = ("the cat sat on a mat while rain fell over green hills and quiet rivers near old stone bridges").split()


def _long_squad(tmp_path) -> Example:
    """A SQuAD example whose answer is in the context's first sentence, about 300 tokens before the end."""
    filler = " ".join(WORDS[i % len(WORDS)] for i in range(300)) + "."
    data = {"version": "1.1", "data": [{"title": "Islands", "paragraphs": [{
        "context": "The capital is Zanzibar. " + filler,
        "qas": [{"id": "z1", "question": "What is the capital?", "answers": [{"text": "Zanzibar", "answer_start": 15}]}]}]}]}
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(data))
    (ex,) = get_task("squad").load_split("dev", tmp_path)
    return ex


class CopyLM(torch.nn.Module):
    """generate(): the answer's tokens if they are in the prompt the model was given (else ' Paris'), then a newline
    and junk; records the generate() arguments."""

    def __init__(self, tok, answer: str, after: list[int] | None = None):
        super().__init__()
        self.tok, self.answer_ids = tok, tok(" " + answer, add_special_tokens=False)["input_ids"]
        self.after = after if after is not None else tok("\nQuestion: more", add_special_tokens=False)["input_ids"]
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.calls.append({"max_new_tokens": max_new_tokens, "width": input_ids.shape[1], **kw})
        rows = []
        for ids in input_ids.tolist():
            a = self.answer_ids
            seen = any(ids[i:i + len(a)] == a for i in range(len(ids) - len(a) + 1))
            new = (a if seen else self.tok(" Paris", add_special_tokens=False)["input_ids"]) + self.after
            rows.append((new + [kw["pad_token_id"]] * max_new_tokens)[:max_new_tokens])
        return torch.cat([input_ids, torch.tensor(rows)], 1)


class FakeEngine:
    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, module):
        self.module = module

    def flush(self):
        pass

    def all_reduce(self, t):
        return t

    def forward(self, **kw):
        return self.module(**kw)


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_squad_answer_beyond_128_tokens_is_scored_with_the_answer_present(tok, tmp_path):
    ex = _long_squad(tmp_path)
    task = get_task("squad")
    d = resolve_run_config(load_run_config(None, ["data.task=squad"])).data
    assert len(tok(ex.prompt)["input_ids"]) > 250  # the answer lies more than 128 tokens before the prompt's end
    model = CopyLM(tok, "Zanzibar")
    full = Evaluator(FakeEngine(model), task, tok, d.max_length, max_new_tokens=d.max_new_tokens).evaluate("test", [ex])
    assert full.value == 1.0  # the default length keeps the whole passage
    assert truncation_report(tok, [ex], d.max_length, reserve=d.max_new_tokens)["truncated"] == 0
    old = Evaluator(FakeEngine(model), task, tok, 128, max_new_tokens=50).evaluate("test", [ex])
    assert old.value == 0.0 and model.calls[-1]["width"] == 128 - 50  # the old 128 cut the answer away...
    rep = truncation_report(tok, [ex], 128, reserve=50)
    assert (rep["truncated"], rep["answer_cut"]) == (1, 1)  # ...and now says so


def test_generation_stops_at_the_newline_token_and_eos_as_mezo(tok):
    """run.py:215-221: greedy, max_new_tokens=min(50, ...), eos_token_id=[encode("\\n")[-1], eos], decode with
    skip_special_tokens, strip. A newline inside a longer token ("\\n\\n") does not stop it."""
    ex = Example(id="g", prompt="Question: where?\nAnswer:", answers=["France"], task="squad")
    nl = tok("\n", add_special_tokens=False)["input_ids"][-1]
    assert newline_stop_ids(tok) == [nl, tok.eos_token_id]
    model = CopyLM(tok, "France")
    assert generate_answers(model, tok, [ex], 2048) == ["Paris"]
    assert model.calls[-1]["max_new_tokens"] == 50 and model.calls[-1]["eos_token_id"] == [nl, tok.eos_token_id]
    double = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(double) == 1 and double[0] != nl  # one token that holds two newlines
    model = CopyLM(tok, "France", after=double + tok(" Paris", add_special_tokens=False)["input_ids"] + [nl])
    ex_seen = Example(id="g", prompt="It is in France.\nAnswer:", answers=["France"], task="squad")
    (answer,) = generate_answers(model, tok, [ex_seen], 2048)
    assert answer == "France\n\n Paris"  # MeZO scores all of it...
    assert get_task("squad").score([ex_seen], [answer], raw=False)["f1"] == pytest.approx(2 / 3)
    assert get_task("squad").score([ex_seen], [answer])["f1"] == 1.0  # ...the raw-text rule cut it at "\n"


def test_truncation_report_counts_rows_over_the_length(tok):
    short = Example(id="s", prompt="Review: fine\nSentiment:", candidates=[" negative", " positive"], label=1)
    long = Example(id="l", prompt="Review: " + " ".join(WORDS * 4) + "\nSentiment:",
                   candidates=[" negative", " positive"], label=0)
    rep = truncation_report(tok, [short, long], 32)
    assert (rep["n"], rep["truncated"]) == (2, 1) and rep["longest"] > 32 and "answer_cut" not in rep
    batch = encode_for_training(tok, [short, long], 32)
    assert batch["input_ids"].shape[1] == 32  # the long row is cut to the length, the option kept
    assert truncation_report(tok, [short, long], 32, targets=True)["truncated"] == 1


# ----------------------------------------------------------------------------------------- ICL and calibration

def _mezo_final_prompts(demos, eval_verbalized, sep="\n\n"):
    """MeZO's encode_prompt string logic (utils.py:124-125, 146): demonstrations verbalized with their gold
    candidate and stripped, joined by train_sep and stripped; then train_sep, the verbalized eval example (strip(' '));
    the whole lstripped and strip(' ')ed."""
    train = sep.join(d.strip() for d in demos).strip()
    return [(train + sep + v.strip(" ")).lstrip().strip(" ") for v in eval_verbalized]


def _rows(task, tmp_path, rows, name="train.jsonl"):
    return get_task(task).load_file(write_jsonl(tmp_path / name, rows))


ICL_CASES = {
    "rte": [{"premise": f"Premise {i}.", "hypothesis": f"Claim {i}.", "label": i % 2, "idx": i} for i in range(12)],
    "copa": [{"premise": f"The man fell {i}.", "choice1": "He slipped.", "choice2": "I laughed.",
              "question": ["cause", "effect"][i % 2], "label": i % 2, "idx": i} for i in range(12)],
    "record": [{"passage": f"Ann met Bob {i}.\n@highlight\nBob left", "query": "@placeholder waved.",
                "entities": ["Ann", "Bob"], "answers": ["Bob"] if i % 2 else ["Ann"], "idx": i} for i in range(12)],
    "sst2": [{"sentence": f"a fine film number {i} ", "label": i % 2} for i in range(12)],
    "squad": [{"id": f"q{i}", "title": "T", "context": f"Context {i}.", "question": f"Question {i}? ",
               "answers": {"text": [f"answer {i}"], "answer_start": [0]}} for i in range(12)],
}


@pytest.mark.parametrize("task_name", sorted(ICL_CASES))
def test_icl_prompts_render_as_mezos_encode_prompt(task_name, tmp_path):
    task = get_task(task_name)
    pool = _rows(task_name, tmp_path, ICL_CASES[task_name])
    tests = pool[:3]
    k = 4
    exs, demos = icl_examples(task, tests, pool, k, seed=0)
    # MeZO's demonstration sets: one per eval example; seeds RandomState(0).randint(0, 10000, n) (temp_seed(0)),
    # each the first k of RandomState(seed).permutation(len(train)) (tasks.py Dataset.sample_train_sets)
    seeds = np.random.RandomState(0).randint(0, 10000, 3)
    assert seeds.tolist() == [2732, 9845, 3264]
    assert demo_sets(len(pool), 3, k, 0) == [np.random.RandomState(s).permutation(12)[:k].tolist() for s in seeds]
    for ex, orig, shots in zip(exs, tests, demos):
        verbalized = [d.prompt + d.target_text() for d in shots]  # template.verbalize(sample, correct_candidate)
        if task.kind == "generation":
            assert ex.prompt == _mezo_final_prompts(verbalized, [orig.prompt])[0]
        else:
            got = [ex.prompt + c for c in ex.candidates]
            assert got == _mezo_final_prompts(verbalized, [orig.prompt + c for c in orig.candidates])
    zero, _ = icl_examples(task, tests, pool, 0)
    assert [e.prompt for e in zero] == [e.prompt.lstrip() for e in tests]  # zero-shot: the same code, k = 0


def test_icl_prompt_literally():
    task = get_task("rte")
    mk = lambda i, y: Example(id=str(i), prompt=f"P{i}\nDoes this mean that \"H{i}\" is true? Yes or No?\n",  # noqa
                              candidates=["Yes", "No"], label=y)
    pool = [mk(0, 0), mk(1, 1)]
    (ex,), _ = icl_examples(task, [mk(9, 0)], pool, 2, seed=0)
    order = demo_sets(2, 1, 2, 0)[0]
    first, second = [("P0", "Yes"), ("P1", "No")][order[0]], [("P0", "Yes"), ("P1", "No")][order[1]]
    q = lambda p: f"{p}\nDoes this mean that \"H{p[1:]}\" is true? Yes or No?\n"  # noqa: E731
    assert ex.prompt == f"{q(first[0])}{first[1]}\n\n{q(second[0])}{second[1]}\n\n{q('P9')}"


def test_calibration_prompts_are_mezos_encode_sfc(tmp_path):
    """encode_sfc: SST-2 " It was" (strip(' ')), COPA its conjunction, ReCoRD "-", the others ""."""
    sst2 = _rows("sst2", tmp_path, ICL_CASES["sst2"][:1], "s.jsonl")
    copa = _rows("copa", tmp_path, ICL_CASES["copa"][:2], "c.jsonl")
    record = _rows("record", tmp_path, ICL_CASES["record"][:1], "r.jsonl")
    rte = _rows("rte", tmp_path, ICL_CASES["rte"][:1], "t.jsonl")
    assert [e.prompt for e in calibration_examples(get_task("sst2"), sst2)] == ["It was"]
    assert [e.prompt for e in calibration_examples(get_task("copa"), copa)] == ["because", "so"]
    assert [e.prompt for e in calibration_examples(get_task("record"), record)] == ["-"]
    assert [e.prompt for e in calibration_examples(get_task("rte"), rte)] == [""]
    icl, demos = icl_examples(get_task("rte"), rte, _rows("rte", tmp_path, ICL_CASES["rte"], "p.jsonl"), 2)
    (cal,) = calibration_examples(get_task("rte"), rte, demos, "icl_sfc")
    assert cal.prompt == icl[0].prompt[:len(icl[0].prompt) - len(rte[0].prompt)]  # demonstrations + "\n\n"
    with pytest.raises(ValueError, match="generation"):
        get_task("squad").calibration_prompt(Example(id="x", prompt="p", answers=["a"]))


class BagLM(torch.nn.Module):
    """Causal toy LM whose logits at t depend on the mean embedding of the real tokens <= t."""

    def __init__(self, vocab):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.out = torch.nn.Parameter(torch.randn(8, vocab, generator=g))

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, use_cache=None):
        m = attention_mask.unsqueeze(-1).float()
        h = (self.emb[input_ids] * m).cumsum(1) / m.cumsum(1).clamp_min(1)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return type("Out", (), {"logits": h @ self.out})()


def test_calibrated_scores_are_sum_log_likelihood_differences(tok, tmp_path):
    """run.py one_step_pred with --sfc: argmax of sum log p(option | prompt) - sum log p(option | sfc prompt);
    an empty calibration prompt (and no BOS) is scored after the tokenizer's BOS."""
    task = get_task("copa")
    exs = _rows("copa", tmp_path, ICL_CASES["copa"][:6])
    cal = calibration_examples(task, exs)
    model = BagLM(len(tok))
    ev = Evaluator(FakeEngine(model), task, tok, 256)
    got = ev.evaluate("test", exs, calibration=cal)

    def option_logprob_sum(prompt, option):
        p = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.bos_token_id]
        o = tok(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + o])
        logp = torch.log_softmax(model(ids, torch.ones_like(ids)).logits[0].float(), -1)
        return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(o))

    with torch.no_grad():
        preds = [max(range(2), key=lambda j: (option_logprob_sum(e.prompt, e.candidates[j])
                                              - option_logprob_sum(c.prompt, c.candidates[j]), -j))
                 for e, c in zip(exs, cal)]
    assert got.value == pytest.approx(sum(p == e.label for p, e in zip(preds, exs)) / len(exs))
    empty = Example(id="e", prompt="", candidates=["Yes", "No"], label=0)
    batch, _ = encode_candidates(tok, [empty], 16)
    assert batch["input_ids"][0, 0].item() == tok.bos_token_id  # the one context token of an empty prompt


# ----------------------------------------------------------------------------------------- OPT's BOS

def test_opt_rows_start_with_token_0_as_mezo(tmp_path):
    """run.py:175-176: for OPT, MeZO sets tokenizer.bos_token_id = 0 (the tokenizer prepends 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "Yes": 3, "No": 4, "Q": 5, ":": 6}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    tiny_opt(save_to=tmp_path / "opt")
    tiny_model_llama = tmp_path / "llama"
    tiny_llama(save_to=tiny_model_llama)
    assert bos_rule(str(tmp_path / "opt"), tok) == [0]
    assert bos_rule(str(tiny_model_llama), tok) is None
    assert bos_rule(str(tiny_model_llama), tok, override=7) == [7]
    enc = encoding_tokenizer(tok, str(tmp_path / "opt"))
    assert isinstance(enc, LeadingIds) and tok.bos_token_id == 2  # the tokenizer itself is not changed
    ex = Example(id="o", prompt="Q :", candidates=["Yes", "No"], label=0)
    assert encode_for_training(enc, [ex], 16)["input_ids"][0].tolist() == [0, 5, 6, 3]
    assert encode_for_training(tok, [ex], 16)["input_ids"][0].tolist() == [2, 5, 6, 3]


# ----------------------------------------------------------------------------------------- file formats

def test_glue_sst2_tsv_files(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"film {i} \t{i % 2}\n" for i in range(20)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nit 's \"good\" \t1\n")
    s = build_splits("sst2", tmp_path, seed=0, num_train=10, num_dev=5)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [10, 5, 1]
    assert s["test"][0].prompt == 'it \'s "good" It was' and s["test"][0].label == 1


def test_official_squad_v11_files_found_by_name(tmp_path):
    for name, n in (("train-v1.1.json", 6), ("dev-v1.1.json", 2)):
        qas = [{"id": f"{name}{i}", "question": f"Q{i}?", "answers": [{"text": "A", "answer_start": 0}]} for i in range(n)]
        (tmp_path / name).write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": [
            {"context": "A b.", "qas": qas}]}]}))
    s = build_splits("squad", tmp_path, seed=0, num_train=4, num_dev=2)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [4, 2, 2]
    assert all(e.id.startswith("dev-v1.1.json") for e in s["test"])
    assert all(e.id.startswith("train-v1.1.json") for e in s["train"] + s["dev"])
    assert s["test"][0].prompt.startswith("Title: T\nContext: A b.\nQuestion: Q")


def _drop_answer(number="", date=None, spans=()):
    return {"number": number, "date": date or {"day": "", "month": "", "year": ""}, "spans": list(spans)}


def test_official_drop_json(tmp_path):
    """drop_dataset_{train,dev}.json as HF's drop builder reads them: train "answer", dev "validated_answers";
    number, date "day month year", spans; a question breaking the builder's rules is skipped."""
    train = {"nfl_1": {"passage": "Brown kicked 3 goals on 3 July 2007.", "wiki_url": "u", "qa_pairs": [
        {"question": " How many goals?", "query_id": "a", "answer": _drop_answer("3"), "validated_answers": []},
        {"question": "When?", "query_id": "b", "answer": _drop_answer(date={"day": "3", "month": "July", "year": "2007"})},
        {"question": "Who?", "query_id": "c", "answer": _drop_answer(spans=["Brown", "Kris Brown"])},
        {"question": "Bad?", "query_id": "d", "answer": _drop_answer("2", spans=["x"])}]}}
    dev = {"nfl_2": {"passage": "One.", "wiki_url": "u", "qa_pairs": [
        {"question": "Q?", "query_id": "e", "answer": _drop_answer("9"),
         "validated_answers": [_drop_answer(spans=["one"]), _drop_answer("1")]}]}}
    (tmp_path / "drop_dataset_train.json").write_text(json.dumps(train))
    (tmp_path / "drop_dataset_dev.json").write_text(json.dumps(dev))
    task = get_task("drop")
    tr = task.load_split("train", tmp_path)
    assert [(e.id, e.answers) for e in tr] == [("a", ["3"]), ("b", ["3 July 2007"]), ("c", ["Brown", "Kris Brown"])]
    assert tr[0].prompt == "Passage: Brown kicked 3 goals on 3 July 2007.\nQuestion: How many goals?\nAnswer:"
    assert tr[0].target_text() == " 3\n"
    (d,) = task.load_split("dev", tmp_path)
    assert (d.id, d.answers) == ("e", ["one", "1"])


def test_hf_save_to_disk_exports(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"question": f"is it {i}", "passage": f"Title {i} -- Text {i}.", "idx": i, "label": i % 2} for i in range(8)]
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:3])}).save_to_disk(tmp_path)
    task = get_task("boolq")
    assert task.find_split_file("dev", tmp_path) == tmp_path / "validation"
    (ex, *_) = task.load_split("dev", tmp_path)
    assert ex.prompt == "Title 0 -- Text 0. Is it 0?\n"  # the file as it is
    (ex, *_) = task.with_options(keep_title=False).load_split("dev", tmp_path)
    assert ex.prompt == "Text 0. Is it 0?\n"  # MeZO's (Google's BoolQ has no title)
    with pytest.raises(TaskDataError, match="DatasetDict"):
        task.load_file(tmp_path)


def test_boolq_title_rule_by_source(tmp_path):
    superglue = write_jsonl(tmp_path / "sg.jsonl", [{"question": "is it", "passage": "Persian -- It is.", "label": True}])
    google = write_jsonl(tmp_path / "g.jsonl", [{"question": "is it", "passage": "Persian -- It is.", "answer": True}])
    data = load_run_config(None, ["data.task=boolq"]).data
    strip = configured_task(data)
    assert data.boolq_title is False and strip.keep_title is False and get_task("boolq").keep_title is True
    assert strip.load_file(superglue)[0].prompt == "It is. Is it?\n"
    assert strip.load_file(google)[0].prompt == "Persian -- It is. Is it?\n"  # Google's passages have no title
    keep = configured_task(load_run_config(None, ["data.task=boolq", "data.boolq_title=true"]).data)
    assert keep.load_file(superglue)[0].prompt == "Persian -- It is. Is it?\n"


def test_hf_exports_jsonl_and_parquet(tmp_path):
    from datasets import Dataset

    wsc = [{"text": "Mark lied. He was wrong.", "span1_index": 0, "span2_index": 2, "span1_text": "Mark",
            "span2_text": "He", "idx": 0, "label": 1}]
    Dataset.from_list(wsc).to_json(str(tmp_path / "wsc.jsonl"))
    (ex,) = get_task("wsc").load_file(tmp_path / "wsc.jsonl")
    assert ex.prompt.endswith("does the pronoun \"he\" refer to Mark? Yes or No?\n") and ex.label == 1
    record = [{"passage": "Ann met Bob.\n@highlight\nBob left", "query": "@placeholder waved.", "entities": ["Bob", "Ann"],
               "entity_spans": {"text": ["Ann", "Bob"], "start": [0, 8], "end": [2, 10]}, "answers": ["Ann"],
               "idx": {"passage": 0, "query": 0}}]
    Dataset.from_list(record).to_parquet(str(tmp_path / "record.parquet"))
    (ex,) = get_task("record").load_file(tmp_path / "record.parquet")
    assert ex.candidates[ex.label] == " Ann waved." and ex.id == "0-0"


def test_unknown_json_layout_is_one_clear_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"a": {"x": 1}, "b": {"y": 2}}))
    with pytest.raises(TaskDataError) as e:
        get_task("drop").load_file(path)
    msg = str(e.value)
    assert "\n" not in msg and "none of the known layouts" in msg and "train.json" in msg


def test_record_trains_on_the_first_sorted_answer(tmp_path):
    """MeZO trains ReCoRD on candidates.index(correct_candidate[0]), HF's answers being sorted (run.py _convert)."""
    path = write_jsonl(tmp_path / "r.jsonl", [{
        "passage": "Tracy Morgan was hurt.\n@highlight\nMorgan is fine", "query": "@placeholder thanked fans.",
        "entities": ["Tracy Morgan", "Morgan"], "answers": ["Tracy Morgan", "Morgan"]}])
    (ex,) = get_task("record").load_file(path)
    assert ex.gold_labels == (0, 1) and ex.train_label == 1
    assert ex.target_text() == " Morgan thanked fans."
    assert get_task("record").demonstration(ex).endswith("\n- Morgan thanked fans.")


# ----------------------------------------------------------------------------------------- retention

def test_retention_keeps_the_best_checkpoint(tmp_path):
    import zo_deepspeed as zd
    from zo_deepspeed import checkpoint as ckpt

    model = torch.nn.Linear(4, 3)
    loss = lambda forward, batch: (forward(batch["x"]).square().sum(), torch.tensor(2.0))  # noqa: E731
    eng = zd.initialize(model, None, zd.ZOConfig(lr=1e-2, eps=1e-3, compile=False), loss_fn=loss)
    x = {"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(1))}
    for step in range(1, 6):
        eng.step(x)
        ckpt.save_checkpoint(eng, tmp_path, keep=1)
        if step == 2:
            (tmp_path / "checkpoints" / "best").write_text("step_00000002")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "latest", "step_00000002", "step_00000005"]
    assert ckpt.load_checkpoint(eng, tmp_path / "checkpoints" / "step_00000002").step == 2
