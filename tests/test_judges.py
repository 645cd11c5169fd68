"""Judges: parsing of judge replies (recorded malformed outputs included), the scoring arithmetic, and real runs:
the MiniLM similarity judge on ACLSum through Ray Data, and the quiz and rubric judges through vLLM on Ray Data with
the embedded 135M model as judge (its answers are poor: these runs check the pipeline and the counting)."""
import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from common import schema as S
from common.config import REPO, JudgeConfig, LLMJudgeConfig, QuizConfig, RubricConfig, load_config
from common.judges import build_judge, error_counts, parse_details
from common.judges.llm import RAW, SKIPPED, extract_json, read_choice, score_replies
from common.judges.quiz import answers_model, grade, parse_answers, parse_questions, questions_model
from common.judges.rubric import Verdict, combine_orders, parse_rating, parse_verdict, rating_model, win_shares
from common.judges.similarity import _Embedder, penalized
from common.metrics import copy_fraction
from common.pairing import compare

QUICKSTART = load_config("02_judge", str(REPO / "configs/quickstart/02_judge.yaml"), [])
QS = QUICKSTART.pairing  # the quickstart's rule
OPTS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def q(answer="B", options=OPTS, text="What is it?"):
    return {"question": text, "options": list(options), "answer": answer}


def aclsum(split="test"):
    return [json.loads(line) for line in open(REPO / "data" / "aclsum" / f"{split}.jsonl")]


# ---------------------------------------------------------------- JSON extraction and choices
@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('Sure! Here you go:\n```json\n{"answers": ["A", "B"]}\n```\nHope it helps', {"answers": ["A", "B"]}),
    ("{'answers': ['A', 'unsure']}", {"answers": ["A", "unsure"]}),  # Python-style quotes
    ('{"answers": ["A", "B",],}', {"answers": ["A", "B"]}),  # trailing commas
    ('The answers are ["C", "D"] I think', ["C", "D"]),
    ('text with {braces} and then {"score": 7}', {"score": 7}),
    ('{"questions": [{"question": "x", "options": ["a", "b"', None),  # cut off at max_tokens
    ("no json here at all", None),
    ("", None),
    (None, None),
])
def test_extract_json(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize("value, expected", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("D) delta", "D"), ("A. alpha", "A"), ("Option E", "E"), (2, "B"),
    ("3", "C"), ("gamma", "C"), ("Unsure", "unsure"), ("I don't know", "unsure"), ("n/a", "unsure"),
    ("F", None), (7, None), ("maybe beta or gamma", None), (None, None), (True, None), (1.5, None),
])
def test_read_choice(value, expected):
    assert read_choice(value, OPTS) == expected


# ---------------------------------------------------------------- quiz parsing and grading
def test_parse_questions_accepts_variants():
    reply = json.dumps({"questions": [
        q("B"), {"question": "Which?", "choices": {"A": "1", "B": "2", "C": "3", "D": "4", "E": "5"}, "answer": "5"},
        q("gamma")]})
    got = parse_questions(reply, k=3, num_options=5)
    assert [x["answer"] for x in got] == ["B", "E", "C"]
    assert got[1]["options"] == ["1", "2", "3", "4", "5"]
    assert parse_questions(json.dumps([q(), q(), q(), q()]), k=3, num_options=5) == [q(), q(), q()]  # bare list


@pytest.mark.parametrize("reply", [
    json.dumps({"questions": [q(), q()]}),  # too few questions
    json.dumps({"questions": [q(), q(options=OPTS[:3]), q()]}),  # wrong number of options
    json.dumps({"questions": [q(), q(answer="Z"), q()]}),  # key names no option
    json.dumps({"questions": [q(), q(text=""), q()]}),  # empty question
    json.dumps({"questions": [q(), q(answer="unsure"), q()]}),  # a key must be an answer
    '{"questions": [{"question": "What does the paper propose?", "options": ["A new',  # truncated
    "1. What does the paper propose?\nA) a parser B) a tagger\nAnswer: A",  # prose, no JSON
    '{"question": "What?", "options": ["a", "b", "c", "d", "e"], "answer": "A"}',  # one object, no list
])
def test_parse_questions_rejects_malformed(reply):
    assert parse_questions(reply, k=3, num_options=5) is None


def test_parse_answers_and_grade_arithmetic():
    questions = [q("A"), q("B"), q("C"), q("D"), q("E")]
    answers = parse_answers('```json\n{"answers": ["A", "b)", "unsure", "E", "no idea at all"]}\n```', questions)
    assert answers == ["A", "B", "unsure", "E", "unsure"]  # an entry naming no option counts as unsure
    score, detail = grade(answers, questions)
    assert score == 2.0
    assert (detail["correct"], detail["unsure"], detail["wrong"], detail["questions"]) == (2, 2, 1, 5)
    assert grade(["unsure"] * 5, questions)[0] == 0.0
    assert grade(["A", "B", "C", "D", "E"], questions)[0] == 5.0


@pytest.mark.parametrize("reply", [
    '{"answers": ["A", "B"]}',  # fewer answers than questions
    '{"answer": "A"}',
    "A, B, C",
    '{"answers": ["A", "B", "C"',
    "",
])
def test_unparseable_answers_score_nan(reply):
    questions = [q("A"), q("B"), q("C")]
    score, detail = grade(parse_answers(reply, questions), questions)
    assert math.isnan(score) and detail["error"] == "answers_unparseable"
    score, detail = grade(None, None)
    assert math.isnan(score) and detail["error"] == "questions_unparseable"


def test_reply_schemas_are_what_vllm_is_asked_for():
    """The JSON schemas vLLM's structured outputs get: exactly k questions of n options keyed A.., k answers."""
    s = questions_model(5, 4).model_json_schema()
    qs = s["properties"]["questions"]
    assert (qs["minItems"], qs["maxItems"]) == (5, 5) and s["additionalProperties"] is False
    question = s["$defs"][qs["items"]["$ref"].split("/")[-1]]
    assert question["properties"]["answer"]["enum"] == ["A", "B", "C", "D"]
    assert question["properties"]["options"]["minItems"] == question["properties"]["options"]["maxItems"] == 4
    a = answers_model(5, 4).model_json_schema()["properties"]["answers"]
    assert (a["minItems"], a["maxItems"], a["items"]["enum"]) == (5, 5, ["A", "B", "C", "D", "unsure"])
    assert rating_model(10).model_json_schema()["properties"]["score"]["enum"] == list(range(1, 11))
    assert Verdict.model_json_schema()["properties"]["winner"]["enum"] == ["A", "B", "tie"]
    # a reply that follows the schema parses as such
    reply = json.dumps({"questions": [q("C", OPTS[:4])] * 5})
    assert parse_questions(reply, k=5, num_options=4) == [q("C", OPTS[:4])] * 5


def test_score_replies_counts_every_row():
    """The one reply-to-score loop of the LLM judges: parsed, unparseable (raw kept) and not sent (the reason)."""
    batch = {S.RESPONSE: np.array(["a b", "c", "d e f"], dtype=object),
             RAW: np.array(['{"score": 4}', "no idea", ""], dtype=object),
             SKIPPED: np.array(["", "", "judge_prompt_too_long (9 > 8 tokens)"], dtype=object)}
    out = score_replies(batch, lambda raw: (parse_rating(raw, 5), {}))
    assert set(out) == {S.RESPONSE, S.SCORE, S.NUM_WORDS, S.JUDGE_DETAIL}
    assert out[S.SCORE][0] == 4.0 and np.isnan(out[S.SCORE][1:]).all()
    assert list(out[S.NUM_WORDS]) == [2, 1, 3]
    details = parse_details(out[S.JUDGE_DETAIL])
    assert details == [{}, {"raw": "no idea"}, {"error": "judge_prompt_too_long (9 > 8 tokens)"}]
    assert error_counts(details) == {"judge_prompt_too_long": 1}



def test_prompt_templates_are_checked_when_the_config_loads():
    with pytest.raises(ValidationError, match=r"placeholders are \{source\}, \{response\}, \{scale_max\}"):
        RubricConfig(prompt="Rate {summary} against {source}")
    with pytest.raises(ValidationError, match="literal braces"):
        QuizConfig(answer_prompt='Reply {"answers": []} for {response}')
    QuizConfig(answer_prompt='Reply {{"answers": []}} for {response}')  # escaped braces are fine

# ---------------------------------------------------------------- rubric parsing and pairwise arithmetic
@pytest.mark.parametrize("text, expected", [
    ('{"score": 7}', 7.0), ('{"rating": "8"}', 8.0), ("Score: 6", 6.0), ("I would rate it 9/10.", 9.0),
    ("4 out of 10", 4.0), ("7", 7.0), ("**5**", 5.0),
    ('{"score": 11}', math.nan), ('{"score": 0}', math.nan), ('{"score": 6.5}', math.nan),
    ('{"quality": 5}', math.nan), ("The paper improves MRR by 20%.", math.nan), ("", math.nan),
])
def test_parse_rating(text, expected):
    got = parse_rating(text, scale_max=10)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


@pytest.mark.parametrize("text, expected", [
    ('{"winner": "A"}', "A"), ('{"winner": "b"}', "B"), ('{"winner": "tie"}', "tie"), ("Summary B", "B"),
    ("A", "A"), ("**A**", "A"), ("Neither", "tie"), ('{"winner": "C"}', None), ("Both are good.", None), ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_pairwise_keeps_only_consistent_verdicts():
    assert combine_orders("A", "B") == "x"  # x first: A; y first: B (= x) -> x, both orders agree
    assert combine_orders("B", "A") == "y"
    assert combine_orders("A", "A") == "inconsistent"  # always the first position: position bias
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("A", None) == "unparseable"
    # (first, second, outcome): "x" = the first won, "y" = the second won
    shares = win_shares([("p", "q", "x"), ("p", "r", "inconsistent"), ("q", "r", "x"), ("p", "w", "unparseable")])
    # p: 1 win + 1 inconsistent (half) of 2 readable = 0.75; q: 1 loss, 1 win = 0.5; r: 0.5 of 2 = 0.25; w: NaN
    assert shares["p"]["score"] == 0.75 and shares["q"]["score"] == 0.5 and shares["r"]["score"] == 0.25
    assert math.isnan(shares["w"]["score"]) and shares["p"]["inconsistent"] == 1


# Replies the embedded 135M model gave as judge without guided JSON (recorded once, shortened).
RECORDED_QUESTIONS = (
    "Question:\n\nWhat is the best way to test the performance of a machine translation (MT) system?\n\n"
    "Question:\n\nWhat is the best way to test the performance of a machine translation (MT) system?\n\n"
    "Question:\n\nWhat is t"
)
RECORDED_ANSWERS = [
    "1. What does the paper propose?\nA) Alpha\nB) Beta\nC) Gamma\nD) Delta\n\nQuestion: What does the paper "
    "propose?\nB) Alpha\nC) Beta\nD) Gamma\n\nQuestion: Which data is used?\nA) Alpha\nB) Beta\nC) Gamma\nD) "
    "Delta\n\nQuestion: What does the proposed analog",
    "A) alpha",
]
RECORDED_RATINGS = [
    "https://www.golang.org/p/zvwvwvw/1\n\nA:\n\nhttps://www.golang.org/p/zvwvwvw/1\n\nA:\n\n",
    "The source is:\nhttps://www.google.com/translate/#!api_key=12345678901234567890123456789012345678901234567890",
    "The source is:\nhttps://www.google.com/translate/translate-google-translate-handling-terminology-is-an-"
    "important-matter-in-a-translation-workflow-1\n\nThe summary is:\nHandling terminology is an important matter "
    "in a translation workflow\n\nThe source is:\n",
]


def test_recorded_135m_replies_are_unparseable_not_errors():
    assert parse_questions(RECORDED_QUESTIONS, k=3, num_options=4) is None
    questions = [q("A", OPTS[:4]), q("B", OPTS[:4]), q("C", OPTS[:4])]
    for reply in RECORDED_ANSWERS:
        score, detail = grade(parse_answers(reply, questions), questions)
        assert math.isnan(score) and detail["error"] == "answers_unparseable"
    assert all(math.isnan(parse_rating(r, scale_max=10)) for r in RECORDED_RATINGS)


# ---------------------------------------------------------------- the similarity judge's copy penalty
def test_copy_penalty_arithmetic_by_hand():
    """Response "A b, c d e." vs source "a b c d x y": 4-grams (a b c d) (b c d e), only the first in the source.
    SCORE = 0.9 - 0.5 * 1/2 = 0.65. Under 4 words there is no 4-gram: nothing copied (None)."""
    assert copy_fraction("A b, c d e.", "a b c d x y") == 0.5
    assert penalized(0.9, 0.5, 0.5) == pytest.approx(0.65)
    assert copy_fraction("a b c", "a b c") is None
    assert penalized(0.9, 0.5, 0.0) == 0.9


def test_a_copy_of_the_abstract_loses_to_the_human_summary():
    """The quickstart's judge (real MiniLM, the judge's own batch callable, no Ray) on every validation abstract:
    the abstract verbatim and its first half score below the threshold and lose to ACLSum's human summary under the
    pairing rule, while the human summaries stay faithful. Without the penalty the first half, as faithful by
    cosine and shorter, beats the human summary for most abstracts: the penalty is what makes copying lose."""
    import pyarrow as pa

    sim = QUICKSTART.judge.similarity
    assert QUICKSTART.judge.type == "similarity" and sim.copy_penalty > 0
    papers = aclsum("val")
    kinds = {"human": lambda p: p["summary"], "copy": lambda p: p["abstract"],
             "half": lambda p: " ".join(p["abstract"].split()[:len(p["abstract"].split()) // 2])}
    rows = [(k, p["abstract"], f(p)) for p in papers for k, f in kinds.items()]
    table = pa.table({S.SOURCE: [r[1] for r in rows], S.RESPONSE: [r[2] for r in rows]})
    out = _Embedder(str(REPO / sim.embedder), sim.batch_size, sim.copy_penalty)(table).to_pylist()
    got = {(k, src): r for (k, src, _), r in zip(rows, out)}
    for r in out:
        d = json.loads(r[S.JUDGE_DETAIL])
        assert r[S.SCORE] == pytest.approx(d["similarity"] - sim.copy_penalty * d["copy"], abs=1e-3)

    def verdict(a, b, key=S.SCORE):
        return compare(a[key], a[S.NUM_WORDS], b[key], b[S.NUM_WORDS], QS)

    human = [got["human", p["abstract"]] for p in papers]
    # Most human summaries count as faithful (44 of the 50 at the quickstart's threshold, 50 at 0.62): a judge
    # that called them unfaithful would teach the model to move away from what people write.
    assert sum(h[S.SCORE] >= QS.quality_threshold for h in human) >= 0.8 * len(papers)
    for kind in ("copy", "half"):
        for p, h in zip(papers, human):
            c = got[kind, p["abstract"]]
            assert json.loads(c[S.JUDGE_DETAIL])["copy"] == 1.0 and c[S.SCORE] < QS.quality_threshold, (kind, p["id"])
            assert verdict(c, h) < 0, f"a {kind} copy of {p['id']} did not lose to its human summary"
    for r in out:  # the judge without the penalty: SCORE = cosine
        r["cosine"] = json.loads(r[S.JUDGE_DETAIL])["similarity"]
    half_wins = sum(verdict(got["half", p["abstract"]], h, "cosine") > 0 for p, h in zip(papers, human))
    assert half_wins > len(papers) / 2, f"without the penalty the first half won only {half_wins}/{len(papers)}"


def test_length_judge_is_cheap_deterministic_and_in_range():
    """The benchmark's judge (issue 20): its batch function on an Arrow table, no Ray: every input column back, a
    score in score_range that depends on the text alone (same text, same score; word count and a hash both move
    it), NUM_WORDS as every judge counts them, and the quickstart's pairing threshold accepted for it."""
    import pyarrow as pa

    from common.judges import score_range
    from common.judges.length import LengthJudge, _score_batch, length_score
    from common.pairing import check_threshold

    cfg = JudgeConfig(type="length")
    assert isinstance(build_judge(cfg), LengthJudge) and [a.resources for a in build_judge(cfg).asks()] == [
        {"CPU": 0.25}]
    lo, hi = score_range(cfg)
    check_threshold(cfg, QS, lo, hi, "test")  # 0.7 lies inside: the quickstart's pairing config works unchanged
    texts = ["", "one two three", "one two three", "one two four", " ".join(["w"] * 150)]
    table = pa.table({S.PROMPT_ID: ["p"] * 5, S.SOURCE: ["src"] * 5, S.RESPONSE: texts,
                      S.PROMPT: [[{"role": "user", "content": "x"}]] * 5})
    out = _score_batch(table)
    assert out.column_names[:4] == table.column_names and out.column(S.PROMPT).to_pylist() == table.column(
        S.PROMPT).to_pylist()
    rows = out.to_pylist()
    assert [r[S.NUM_WORDS] for r in rows] == [0, 3, 3, 3, 150]
    assert all(lo <= r[S.SCORE] < hi for r in rows) and [json.loads(r[S.JUDGE_DETAIL]) for r in rows] == [{}] * 5
    assert rows[1][S.SCORE] == rows[2][S.SCORE] == length_score("one two three")
    assert rows[3][S.SCORE] != rows[1][S.SCORE]  # same length, another text: the hash half differs
    assert length_score(" ".join(["w"] * 150)) == length_score(" ".join(["w"] * 150))


def test_stage4_judges_with_the_copy_penalty_of_stage2(tmp_path):
    """Stage 4 takes the judge from stage 2's manifest, penalty included; a manifest from before the penalty
    existed (no copy_penalty key) judged by cosine alone, so stage 4 does too (penalty 0)."""
    import importlib.util
    from types import SimpleNamespace

    import pandas as pd

    from common.io import StageOutput

    spec = importlib.util.spec_from_file_location("evaluate", REPO / "04_evaluate/evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    cfg = load_config("02_judge", str(REPO / "configs/quickstart/02_judge.yaml"), [f"output_dir={tmp_path}"])
    out = StageOutput(cfg, "02_judge")
    out.begin()
    pd.DataFrame({S.PAIR_ID: ["p0"], S.PROMPT_ID: ["x"]}).to_parquet(out.data / "pairs.parquet")
    folder = out.commit(rows={"pairs": 1})["dir"]
    stage4 = SimpleNamespace(judge_dir=folder)
    judge = evaluate.judge_settings(stage4, "04.yaml", dry_run=False)[0]
    assert judge.similarity.copy_penalty == QUICKSTART.judge.similarity.copy_penalty > 0
    mf = tmp_path / "02_judge" / "manifest.json"
    m = json.loads(mf.read_text())
    del m["config"]["judge"]["similarity"]["copy_penalty"]
    mf.write_text(json.dumps(m))
    assert evaluate.judge_settings(stage4, "04.yaml", dry_run=False)[0].similarity.copy_penalty == 0.0


# ---------------------------------------------------------------- the similarity judge on real data
def _scores(ray, judge_cfg, rows):
    ds = ray.data.from_items(rows, override_num_blocks=2)
    out = build_judge(judge_cfg).score(ds).take_all()
    return {r["key"]: r for r in out}


@pytest.mark.slow
def test_similarity_judge_is_meaningful_on_aclsum(ray_local):
    """Own human summary vs another paper's: the faithful one must win >= 90%; the abstract itself vs its human
    summary: the summary must win >= 90% (the copy penalty puts the copy below the threshold)."""
    papers = aclsum("test")
    other = papers[1:] + papers[:1]
    rows = []
    for p, o in zip(papers, other):
        for kind, text in (("own", p["summary"]), ("other", o["summary"]), ("abstract", p["abstract"])):
            rows.append({"key": f"{p['id']}|{kind}", S.PROMPT_ID: p["id"], S.SOURCE: p["abstract"], S.RESPONSE: text})
    got = _scores(ray_local, JudgeConfig(), rows)
    assert len(got) == 3 * len(papers)
    r = got[f"{papers[0]['id']}|own"]
    assert set(r) >= {S.SCORE, S.NUM_WORDS, S.JUDGE_DETAIL} and r[S.NUM_WORDS] == len(papers[0]["summary"].split())
    d = json.loads(r[S.JUDGE_DETAIL])
    assert d["similarity"] - JudgeConfig().similarity.copy_penalty * d["copy"] == pytest.approx(r[S.SCORE], abs=1e-3)

    def pref(a, b):
        return compare(a[S.SCORE], a[S.NUM_WORDS], b[S.SCORE], b[S.NUM_WORDS], QS)

    faithful = sum(pref(got[f"{p['id']}|own"], got[f"{p['id']}|other"]) > 0 for p in papers) / len(papers)
    assert faithful >= 0.9, f"the judge preferred the paper's own summary in only {faithful:.0%} of cases"
    summary_ok = sum(pref(got[f"{p['id']}|own"], got[f"{p['id']}|abstract"]) > 0 for p in papers)
    assert summary_ok / len(papers) >= 0.9, f"the summary beat the abstract in only {summary_ok}/{len(papers)}"


# ---------------------------------------------------------------- LLM judges, real vLLM with the 135M model
def _llm(model_path, **kw) -> LLMJudgeConfig:
    llm = LLMJudgeConfig(**{"max_tokens": 384, **kw})
    llm.model.path = model_path
    llm.engine.max_num_seqs = 16
    return llm


def _candidates(n_papers=1):
    rows = []
    for i, p in enumerate(aclsum("test")[:n_papers]):
        for k, text in enumerate([p["summary"], aclsum("test")[i + 5]["summary"], p["abstract"].split(". ")[0]]):
            rows.append({S.PROMPT_ID: p["id"], S.SOURCE: p["abstract"], S.RESPONSE: text, S.CANDIDATE: k,
                         S.PROMPT: [{"role": "user", "content": "Summarize: " + p["abstract"]}]})
    return rows


def _judged(ray, cfg: JudgeConfig, rows=None):
    """(judge, output rows, parsed details) of `cfg`'s judge on one paper's three candidates (or `rows`), with the
    checks every LLM judge run must pass: one row out per row in, and every NaN counted under exactly one reason."""
    judge = build_judge(cfg)
    rows = rows or _candidates()
    out = judge.score(ray.data.from_items(rows, override_num_blocks=1)).take_all()
    assert sorted((r[S.PROMPT_ID], r[S.CANDIDATE]) for r in out) == sorted((r[S.PROMPT_ID], r[S.CANDIDATE])
                                                                          for r in rows)
    details = parse_details([r[S.JUDGE_DETAIL] for r in out])
    assert sum(error_counts(details).values()) == sum(math.isnan(r[S.SCORE]) for r in out), details
    return judge, out, details


@pytest.mark.slow
def test_quiz_judge_real_run_with_structured_outputs(ray_local, model_path):
    """With vLLM's structured outputs (the default) both replies follow their pydantic model's schema, so every one
    parses: the 135M judge's answers are poor, but they are graded, never NaN."""
    cfg = JudgeConfig(type="quiz", llm=_llm(model_path), quiz=QuizConfig(num_questions=3, num_options=4))
    judge, out, details = _judged(ray_local, cfg)
    columns = {S.PROMPT_ID, S.SOURCE, S.RESPONSE, S.CANDIDATE, S.PROMPT, S.SCORE, S.NUM_WORDS, S.JUDGE_DETAIL}
    assert columns <= set(out[0])
    assert list(out[0][S.PROMPT])[0]["content"].startswith("Summarize: ")  # input columns come back intact
    assert judge.summary(details)["sources"] == 1
    assert judge.summary(details)["sources_questions_unparseable"] == 0, details
    for r, d in zip(out, details):
        assert r[S.SCORE] == d["correct"] and d["correct"] + d["unsure"] + d["wrong"] == 3, d


@pytest.mark.slow
def test_rubric_judge_real_run_with_structured_outputs(ray_local, model_path):
    """Guided JSON: every rating is a {"score": n} with n in 1..10, read as such."""
    cfg = JudgeConfig(type="rubric", llm=_llm(model_path, max_tokens=48))
    judge, out, details = _judged(ray_local, cfg)
    for r, d in zip(out, details):
        assert 1 <= r[S.SCORE] <= 10 and d == {"rating": r[S.SCORE]}, d
    assert judge.summary(details)["mean_rating"] == pytest.approx(sum(r[S.SCORE] for r in out) / len(out), abs=1e-3)


@pytest.mark.slow
def test_rubric_judge_pairwise_real_run(ray_local, model_path):
    """Pairwise, on Ray Data: both orders of each of a paper's 3 responses' pairs are asked (6 verdicts, 3 pairs);
    a share in [0, 1] per response, or NaN counted; a prompt whose responses are all one text is not asked about."""
    rows = _candidates() + [{**r, S.PROMPT_ID: "same", S.RESPONSE: "one text"} for r in _candidates()[:2]]
    cfg = JudgeConfig(type="rubric", llm=_llm(model_path, max_tokens=16), rubric=RubricConfig(pairwise=True))
    judge, out, details = _judged(ray_local, cfg, rows)
    stats = judge.summary(details)
    assert stats["comparisons"] == 3 == stats["consistent"] + stats["inconsistent"] + stats["unparseable"], stats
    for r, d in zip(out, details):
        if r[S.PROMPT_ID] == "same":
            assert math.isnan(r[S.SCORE]) and d == {"error": "no_other_response"}
        else:
            assert math.isnan(r[S.SCORE]) or 0 <= r[S.SCORE] <= 1, (r[S.SCORE], d)
            assert S.SOURCE in r and r[S.SOURCE] == rows[0][S.SOURCE]  # input columns come back intact


@pytest.mark.slow
def test_rubric_judge_real_run_without_structured_outputs(ray_local, model_path):
    """Plain prompting: the 135M judge answers in prose that holds no rating, so every row is NaN, counted as
    rating_unparseable with the reply kept; what it said really does not parse (it is not lost on the way)."""
    cfg = JudgeConfig(type="rubric", llm=_llm(model_path, guided_json=False, max_tokens=48))
    judge, out, details = _judged(ray_local, cfg)
    assert error_counts(details) == {"rating_unparseable": len(out)}, details
    assert all(math.isnan(parse_rating(d["raw"], scale_max=10)) for d in details)
    assert judge.summary(details) == {"mean_rating": None}
