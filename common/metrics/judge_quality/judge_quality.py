"""Judge quality: summary statistics of absolute judge scores (e.g. a 1-5 rubric)."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Summary of absolute quality scores s_1..s_n given by a judge (higher is better):

    mean_score   = (1/n) * sum_i s_i
    median_score = median_i s_i
    share_at_least_<t> = #{i : s_i >= t} / n      for each t in thresholds (default [3, 4])

The key names a threshold without a trailing ".0": t=3 or 3.0 gives share_at_least_3,
t=3.5 gives share_at_least_3.5.
"""

_CITATION = """\
@inproceedings{zheng2023judging,
  title     = {Judging {LLM}-as-a-Judge with {MT}-Bench and Chatbot Arena},
  author    = {Zheng, Lianmin and Chiang, Wei-Lin and Sheng, Ying and Zhuang, Siyuan and Wu, Zhanghao
               and Zhuang, Yonghao and Lin, Zi and Li, Zhuohan and Li, Dacheng and Xing, Eric P.
               and Zhang, Hao and Gonzalez, Joseph E. and Stoica, Ion},
  booktitle = {Advances in Neural Information Processing Systems (Datasets and Benchmarks Track)},
  year      = {2023},
  eprint    = {2306.05685}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    scores (`list` of `float`): one judge score per response (higher is better).
    thresholds (`list` of `float`, optional): report the share of scores >= each, default [3, 4].
Returns:
    mean_score (`float`), median_score (`float`),
    share_at_least_<t> (`float`) for each threshold t.
Examples:
    >>> m = evaluate.load("common/metrics/judge_quality")
    >>> m.compute(scores=[1, 3, 4, 5])
    {'mean_score': 3.25, 'median_score': 3.5, 'share_at_least_3': 0.75, 'share_at_least_4': 0.5}
"""

DEFAULT_THRESHOLDS = (3, 4)


def threshold_key(t):
    """share_at_least_<t>, with t written without a trailing .0 (3.0 -> "3", 3.5 -> "3.5")."""
    t = float(t)
    return f"share_at_least_{int(t) if t.is_integer() else t}"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class JudgeQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"scores": datasets.Value("float64")}),
        )

    def _compute(self, scores, thresholds=DEFAULT_THRESHOLDS):
        if len(scores) == 0:
            raise ValueError("judge_quality: got no scores; pass at least one")
        s = np.asarray(scores, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(s))
        if bad.size:
            raise ValueError(
                f"judge_quality: non-finite score(s) at position(s) {bad[:10].tolist()}; "
                "drop or re-judge those responses first"
            )
        out = {"mean_score": float(s.mean()), "median_score": float(np.median(s))}
        for t in thresholds:
            out[threshold_key(t)] = float(np.mean(s >= float(t)))
        return out
