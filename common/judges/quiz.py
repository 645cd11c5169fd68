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

import functools
import json
import math
from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from common import schema as S
from common.config import LLMJudgeConfig, QuizConfig
from common.groups import TASK_CPUS, by_prompt, first_per_prompt, split_group, with_rows_of
from common.judges.llm import RAW, SKIPPED, ask, letters, llm_asks, parse_reply, read_choice, score_replies
from common.ray_setup import Ask

QUESTIONS = "_quiz_questions"  # JSON of the parsed questions of the row's source ("" = none parsed)


# ---------------------------------------------------------------- the two replies, as pydantic models
def _read_question(q: Any) -> Any:
    """A question as judges write it without structured outputs, mapped onto the schema: options as {"A": ...} or
    under "choices", the key under "correct" or as "b)", a 1-based index or the option's text (read_choice)."""
    if not isinstance(q, dict):
        return q
    opts = q.get("options", q.get("choices"))
    if isinstance(opts, dict):
        opts = [opts[key] for key in sorted(opts)]
    if isinstance(opts, list):
        opts = [str(o).strip() for o in opts]
    answer = read_choice(q.get("answer", q.get("correct")), opts) if isinstance(opts, list) else None
    return {"question": str(q.get("question") or "").strip(), "options": opts, "answer": answer}


def _valid(model: type[BaseModel], item: Any) -> BaseModel | None:
    try:
        return model.model_validate(item)
    except ValidationError:
        return None


@functools.lru_cache(maxsize=None)
def questions_model(k: int, num_options: int) -> type[BaseModel]:
    """Pass 1's reply: {"questions": [{"question", "options", "answer"}]}, exactly k questions of num_options
    options, the answer an option letter. Reading a reply, malformed questions are skipped and those beyond k
    ignored; a bare list is the questions."""
    class Question(BaseModel):
        model_config = ConfigDict(extra="forbid")
        question: str = Field(min_length=1)
        options: list[Annotated[str, Field(min_length=1)]] = Field(min_length=num_options, max_length=num_options)
        answer: Literal[tuple(letters(num_options))]  # type: ignore[valid-type]

        @model_validator(mode="before")
        @classmethod
        def _read(cls, q: Any) -> Any:
            return _read_question(q)

    class Questions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        questions: list[Question] = Field(min_length=k, max_length=k)

        @model_validator(mode="before")
        @classmethod
        def _first_k_valid(cls, data: Any) -> Any:
            items = data.get("questions") if isinstance(data, dict) else data
            if not isinstance(items, list):
                return data
            return {"questions": [q for q in (_valid(Question, item) for item in items) if q is not None][:k]}

    return Questions


@functools.lru_cache(maxsize=None)
def answers_model(k: int, num_options: int) -> type[BaseModel]:
    """Pass 2's reply: {"answers": [...]}, one option letter or "unsure" per question. Reading a reply (validation
    context: the `questions`), an entry that names no option of its question counts as unsure; a bare list is the
    answers."""
    class Answers(BaseModel):
        model_config = ConfigDict(extra="forbid")
        answers: list[Literal[tuple(letters(num_options) + ["unsure"])]] = Field(  # type: ignore[valid-type]
            min_length=k, max_length=k)

        @model_validator(mode="before")
        @classmethod
        def _read(cls, data: Any, info: ValidationInfo) -> Any:
            items = data.get("answers") if isinstance(data, dict) else data
            questions = (info.context or {}).get("questions")
            if not isinstance(items, list) or questions is None or len(items) != len(questions):
                return data
            return {"answers": [read_choice(a, q["options"]) or "unsure" for a, q in zip(items, questions)]}

    return Answers


# ---------------------------------------------------------------- prompts
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
    """K well-formed questions from the judge's reply (see questions_model), or None."""
    reply = parse_reply(text, questions_model(k, num_options))
    return [q.model_dump() for q in reply.questions] if reply else None


def parse_answers(text: str | None, questions: list[dict]) -> list[str] | None:
    """One letter or "unsure" per question, or None when the reply is not a list of len(questions) answers."""
    if not questions:
        return None
    reply = parse_reply(text, answers_model(len(questions), len(questions[0]["options"])), questions=questions)
    return list(reply.answers) if reply else None


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
def _grade(raw: str, questions_json: str) -> tuple[float, dict[str, Any]]:
    questions = json.loads(questions_json)  # never empty: a row without questions is not sent (see build)
    return grade(parse_answers(raw, questions), questions)


def _read_questions(batch: pa.Table, k: int, num_options: int) -> pa.Table:
    """The judge's replies about each source -> (PROMPT_ID, SOURCE, QUESTIONS): the parsed questions, "" if none."""
    qs = [None if skipped else parse_questions(raw, k, num_options)
          for raw, skipped in zip(batch.column(RAW).to_pylist(), batch.column(SKIPPED).to_pylist())]
    return batch.select([S.PROMPT_ID, S.SOURCE]).append_column(
        QUESTIONS, pa.array([json.dumps(q) if q else "" for q in qs], pa.string()))


def _with_questions(group: pa.Table) -> pa.Table:
    """One prompt's responses and its questions row (the one with QUESTIONS set) -> the responses, each with the
    row's QUESTIONS and SOURCE (every prompt has that row: ask returns a row for each it was given)."""
    own, rows = split_group(group, pc.is_valid(group.column(QUESTIONS)))
    for name in (QUESTIONS, S.SOURCE):
        value = own.column(name)[0].as_py() if own.num_rows else ""
        rows = rows.set_column(rows.column_names.index(name), name,
                               pa.array([value] * rows.num_rows, rows.schema.field(name).type))
    return rows


class QuizJudge:
    def __init__(self, llm: LLMJudgeConfig, quiz: QuizConfig):
        self.llm, self.quiz = llm, quiz
        self.question_stats: dict[str, int] = {}

    def asks(self) -> list[Ask]:
        return llm_asks(self.llm)

    def score(self, ds):
        """Pass 1 (questions, one per source) runs now; pass 2 (answers) is returned lazy. Both on Ray Data: a
        source is asked about once, and its questions join the prompt's responses in a groupby (common.groups)."""
        from ray.data.expressions import col

        quiz, tasks = self.quiz, dict(batch_format="pyarrow", num_cpus=TASK_CPUS)
        ds = ds.materialize()  # read twice: for the sources, then to answer
        blocks = max(1, ds.num_blocks())
        # One row per source: first per block (a prompt's rows mostly share one), then per prompt. Materialised
        # before the engine starts, and again after it: no vLLM actor holds a CPU while a groupby runs.
        sources = by_prompt(ds.select_columns([S.PROMPT_ID, S.SOURCE]).map_batches(first_per_prompt, **tasks),
                            first_per_prompt, blocks).materialize()
        written = ask(sources, self.llm, build=lambda row: question_messages(row[S.SOURCE], quiz),
                      reply=questions_model(quiz.num_questions, quiz.num_options), max_tokens=self.llm.max_tokens)
        questions = written.map_batches(_read_questions, fn_args=(quiz.num_questions, quiz.num_options),
                                        **tasks).materialize()
        self.question_stats = {"sources": questions.count(),
                               "sources_questions_unparseable": questions.filter(expr=col(QUESTIONS) == "").count()}
        # The responses go in without their source and get it back, with the questions, from the prompt's row.
        asked = by_prompt(with_rows_of(ds.drop_columns([S.SOURCE]), questions), _with_questions,
                          blocks).materialize()

        def build(row):
            if not row[QUESTIONS]:
                return "questions_unparseable"
            return answer_messages(row[S.RESPONSE], json.loads(row[QUESTIONS]), quiz)

        # ~8 tokens per answer is plenty for {"answers": ["A", "unsure", ...]}.
        answered = ask(asked, self.llm, build=build, reply=answers_model(quiz.num_questions, quiz.num_options),
                       max_tokens=min(self.llm.max_tokens, 16 + 8 * quiz.num_questions))
        return answered.map_batches(score_replies, fn_args=(_grade, QUESTIONS), num_cpus=TASK_CPUS)

    def summary(self, details: list[dict]) -> dict:
        graded = [d for d in details if "correct" in d]
        answers = sum(d["questions"] for d in graded)
        return {**self.question_stats,
                "mean_correct": round(sum(d["correct"] for d in graded) / len(graded), 3) if graded else None,
                "unsure_share": round(sum(d["unsure"] for d in graded) / answers, 3) if answers else None}
