"""Judges: score each response to a prompt. Pick one with `judge.type` in the stage-2 config.

    from common.judges import build_judge
    judge = build_judge(cfg.judge)      # a common.config.JudgeConfig
    judge.asks()                        # the Ray workers it will start: [common.ray_setup.Ask, ...]
    scored = judge.score(ds)            # lazy Dataset: every input column + SCORE, NUM_WORDS, JUDGE_DETAIL
    judge.summary(details)              # judge-specific counts for the manifest (details: parsed JUDGE_DETAILs)

`ds` needs PROMPT_ID, SOURCE (what faithfulness is checked against) and RESPONSE. SCORE is a float, higher is
better, NaN when the judge's output could not be read; NUM_WORDS counts whitespace words; JUDGE_DETAIL is a JSON
string of what the judge said. Stage 2 pairs on (SCORE, NUM_WORDS) with common.pairing; stage 4 builds the judge of
stage 2's manifest with `build_judge` and decides model-vs-baseline with the same rule (common.pairing.compare), so
"better" means one thing in training data and in evaluation.

    similarity  MiniLM cosine(response, source) - a copy penalty: the CPU default   (common/judges/similarity.py)
    quiz        K multiple-choice questions per source, answered from the response  (common/judges/quiz.py)
    rubric      a 1..N rating, or pairwise A/B verdicts in both orders              (common/judges/rubric.py)
    length      word count + a hash of the text, no model: for benchmarks only      (common/judges/length.py)

A new judge is one module: a class with `asks()`, `score(ds)` and `summary(details)` (build the three columns with
common.judges.base.with_scores), one line in JUDGES below, its name in JudgeConfig.type and, if it has settings,
a block in JudgeConfig (common/config.py).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, Callable

from common.config import JudgeConfig
from common.judges.base import Judge, num_words, with_scores  # noqa: F401  (re-exported)
from common.judges.length import LengthJudge
from common.judges.quiz import QuizJudge
from common.judges.rubric import RubricJudge
from common.judges.similarity import SimilarityJudge

JUDGES: dict[str, Callable[[JudgeConfig], Judge]] = {
    "similarity": lambda cfg: SimilarityJudge(cfg.similarity),
    "quiz": lambda cfg: QuizJudge(cfg.llm, cfg.quiz),
    "rubric": lambda cfg: RubricJudge(cfg.llm, cfg.rubric),
    "length": lambda cfg: LengthJudge(),
}


def build_judge(cfg: JudgeConfig) -> Judge:
    return JUDGES[cfg.type](cfg)


def score_range(cfg: JudgeConfig) -> tuple[float, float]:
    """The lowest and highest SCORE the configured judge can give (to check pairing.quality_threshold)."""
    if cfg.type == "similarity":
        return -1.0 - cfg.similarity.copy_penalty, 1.0
    if cfg.type == "quiz":
        return 0.0, float(cfg.quiz.num_questions)
    if cfg.type == "rubric":
        return (0.0, 1.0) if cfg.rubric.pairwise else (1.0, float(cfg.rubric.scale_max))
    if cfg.type == "length":
        return 0.0, 1.0
    return -math.inf, math.inf


def error_counts(details: list[dict[str, Any]]) -> dict[str, int]:
    """Why responses got no score, by reason (the first word of each detail's `error`)."""
    return dict(Counter(str(d["error"]).split(" ")[0] for d in details if d.get("error")))


def parse_details(column) -> list[dict[str, Any]]:
    return [json.loads(d) if d else {} for d in column]
