"""The embedded CPU judge: faithfulness = cosine similarity between a response and its source text.

SCORE is the cosine similarity of the MiniLM sentence embeddings of the response and of the source (about 0.8 for a
good summary of an ACLSum abstract, about 0.3 for another paper's summary). Length is not folded into the score: the
pairing rule (common.pairing) weighs it, with `quality_threshold` as the similarity below which a response counts as
unfaithful, so one rule decides both the training pairs and the stage-4 win rate.

Runs as a Ray Data actor pool (ActorPoolStrategy): each actor loads the SentenceTransformer once and embeds each
distinct text of a batch once.
"""
from __future__ import annotations

import numpy as np

from common import schema as S
from common.config import SimilarityJudgeConfig, resolve
from common.errors import UserError
from common.judges.base import with_scores
from common.ray_setup import Ask


class _Embedder:
    """Callable class for map_batches: the model loads once per actor, in __init__."""

    def __init__(self, path: str, batch_size: int):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.batch_size = batch_size

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
        return with_scores(batch, sim, [{"similarity": round(float(x), 4)} for x in sim])


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
            _Embedder, fn_constructor_kwargs=dict(path=str(path), batch_size=self.cfg.batch_size),
            batch_size=self.cfg.batch_size, batch_format="pyarrow", num_cpus=self.cfg.num_cpus,
            compute=ActorPoolStrategy(size=self.cfg.concurrency),
        )

    def summary(self, details: list[dict]) -> dict:
        return {}
