"""The quiz judge (Anyscale's recipe): the judge LLM writes K multiple-choice questions with an answer key about
each source text, then answers them from each response alone, allowed to say "unsure". SCORE = correct answers
(0..K); a response the judge could not be read for gets NaN (counted by the stage, never paired).

Two passes through the judge model (common.judges.llm.ask, the same vLLM-on-Ray-Data engine as stage 1):
1. one row per distinct source: the questions, as JSON {"questions": [{"question", "options", "answer"}]}
   (exactly K questions of num_options options each are required, else that source's responses are unparseable);
2. one row per response: {"answers": [...]} with one option letter or "unsure" per question; a reply that is not
   K answers is unparseable, an entry that names no option counts as unsure.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from common import schema as S
from common.config import LLMJudgeConfig, QuizConfig
from common.data import num_blocks
from common.judges.base import with_scores
from common.judges.llm import RAW, SKIPPED, ask, extract_json, letters, llm_asks, read_choice
from common.ray_setup import Ask

QUESTIONS = "_quiz_questions"  # JSON of the parsed questions of the row's source ("" = none parsed)


# ---------------------------------------------------------------- schemas and prompts
def questions_schema(k: int, num_options: int) -> dict:
    question = {"type": "object", "properties": {
        "question": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"}, "minItems": num_options, "maxItems": num_options},
        "answer": {"type": "string", "enum": letters(num_options)},
    }, "required": ["question", "options", "answer"], "additionalProperties": False}
    return {"type": "object", "properties": {"questions": {"type": "array", "items": question, "minItems": k,
                                                           "maxItems": k}},
            "required": ["questions"], "additionalProperties": False}


def answers_schema(k: int, num_options: int) -> dict:
    choice = {"type": "string", "enum": letters(num_options) + ["unsure"]}
    return {"type": "object", "properties": {"answers": {"type": "array", "items": choice, "minItems": k,
                                                         "maxItems": k}},
            "required": ["answers"], "additionalProperties": False}


def render_questions(questions: list[dict]) -> str:
    lines = []
    for i, q in enumerate(questions, 1):
        lines.append(f"{i}. {q['question']}")
        lines += [f"   {letter}) {text}" for letter, text in zip(letters(len(q["options"])), q["options"])]
    return "\n".join(lines)


def question_messages(source: str, quiz: QuizConfig) -> list[dict]:
    opts = letters(quiz.num_options)
    return [{"role": "user", "content": quiz.question_prompt.format(
        source=source, num_questions=quiz.num_questions, num_options=quiz.num_options,
        letters=", ".join(opts), last_letter=opts[-1])}]


def answer_messages(response: str, questions: list[dict], quiz: QuizConfig) -> list[dict]:
    opts = letters(quiz.num_options)
    return [{"role": "user", "content": quiz.answer_prompt.format(
        response=response, questions=render_questions(questions), num_questions=len(questions),
        letters=", ".join(opts), last_letter=opts[-1])}]


# ---------------------------------------------------------------- parsing and scoring (pure, unit-tested)
def parse_questions(text: str | None, k: int, num_options: int) -> list[dict] | None:
    """K well-formed questions from the judge's reply, or None. Options may come as a list or as {"A": ...};
    the key may be a letter, a 1-based index or the option's text. Extra questions beyond K are ignored."""
    data = extract_json(text)
    items = data.get("questions") if isinstance(data, dict) else data
    if not isinstance(items, list):
        return None
    out = []
    for q in items:
        if not isinstance(q, dict):
            continue
        opts = q.get("options", q.get("choices"))
        if isinstance(opts, dict):
            opts = [opts[key] for key in sorted(opts)]
        if not isinstance(opts, list) or len(opts) != num_options or not all(str(o).strip() for o in opts):
            continue
        opts = [str(o).strip() for o in opts]
        key = read_choice(q.get("answer", q.get("correct")), opts)
        text_q = str(q.get("question", "")).strip()
        if key in (None, "unsure") or not text_q:
            continue
        out.append({"question": text_q, "options": opts, "answer": key})
    return out[:k] if len(out) >= k else None


def parse_answers(text: str | None, questions: list[dict]) -> list[str] | None:
    """One letter or "unsure" per question, or None when the reply is not a list of len(questions) answers."""
    data = extract_json(text)
    items = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(items, list) or len(items) != len(questions):
        return None
    return [read_choice(a, q["options"]) or "unsure" for a, q in zip(items, questions)]


def grade(answers: list[str] | None, questions: list[dict] | None) -> tuple[float, dict[str, Any]]:
    """(score, detail): score = answers matching the key; NaN when the questions or the answers are unparseable."""
    if questions is None:
        return math.nan, {"error": "questions_unparseable"}
    if answers is None:
        return math.nan, {"error": "answers_unparseable", "questions": len(questions)}
    key = [q["answer"] for q in questions]
    correct = sum(a == k for a, k in zip(answers, key))
    unsure = sum(a == "unsure" for a in answers)
    return float(correct), {"questions": len(questions), "correct": correct, "unsure": unsure,
                            "wrong": len(questions) - correct - unsure, "answers": answers, "key": key}


# ---------------------------------------------------------------- the judge
def _grade_batch(batch):
    scores, details = [], []
    for raw, skipped, qjson in zip(batch[RAW], batch[SKIPPED], batch[QUESTIONS]):
        questions = json.loads(qjson) if qjson else None
        if skipped:
            score, detail = math.nan, {"error": skipped.split(" ")[0]}
        else:
            score, detail = grade(parse_answers(raw, questions) if questions else None, questions)
        if math.isnan(score) and raw:
            detail["raw"] = raw[:2000]  # what the judge said, to see why it did not parse
        scores.append(score)
        details.append(detail)
    out = with_scores(batch, scores, details)
    for k in (RAW, SKIPPED, QUESTIONS):
        out.pop(k)
    return out


class QuizJudge:
    def __init__(self, llm: LLMJudgeConfig, quiz: QuizConfig):
        self.llm, self.quiz = llm, quiz
        self.question_stats: dict[str, int] = {}

    def asks(self) -> list[Ask]:
        return llm_asks(self.llm)

    def score(self, ds):
        """Pass 1 (questions) runs now; pass 2 (answers) is returned lazy. `ds` is materialised: read twice."""
        import ray

        quiz = self.quiz
        ds = ds.materialize()
        sources: dict[str, str] = {}
        for r in ds.select_columns([S.PROMPT_ID, S.SOURCE]).iter_rows():
            sources.setdefault(r[S.PROMPT_ID], r[S.SOURCE])
        items = [{S.PROMPT_ID: p, S.SOURCE: s} for p, s in sources.items()]
        blocks = num_blocks(len(items), self.llm.engine.concurrency)
        written = ask(ray.data.from_items(items, override_num_blocks=blocks), self.llm,
                      build=lambda row: question_messages(row[S.SOURCE], quiz),
                      schema=questions_schema(quiz.num_questions, quiz.num_options),
                      max_tokens=self.llm.max_tokens).take_all()
        questions = {}
        for r in written:
            qs = None if r[SKIPPED] else parse_questions(r[RAW], quiz.num_questions, quiz.num_options)
            questions[r[S.PROMPT_ID]] = json.dumps(qs) if qs else ""
        self.question_stats = {"sources": len(items), "sources_questions_unparseable":
                               sum(1 for v in questions.values() if not v)}

        def attach(batch):
            batch[QUESTIONS] = np.asarray([questions.get(p, "") for p in batch[S.PROMPT_ID]], dtype=object)
            return batch

        def build(row):
            if not row[QUESTIONS]:
                return "questions_unparseable"
            return answer_messages(row[S.RESPONSE], json.loads(row[QUESTIONS]), quiz)

        # ~8 tokens per answer is plenty for {"answers": ["A", "unsure", ...]}.
        answered = ask(ds.map_batches(attach, num_cpus=0.25), self.llm, build=build,
                       schema=answers_schema(quiz.num_questions, quiz.num_options),
                       max_tokens=min(self.llm.max_tokens, 16 + 8 * quiz.num_questions))
        return answered.map_batches(_grade_batch, num_cpus=0.25)

    def summary(self, details: list[dict]) -> dict:
        graded = [d for d in details if "correct" in d]
        answers = sum(d["questions"] for d in graded)
        return {**self.question_stats,
                "mean_correct": round(sum(d["correct"] for d in graded) / len(graded), 3) if graded else None,
                "unsure_share": round(sum(d["unsure"] for d in graded) / answers, 3) if answers else None}
