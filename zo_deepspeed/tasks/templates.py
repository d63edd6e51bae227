"""MeZO-style prompt templates (princeton-nlp/MeZO, large_models/templates.py) for GLUE/SuperGLUE/SQuAD/DROP.

Convention: ``prompt`` carries no trailing space; a candidate that follows a space in MeZO's
verbalization starts with that space (" great"), one that follows a newline does not ("Yes").
Each candidate is tokenized separately and appended to the prompt's tokens, so the option tokens
are the same for every example.

Accepted file layouts (first = standard):
  sst2      GLUE SST-2 (.tsv/.jsonl/...): sentence, label (0/1)
  rte       SuperGLUE: premise, hypothesis, label ("entailment"/"not_entailment" or 0/1);
            GLUE sentence1/sentence2 are accepted as aliases
  cb        SuperGLUE: premise, hypothesis, label ("entailment"/"contradiction"/"neutral" or 0/1/2)
  boolq     SuperGLUE: passage, question, label (true/false or 0/1); Google BoolQ's "answer" accepted.
            SuperGLUE prefixes each passage with "<title> -- "; MeZO's source (Google's BoolQ, HF "boolq")
            has none: with_options(keep_title=False) (a run's default, data.boolq_title=false) strips it
  wsc       SuperGLUE: text, target{span1_text, span2_text}, label; or HF flat span1_text/span2_text
  wic       SuperGLUE: word, sentence1, sentence2, label
  multirc   SuperGLUE nested: passage{text, questions[{question, answers[{text, label}]}]};
            or HF flat: paragraph, question, answer, label (one example per answer)
  copa      SuperGLUE: premise, choice1, choice2, question ("cause"/"effect"), label (0/1)
  record    SuperGLUE nested: passage{text, entities[{start, end}]}, qas[{query, answers[{text}]}];
            or HF flat: passage, query, entities (strings), answers (strings)
  squad     SQuAD JSON {"data": [{title, paragraphs[{context, qas[{id, question, answers[{text}]}]}]}]}
            (the official train-v1.1.json / dev-v1.1.json are found by name) or HF flat: context, question,
            answers{text: [...]} (title optional); unanswerable (SQuAD v2) questions are skipped
  drop      the official drop_dataset_{train,dev}.json {passage_id: {passage, qa_pairs[{question, query_id,
            answer, validated_answers}]}}, read as HF's drop builder does; or HF flat: passage, question,
            answers_spans{spans: [...]} (or answers: [...])

Calibration prompts (MeZO's ``encode_sfc``): "It was" (SST-2), the conjunction (COPA), "-" (ReCoRD), empty for
the others.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import ClassificationTask, Example, GenerationTask, Row, _example_id
from .registry import register_task

_BOOL_LABELS = {0: 0, 1: 1, "false": 0, "true": 1, "no": 0, "yes": 1}


@register_task("sst2", aliases=("sst-2",))
class SST2(ClassificationTask):
    layouts = {"glue": ("sentence", "label")}
    candidates = (" terrible", " great")
    label_map = {0: 0, 1: 1, "negative": 0, "positive": 1}

    def render(self, row: Row) -> str:
        return f"{row.text('sentence').strip()} It was"

    def calibration_prompt(self, example: Example) -> str:
        return "It was"


@register_task("rte")
class RTE(ClassificationTask):
    layouts = {"superglue": ("premise", "hypothesis", "label")}
    field_aliases = {"premise": ("sentence1",), "hypothesis": ("sentence2",)}
    candidates = ("Yes", "No")
    label_map = {0: 0, 1: 1, "entailment": 0, "not_entailment": 1}

    def render(self, row: Row) -> str:
        return f"{row.text('premise')}\nDoes this mean that \"{row.text('hypothesis')}\" is true? Yes or No?\n"


@register_task("cb")
class CB(ClassificationTask):
    layouts = {"superglue": ("premise", "hypothesis", "label")}
    candidates = ("Yes", "No", "Maybe")
    label_map = {0: 0, 1: 1, 2: 2, "entailment": 0, "contradiction": 1, "neutral": 2}
    default_num_dev = 100  # MeZO: CB has 250 train examples

    def render(self, row: Row) -> str:
        return f"Suppose {row.text('premise')} Can we infer that \"{row.text('hypothesis')}\"? Yes, No, or Maybe?\n"


@register_task("boolq")
class BoolQ(ClassificationTask):
    layouts = {"superglue": ("passage", "question", "label")}
    field_aliases = {"label": ("answer",)}
    candidates = ("No", "Yes")
    label_map = dict(_BOOL_LABELS)
    options = ("keep_title",)
    keep_title = True  # the file as it is; MeZO's protocol strips SuperGLUE's "<title> -- " (data.boolq_title)

    def passage(self, row: Row) -> str:
        passage = row.text("passage")
        if not self.keep_title and row.get("answer") is None:  # SuperGLUE (Google's files have "answer")
            title, sep, rest = passage.partition(" -- ")
            if sep and rest:
                passage = rest
        return passage

    def render(self, row: Row) -> str:  # MeZO BoolQTemplateV3
        question = row.text("question").strip()
        if not question.endswith("?"):
            question += "?"
        question = question[:1].upper() + question[1:]
        return f"{self.passage(row)} {question}\n"


@register_task("wsc")
class WSC(ClassificationTask):
    layouts = {"superglue": ("text", "target", "label"), "hf": ("text", "span1_text", "span2_text", "label")}
    candidates = ("No", "Yes")
    label_map = dict(_BOOL_LABELS)

    def render(self, row: Row) -> str:
        spans = row.sub(row["target"], "field 'target'") if row.get("span1_text") is None else row
        span1, span2 = spans.text("span1_text"), spans.text("span2_text")
        return (f"{row.text('text')}\nIn the previous sentence, does the pronoun \"{span2.lower()}\" refer to "
                f"{span1}? Yes or No?\n")


@register_task("wic")
class WiC(ClassificationTask):
    layouts = {"superglue": ("word", "sentence1", "sentence2", "label")}
    candidates = ("No", "Yes")
    label_map = dict(_BOOL_LABELS)

    def render(self, row: Row) -> str:
        return (f"Does the word \"{row.text('word')}\" have the same meaning in these two sentences? Yes, No?\n"
                f"{row.text('sentence1')}\n{row.text('sentence2')}\n")


@register_task("multirc")
class MultiRC(ClassificationTask):
    layouts = {"superglue": ("passage",), "hf": ("paragraph", "question", "answer", "label")}
    candidates = ("No", "Yes")
    label_map = dict(_BOOL_LABELS)

    @staticmethod
    def prompt(paragraph: str, question: str, answer: str) -> str:
        return (f"{paragraph}\nQuestion: {question}\nI found this answer \"{answer}\". Is that correct? "
                f"Yes or No?\n")

    def render(self, row: Row) -> str:
        return self.prompt(row.text("paragraph"), row.text("question"), row.text("answer"))

    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        if layout != "superglue":
            return super().examples_from_row(row, layout=layout, require_label=require_label)
        passage = row.sub(row["passage"], "field 'passage'")
        paragraph = passage.text("text")
        pid = _example_id(row, row.index)
        out = []
        for qi, q in enumerate(passage["questions"]):
            q = passage.sub(q, "passage.questions[]")
            for ai, a in enumerate(q["answers"]):
                a = q.sub(a, "passage.questions[].answers[]")
                label = self.parse_label(a, a.get("label"), require_label=require_label)
                out.append(Example(
                    id=f"{pid}-{q.get('idx', qi)}-{a.get('idx', ai)}",
                    prompt=self.prompt(paragraph, q.text("question"), a.text("text")),
                    candidates=list(self.candidates), label=label, task=self.name,
                    meta={"source": row.source, "row": row.index, "question": f"{pid}-{q.get('idx', qi)}"}))
        return out


@register_task("copa")
class COPA(ClassificationTask):
    layouts = {"superglue": ("premise", "choice1", "choice2", "question", "label")}
    label_map = {0: 0, 1: 1}
    default_num_dev = 100  # MeZO: COPA has 400 train examples
    default_objective = "loss"  # MeZO: LM loss on the gold option (train_as_classification False)

    def render(self, row: Row) -> str:
        premise = row.text("premise").rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        question = row.text("question").strip().lower()
        if question not in ("cause", "effect"):
            raise row.error(f"field 'question' must be 'cause' or 'effect', got {row['question']!r}")
        return premise + (" so" if question == "effect" else " because")

    @staticmethod
    def _lower_first(choice: str) -> str:
        words = choice.strip().split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " ".join(words)

    def row_candidates(self, row: Row) -> list[str]:
        return [" " + self._lower_first(row.text("choice1")), " " + self._lower_first(row.text("choice2"))]

    def calibration_prompt(self, example: Example) -> str:  # MeZO CopaTemplate.encode_sfc: the conjunction
        return example.prompt.rsplit(" ", 1)[-1]


@register_task("record")
class ReCoRD(ClassificationTask):
    """Multiple choice over the passage's entities; several candidates may be correct (aliases)."""

    layouts = {"superglue": ("passage", "qas"), "hf": ("passage", "query", "entities", "answers")}
    label_field = "answers"
    default_objective = "loss"  # MeZO: LM loss on the gold option (train_as_classification False)

    def calibration_prompt(self, example: Example) -> str:  # MeZO ReCoRDTemplateGPT3.encode_sfc
        return "-"

    @staticmethod
    def prompt(passage: str) -> str:  # MeZO ReCoRDTemplateGPT3
        return passage.replace("@highlight\n", "- ") + "\n-"

    def _make(self, row: Row, ex_id: str, passage: str, query: str, entities: list[str], answers: list[str],
              require_label: bool) -> Example:
        unique = list(dict.fromkeys(e for e in entities if e))
        if not unique:
            raise row.error(f"example {ex_id} has no entities")
        gold = [i for i, e in enumerate(unique) if e in set(answers)]
        if require_label and not answers:
            raise row.error(f"example {ex_id} has no gold answers")
        if answers and not gold:
            raise row.error(f"answer {answers[0]!r} of example {ex_id} is not among its entities")
        candidates = [" " + query.replace("@placeholder", e) for e in unique]
        # MeZO trains on (and demonstrates) correct_candidate[0]: the first of HF's sorted answers
        first = sorted(set(answers))[0] if answers else None
        train_label = unique.index(first) if first in unique else None
        return Example(id=ex_id, prompt=self.prompt(passage), candidates=candidates,
                       label=gold[0] if gold else None, alt_labels=tuple(gold[1:]), answers=list(answers),
                       task=self.name, meta={"source": row.source, "row": row.index, "entities": unique},
                       train_label=train_label if gold and train_label != gold[0] else None)

    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        rid = _example_id(row, row.index)
        if layout == "hf":
            answers = [str(a) for a in (row.get("answers") or [])]
            return [self._make(row, rid, row.text("passage"), row.text("query"), [str(e) for e in row["entities"]],
                               answers, require_label)]
        passage = row.sub(row["passage"], "field 'passage'")
        text = passage.text("text")
        entities = []
        for ent in passage.get("entities", []):
            ent = passage.sub(ent, "passage.entities[]")
            entities.append(text[int(ent["start"]):int(ent["end"]) + 1])  # ReCoRD spans are end-inclusive
        out = []
        for qi, qa in enumerate(row["qas"]):
            qa = row.sub(qa, "qas[]")
            answers = [str(qa.sub(a, "qas[].answers[]")["text"]) for a in (qa.get("answers") or [])]
            out.append(self._make(row, f"{rid}-{qa.get('idx', qi)}", text, qa.text("query"), entities, answers,
                                  require_label))
        return out


def _answer_texts(value: Any) -> list[str]:
    """Answers as a list of strings from {text: [...]}, {spans: [...]}, [{text: ...}], [str] or str."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        for key in ("text", "spans"):
            if key in value:
                return _answer_texts(value[key])
        return []
    out = []
    for item in value:
        if isinstance(item, Mapping):
            out.extend(_answer_texts(item.get("text")))
        elif item is not None:
            out.append(str(item))
    return out


@register_task("squad")
class SQuAD(GenerationTask):
    layouts = {"squad": ("paragraphs",), "hf": ("context", "question", "answers")}
    split_files = {"train": ("train", "train-v1.1", "train-v2.0"),
                   "dev": ("val", "validation", "dev", "dev-v1.1", "dev-v2.0"), "test": ("test",)}

    @staticmethod
    def prompt(title: str, context: str, question: str) -> str:
        return f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:"

    def render(self, row: Row) -> str:
        return self.prompt(str(row.get("title", "")), row.text("context"), row.text("question"))

    def row_answers(self, row: Row, layout: str) -> list[str]:
        return _answer_texts(row["answers"])

    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        if layout == "hf":
            answers = _answer_texts(row.get("answers"))
            if require_label and not answers:
                return []  # unanswerable (SQuAD v2): skipped, as MeZO trains on answerable questions
            return self.make_example(row, _example_id(row, row.index), self.render(row), answers, require_label)
        title = str(row.get("title", ""))
        out = []
        for pi, para in enumerate(row["paragraphs"]):
            para = row.sub(para, "paragraphs[]")
            context = para.text("context")
            for qi, qa in enumerate(para["qas"]):
                qa = para.sub(qa, "paragraphs[].qas[]")
                answers = _answer_texts(qa.get("answers"))
                if require_label and not answers:
                    continue
                ex_id = str(qa.get("id", f"{row.index}-{pi}-{qi}"))
                out.extend(self.make_example(row, ex_id, self.prompt(title, context, qa.text("question")), answers,
                                             require_label))
        return out


@register_task("drop")
class DROP(GenerationTask):
    layouts = {"hf": ("passage", "question", "answers_spans"), "flat": ("passage", "question", "answers"),
               "official": ("passage", "qa_pairs")}
    label_field = "answers_spans"
    extra_label_fields = ("answers",)
    split_files = {"train": ("train", "drop_dataset_train"),
                   "dev": ("val", "validation", "dev", "drop_dataset_dev"), "test": ("test",)}

    def render(self, row: Row) -> str:
        return f"Passage: {row.text('passage')}\nQuestion: {row.text('question').strip()}\nAnswer:"

    def row_answers(self, row: Row, layout: str) -> list[str]:
        return _answer_texts(row["answers_spans"] if layout == "hf" else row["answers"])

    def examples_from_row(self, row: Row, *, layout: str, require_label: bool) -> list[Example]:
        if layout == "official":
            return self._official(row, require_label)
        key = "answers_spans" if layout == "hf" else "answers"
        answers = self.row_answers(row, layout) if (require_label or row.get(key) is not None) else []
        ex_id = str(row.get("query_id") or _example_id(row, row.index))
        return self.make_example(row, ex_id, self.render(row), answers, require_label)

    def _official(self, row: Row, require_label: bool) -> list[Example]:
        """One passage of the official file: an example per question, with HF's answers_spans (the drop
        builder: the train file's "answer", the dev file's "validated_answers"; a number, a date as
        "day month year", or each span). A question whose answers break that builder's rules is skipped, as
        HF skips it (9 of train, 1 of dev)."""
        passage = row.text("passage")
        out = []
        for qi, qa in enumerate(row["qa_pairs"]):
            qa = row.sub(qa, "qa_pairs[]")
            validated = qa.get("validated_answers") or []
            answers = _drop_spans(validated if validated else [qa.get("answer") or {}])
            if answers is None or (require_label and not answers):
                continue
            ex_id = str(qa.get("query_id") or f"{row.get('section_id', row.index)}-{qi}")
            prompt = f"Passage: {passage}\nQuestion: {qa.text('question').strip()}\nAnswer:"
            out.extend(self.make_example(row, ex_id, prompt, answers, require_label))
        return out


def _drop_spans(answers: list) -> list[str] | None:
    """HF drop's build_answers: per answer its number, or its date ("day month year" joined by spaces, stripped),
    or its spans; None (HF skips the question) where an answer has more than one of them, or none has any."""
    spans: list[str] = []
    for a in answers:
        if not isinstance(a, Mapping):
            return None
        number = str(a.get("number") or "")
        d = a.get("date") or {}
        date = " ".join(str(d.get(k) or "") for k in ("day", "month", "year")).strip() if isinstance(d, Mapping) else ""
        parts = [str(x) for x in (a.get("spans") or [])]
        if sum(bool(x) for x in (number, date, parts)) > 1:
            return None
        spans.extend([number] if number else [date] if date else parts)
    return spans or None
