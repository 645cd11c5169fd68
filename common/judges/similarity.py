"""The embedded CPU judge: faithfulness = cosine similarity between a response and its source text, less copying.

    SCORE = cosine(MiniLM(response), MiniLM(source)) - copy_penalty * copy_fraction(response, source)

The cosine is about 0.8 for a good summary of an ACLSum abstract and about 0.3 for another paper's summary, but 1.0
for the abstract itself: alone it makes a copy the best summary, and a DPO model trained on it learns to copy.
copy_fraction (common.metrics, the report's copy share) is the share of the response's 4-grams found in the source:
~0.07 for ACLSum's human summaries, 1.0 for a copy, so with the default penalty (0.5) a copy scores ~0.5, below the
quickstart's quality_threshold, and loses to a faithful summary in other words (table, choice: docs/stage2.md).
Length is not folded into the score: the pairing rule (common.pairing) weighs it, with `quality_threshold` as the
score below which a response counts as unfaithful, so one rule decides both the training pairs and the stage-4 win
rate.

Runs as a Ray Data actor pool (ActorPoolStrategy): each actor loads the SentenceTransformer once and embeds each
distinct text of a batch once.
"""
from __future__ import annotations

import numpy as np

from common import schema as S
from common.config import SimilarityJudgeConfig, resolve
from common.errors import UserError
from common.judges.base import with_scores
from common.metrics import copy_fraction
from common.ray_setup import Ask


class _Embedder:
    """Callable class for map_batches: the model loads once per actor, in __init__."""

    def __init__(self, path: str, batch_size: int, copy_penalty: float):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.batch_size = batch_size
        self.copy_penalty = copy_penalty

    def __call__(self, batch):  # a pyarrow Table: nested columns (PROMPT) pass through untouched
        responses = [str(r or "") for r in batch.column(S.RESPONSE).to_pylist()]
        sources = [str(s or "") for s in batch.column(S.SOURCE).to_pylist()]
        # Each distinct text once: a batch holds a prompt's n candidates side by side, all with one source.
        distinct = list(dict.fromkeys(sources + responses))
        emb = self.model.encode(distinct, normalize_embeddings=True, batch_size=self.batch_size,
                                show_progress_bar=False)
        index = {t: i for i, t in enumerate(distinct)}
        resp, src = emb[[index[t] for t in responses]], emb[[index[t] for t in sources]]
        sim = np.einsum("ij,ij->i", resp, src).astype(np.float64)
        copied = [copy_fraction(r, s) or 0.0 for r, s in zip(responses, sources)]  # under 4 words: nothing to copy
        scores = [penalized(x, c, self.copy_penalty) for x, c in zip(sim, copied)]
        return with_scores(batch, scores, [{"similarity": round(float(x), 4), "copy": round(c, 4)}
                                           for x, c in zip(sim, copied)])


def penalized(similarity: float, copied: float, copy_penalty: float) -> float:
    """SCORE from the cosine similarity and the copied share of 4-grams (0..1)."""
    return float(similarity) - copy_penalty * copied


class SimilarityJudge:
    def __init__(self, cfg: SimilarityJudgeConfig):
        self.cfg = cfg

    def asks(self) -> list[Ask]:
        return [Ask("similarity judge (MiniLM actor)", self.cfg.concurrency, {"CPU": self.cfg.num_cpus})]

    def score(self, ds):
        from ray.data import ActorPoolStrategy

        path = resolve(self.cfg.embedder)
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise UserError(f"judge.similarity.embedder: {self.cfg.embedder} is not a sentence-transformers folder; "
                            f"run `bash scripts/setup.sh` to prepare the embedded models")
        return ds.map_batches(
            _Embedder, fn_constructor_kwargs=dict(path=str(path), batch_size=self.cfg.batch_size,
                                                  copy_penalty=self.cfg.copy_penalty),
            batch_size=self.cfg.batch_size, batch_format="pyarrow", num_cpus=self.cfg.num_cpus,
            compute=ActorPoolStrategy(size=self.cfg.concurrency),
        )

    def summary(self, details: list[dict]) -> dict:
        return {}
