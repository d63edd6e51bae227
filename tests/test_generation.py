"""Generation tasks end to end: F1 evaluation and the -F1 objective under ZeRO-3 at 2 ranks equal
one process, and the evaluation equals plain HF greedy decoding scored by hand."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import read_metrics, run_cli, tiny_llama, write_jsonl
from zo_deepspeed.tasks import generate_answers, get_task, normalize_answer, squad_f1

pytestmark = pytest.mark.dist

WORDS = ("red blue green cat dog bird tree house river stone light water fire wind road city king "
         "queen ship music").split()


def _rows(n: int, seed: int, tok) -> list[dict]:
    """SQuAD (HF layout) rows whose prompts all tokenize to the same length: no padding, so a batch
    split over 2 ranks runs the very same per-row arithmetic as the whole batch in one process."""
    rng = random.Random(seed)
    rows, want = [], None
    while len(rows) < n:
        ctx = " ".join(rng.choice(WORDS) for _ in range(6)) + "."
        q = "Where is the " + rng.choice(WORDS) + "?"
        prompt = get_task("squad").prompt("T", ctx, q)
        length = len(tok(prompt)["input_ids"])
        want = want or length
        if length == want:
            rows.append({"id": f"s{seed}-{len(rows)}", "title": "T", "context": ctx, "question": q,
                         "answers": {"text": ["placeholder"], "answer_start": [0]}})
    return rows


@pytest.fixture(scope="module")
def gen_lm_dir(tiny_lm_dir, tmp_path_factory):
    """conftest's tiny Llama with larger random weights (init std 0.2): at the default 0.02 its greedy
    decoding collapses to one punctuation token, which SQuAD normalization strips to nothing."""
    root = tmp_path_factory.mktemp("gen_lm")
    tiny_llama(like=tiny_lm_dir, initializer_range=0.2, save_to=root)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def squad_dir(gen_lm_dir, tmp_path_factory):
    """Gold answers cut from the tiny model's own greedy generations (the first half of the words
    for even rows, unrelated words for odd rows), so F1 is a non-trivial fraction, not 0 or 1."""
    tok = AutoTokenizer.from_pretrained(gen_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(gen_lm_dir).eval()
    task = get_task("squad")
    root = tmp_path_factory.mktemp("squad")
    for name, n, seed in (("train", 12, 1), ("validation", 8, 2)):
        rows = _rows(n, seed, tok)
        write_jsonl(root / f"{name}.jsonl", rows)
        exs = task.load_file(root / f"{name}.jsonl")
        with torch.no_grad():
            gens = [task.postprocess(g) for g in generate_answers(model, tok, exs, 64)]
        for i, (row, gen) in enumerate(zip(rows, gens)):
            words = gen.split()
            gold = " ".join(words[:max(1, len(words) // 2)]) if i % 2 == 0 and words else "zebra"
            row["answers"] = {"text": [gold], "answer_start": [0]}
        write_jsonl(root / f"{name}.jsonl", rows)
    return root


ARGS = ["data.task=squad", "data.num_train=8", "data.num_dev=4", "data.num_test=8", "data.max_length=64",
        "train.batch_size=4", "train.eval_batch_size=8", "model.dtype=float32", "train.export=false"]


def test_generation_eval_and_f1_objective_two_ranks_match_one_process(gen_lm_dir, squad_dir, tmp_path):
    common = [f"model.path={gen_lm_dir}", f"data.data_dir={squad_dir}", *ARGS]
    # -F1 objective: eps large enough that the perturbed generations differ, so g is not always 0
    train = ["train.objective=f1", "train.steps=3", "train.eval_every=2", "zo.eps=0.05", "zo.lr=1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(["train", *common, *train, f"train.output_dir={one}"])
    run_cli(["train", *common, *train, f"train.output_dir={two}"], world=2)
    m1, m2 = read_metrics(one), read_metrics(two)

    # F1 by hand: plain HF greedy decoding of the base model on the test file, scored with squad_f1
    tok = AutoTokenizer.from_pretrained(gen_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(gen_lm_dir).eval()
    task = get_task("squad")
    exs = task.load_file(squad_dir / "validation.jsonl")
    with torch.no_grad():
        gens = [task.postprocess(g) for g in generate_answers(model, tok, exs, 64)]
    ref = sum(squad_f1(g, ex.answers) for g, ex in zip(gens, exs)) / len(exs)
    assert 0.1 < ref < 0.9, ref  # a fraction: the check below can tell a wrong decoding from a right one
    assert any(normalize_answer(g) for g in gens)

    f1 = lambda ms, k: [(r["step"], r[k]) for r in ms if k in r]  # noqa: E731
    assert f1(m1, "test/f1")[0] == (0, pytest.approx(ref, abs=1e-12))
    # ZeRO-3 at 2 ranks (synced generate on each rank's shard) == one process: eval F1 and -F1 losses
    assert f1(m2, "test/f1") == f1(m1, "test/f1") and len(f1(m1, "test/f1")) == 2
    assert f1(m2, "dev/f1") == f1(m1, "dev/f1") and len(f1(m1, "dev/f1")) == 1
    l1 = [r["loss"] for r in m1 if "loss" in r]
    l2 = [r["loss"] for r in m2 if "loss" in r]
    assert len(l1) == 3 and l2 == pytest.approx(l1, abs=1e-12)
    assert all(-1.0 <= v <= 0.0 for v in l1)  # the loss is -F1
    g1 = [r["g"] for r in m1 if "g" in r]
    assert any(g != 0 for g in g1), g1  # the objective moved: some perturbation changed a generation
    assert [r["g"] for r in m2 if "g" in r] == pytest.approx(g1, abs=1e-9)


def test_f1_objective_refused_for_classification(tiny_lm_dir, tmp_path):
    p = run_cli(["train", f"model.path={tiny_lm_dir}", "train.objective=f1", "train.steps=1",
                 f"train.output_dir={tmp_path / 'r'}"], check=False)
    assert p.returncode != 0
    assert "train.objective=f1 scores generations: generation tasks only" in p.stderr + p.stdout
    assert not (tmp_path / "r" / "trajectory.jsonl").exists()
