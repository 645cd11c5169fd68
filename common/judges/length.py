"""The benchmark judge: a cheap, deterministic score from the response alone, no model (issue 20's scale benchmark).

    SCORE = 0.5 * min(words, 50) / 50 + 0.5 * (crc32(response) % 10_000) / 10_000      in [0, 1)

Half of it grows with the word count, half is a hash of the text, so a prompt's candidates get different scores
spread over the whole range: some fall below the pairing threshold (quality pairs), some above (length pairs), and
the same text always gets the same score. It says nothing about quality; it exists to measure what stage 2 and
stage 3 cost around the judge (reading, filtering, pairing, writing) without a model's time drowning it.

Runs as plain Ray Data tasks (map_batches, a quarter CPU each, Arrow batches): no actor, nothing to load.
"""
from __future__ import annotations

import zlib

from common import schema as S
from common.judges.base import num_words, with_scores
from common.ray_setup import Ask

NUM_CPUS = 0.25  # per task: it only hashes and counts words, and fits beside a read task on 2 cores
BATCH_SIZE = 1024


def length_score(text: str) -> float:
    """The score of one response (see the module docstring); in [0, 1)."""
    t = str(text or "")
    return 0.5 * min(num_words(t), 50) / 50 + 0.5 * (zlib.crc32(t.encode()) % 10_000) / 10_000


def _score_batch(batch):  # a pyarrow Table: nested columns (PROMPT) pass through untouched
    responses = batch.column(S.RESPONSE).to_pylist()
    scores = [length_score(r) for r in responses]
    return with_scores(batch, scores, [{} for _ in scores])


class LengthJudge:
    def __init__(self, cfg=None):
        self.cfg = cfg

    def asks(self) -> list[Ask]:
        return [Ask("length judge (map_batches tasks)", 1, {"CPU": NUM_CPUS})]

    def score(self, ds):
        return ds.map_batches(_score_batch, batch_size=BATCH_SIZE, batch_format="pyarrow", num_cpus=NUM_CPUS)

    def summary(self, details: list[dict]) -> dict:
        return {}
