"""Stage 2's per-prompt steps on a real local Ray Data (common.per_prompt) give what the in-memory rule gives
(common.filters.filter_reasons, common.pairing.make_pairs / split_valid) on the same hand-made candidates: the same
filter reasons, pairs, stats and validation split, whatever the block layout, and whether the prompts come in
their own table (stage 1's prompts.parquet) or on every candidate (stage 1's outputs from before it). Stage 4's table of responses
(common.responses) is built with the same groupby: the prompts every model answered, a prompt's rows together."""
import math
import random

import pandas as pd
import pyarrow as pa
import pytest

from common import schema as S
from common.config import FilterConfig, PairingConfig
from common.filters import filter_reasons
from common.pairing import make_pairs, split_valid
from common.per_prompt import (NO_PROMPT, all_candidates, column, explode, filter_totals, holdout_cutoff,
                               mark_filters, pair_prompts, pair_totals, prompt_rows, to_judge, with_prompts)

pytestmark = pytest.mark.slow  # starts Ray

RULE = PairingConfig(quality_threshold=0.6, quality_margin=0.05, min_length_gap=3, max_pairs_per_prompt=2)
FILTERS = FilterConfig(min_words=2, max_words=40, invalid_chars="[<>]")


def candidates(prompts=40, n=5, seed=0):
    rng = random.Random(seed)
    rows = []
    for p in range(prompts):
        texts = [" ".join(f"w{rng.randrange(30)}" for _ in range(rng.randrange(1, 45))) for _ in range(n)]
        texts[rng.randrange(n)] = texts[0] if p % 3 == 0 else texts[1] + " <b>"  # a duplicate or invalid_chars
        for k, t in enumerate(texts):
            score = math.nan if (p + k) % 17 == 0 else round(rng.random(), 3)  # some unparseable
            rows.append({S.PROMPT_ID: f"p{p:03d}", S.CANDIDATE: k, S.RESPONSE: t, S.SOURCE: f"source {p}",
                         S.PROMPT: [{"role": "user", "content": f"Summarize: source {p}"}], S.REFERENCE: "",
                         S.SCORE: score, S.NUM_WORDS: len(t.split())})
    rng.shuffle(rows)  # stage 1's rows arrive in any order: the per-prompt steps must not care
    return pd.DataFrame(rows)


PROMPT_COLUMNS = [S.PROMPT, S.SOURCE, S.REFERENCE]


def members(ray, df, inline: bool):
    """Stage 1's output as stage 2 reads it: the candidates carry their prompt (inline), or a prompts table does."""
    def data(frame, blocks):
        return ray.data.from_arrow(pa.Table.from_pandas(frame, preserve_index=False)).repartition(blocks)

    cands = df.drop(columns=[S.SCORE, S.NUM_WORDS])
    if inline:
        return with_prompts(data(cands, 7)), None
    prompts = data(cands.drop_duplicates(S.PROMPT_ID)[[S.PROMPT_ID, *PROMPT_COLUMNS]], 3)
    return with_prompts(data(cands.drop(columns=PROMPT_COLUMNS), 7), prompts), prompts


@pytest.mark.parametrize("inline", [False, True], ids=["prompts_table", "inline"])
def test_same_filters_pairs_stats_and_split_as_in_memory(ray_local, inline):
    df = candidates()
    rows, prompts = members(ray_local, df, inline)
    marked = mark_filters(rows, FILTERS, num_blocks=3, keep_prompts=inline).materialize()
    ordered = df.sort_values([S.PROMPT_ID, S.CANDIDATE], ignore_index=True)
    expected = filter_reasons(ordered, FILTERS)
    every = marked.to_pandas()
    # a prompt row stays only where pairing must read it back: a stage-1 output without a prompts file
    assert every[S.CANDIDATE].isna().sum() == (df[S.PROMPT_ID].nunique() if inline else 0)
    got = every.dropna(subset=[S.CANDIDATE]).sort_values([S.PROMPT_ID, S.CANDIDATE])
    assert got[S.FILTER_REASON].tolist() == expected
    assert {"duplicate", "invalid_chars", "too_short", "too_long"} <= set(expected)
    removed, can_pair, n = filter_totals(marked)
    assert removed == {r: expected.count(r) for r in set(expected) if r} and can_pair and n == len(df)

    kept = ordered[[not r for r in expected]]
    judged = to_judge(marked).to_pandas()  # the judge's input: the kept candidates, each with its prompt's source
    assert sorted(zip(judged[S.PROMPT_ID], judged[S.CANDIDATE], judged[S.SOURCE])) == \
        sorted(zip(kept[S.PROMPT_ID], kept[S.CANDIDATE], kept[S.SOURCE]))
    assert S.PROMPT not in judged  # nor any other prompt column
    # as the judge leaves it: scored, without the source, any blocks
    scored = ray_local.data.from_arrow(pa.Table.from_pandas(kept.drop(columns=PROMPT_COLUMNS), preserve_index=False)
                                       ).repartition(5)
    per_prompt = pair_prompts(scored, prompt_rows(marked, prompts), RULE, seed=3, num_blocks=4).materialize()
    pairs, stats = make_pairs(kept, RULE, seed=3)
    assert pair_totals(per_prompt) == stats and stats["pairs"] > 20 and stats["ties_dropped"] > 0

    train, valid = split_valid(pairs, 0.2, seed=3)
    cutoff = holdout_cutoff(per_prompt, 0.2)
    for held, want in ((False, train), (True, valid)):
        got = explode(per_prompt, cutoff, held).to_pandas().sort_values(S.PAIR_ID, ignore_index=True)
        want = pd.DataFrame(want).sort_values(S.PAIR_ID, ignore_index=True)
        flat = [S.PROMPT, S.CHOSEN, S.REJECTED]
        pd.testing.assert_frame_equal(got.drop(columns=flat), want.drop(columns=flat), check_dtype=False)
        for c in flat:  # the prompt from the prompt row; chosen and rejected from the candidates
            assert got[c].map(list).tolist() == want[c].tolist()
    assert holdout_cutoff(per_prompt, 0.0) == -1  # no validation: every pair trains
    assert len(explode(per_prompt, -1, held=False).to_pandas()) == stats["pairs"]

    every = all_candidates(marked, scored.map_batches(lambda b: b)).to_pandas()  # judged + removed, once each
    assert len(every) == len(df) and (every[S.FILTER_REASON] != "").sum() == sum(map(bool, expected))
    assert column(scored, S.SCORE).shape == (len(kept),)


def test_no_pairable_prompt_is_reported(ray_local):
    rows = [{S.PROMPT_ID: "p", S.CANDIDATE: k, S.RESPONSE: "same words here", S.SOURCE: "s", S.REFERENCE: "",
             S.PROMPT: [{"role": "user", "content": "s"}]} for k in range(3)]
    marked = mark_filters(with_prompts(ray_local.data.from_items(rows)), FILTERS, num_blocks=1,
                          keep_prompts=True).materialize()
    assert filter_totals(marked) == ({"duplicate": 2}, False, 3)


def test_a_candidate_without_its_prompt_row_is_counted_not_judged(ray_local):
    cands = [{S.PROMPT_ID: p, S.CANDIDATE: k, S.RESPONSE: f"answer {k} of {p} here"} for p in "ab" for k in range(2)]
    prompts = [{S.PROMPT_ID: "a", S.SOURCE: "s", S.REFERENCE: "", S.PROMPT: [{"role": "user", "content": "s"}]}]
    marked = mark_filters(with_prompts(ray_local.data.from_items(cands), ray_local.data.from_items(prompts)),
                          FILTERS, num_blocks=2, keep_prompts=False).materialize()
    assert filter_totals(marked) == ({NO_PROMPT: 2}, True, 4)
    assert sorted(to_judge(marked).to_pandas()[S.PROMPT_ID]) == ["a", "a"]


def test_stage4_keeps_the_prompts_every_model_answered_side_by_side(ray_local):
    from common.report import REFERENCE_SYSTEM
    from common.responses import answered_by_all, as_responses, from_outputs, human_references

    prompts = ray_local.data.from_items(
        [{S.PROMPT_ID: f"p{i}", S.SOURCE: f"source {i}", S.REFERENCE: "" if i == 2 else f"human {i}"}
         for i in range(5)], override_num_blocks=2)
    # "dpo" had no room for p3 (a prompt too long for its context gets no row); "sft" answers from a file
    generated = ray_local.data.from_items(
        [{S.PROMPT_ID: f"p{i}", S.SOURCE: f"source {i}", S.REFERENCE: "", S.RESPONSE: f"dpo {i}",
          S.NUM_RESPONSE_TOKENS: 3, S.FINISH_REASON: "stop"} for i in (4, 0, 1, 2)], override_num_blocks=3)
    parts = [as_responses(generated, "dpo"), from_outputs(prompts, "sft", {f"p{i}": f"sft {i}" for i in range(5)}),
             human_references(prompts)]
    got = answered_by_all(parts[0].union(*parts[1:]), ["dpo", "sft"], 3).to_pandas()

    by_prompt = {p: list(g[S.SYSTEM]) for p, g in got.groupby(S.PROMPT_ID, sort=True)}
    assert by_prompt == {"p0": ["dpo", "sft", REFERENCE_SYSTEM], "p1": ["dpo", "sft", REFERENCE_SYSTEM],
                         "p2": ["dpo", "sft"], "p4": ["dpo", "sft", REFERENCE_SYSTEM]}  # p3 out; p2 has no reference
    ids = got[S.PROMPT_ID].tolist()
    assert all(ids[i] == ids[i - 1] or ids[i] not in ids[:i] for i in range(1, len(ids)))  # a prompt's rows adjacent
    row = got[(got[S.PROMPT_ID] == "p1") & (got[S.SYSTEM] == "sft")].iloc[0]
    assert (row[S.RESPONSE], row[S.SOURCE], row[S.REFERENCE], row[S.NUM_RESPONSE_TOKENS], row[S.FINISH_REASON]) == \
        ("sft 1", "source 1", "human 1", -1, "")
    ref = got[(got[S.PROMPT_ID] == "p4") & (got[S.SYSTEM] == REFERENCE_SYSTEM)].iloc[0]
    assert ref[S.RESPONSE] == "human 4"
    assert set(got[got[S.SYSTEM] == "dpo"][S.FINISH_REASON]) == {"stop"}
