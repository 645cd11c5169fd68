"""Compression: how long a response is relative to its source, in whitespace-split words."""
import statistics

import datasets
import evaluate

_DESCRIPTION = """\
Length of each response relative to its source, counted in words (str.split() on whitespace):

    compression_i = len(response_i.split()) / len(source_i.split())

Returns the mean and median of compression_i over all pairs, and the mean and median of the
response word counts len(response_i.split()). A summary of 30 words for a 300-word source has
compression 0.1. Every source must have at least one word.
"""

_CITATION = """\
No external reference: a plain length ratio, defined in this cookbook (common/metrics/compression).
"""

_KWARGS_DESCRIPTION = """
Args:
    responses (`list` of `str`): the model outputs.
    sources (`list` of `str`): the text each response was generated from, paired by position.
Returns:
    median_compression (`float`): median of response words / source words.
    mean_compression (`float`): mean of response words / source words.
    mean_words (`float`): mean response length in words.
    median_words (`float`): median response length in words.
Examples:
    >>> m = evaluate.load("common/metrics/compression")
    >>> m.compute(responses=["a b", "a b c d"], sources=["w " * 10, "w " * 8])["median_compression"]
    0.35
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Compression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"responses": datasets.Value("string"), "sources": datasets.Value("string")}
            ),
        )

    def _compute(self, responses, sources):
        if len(responses) == 0:
            raise ValueError("compression: got no responses; pass at least one (response, source) pair")
        words = [len(r.split()) for r in responses]
        source_words = [len(s.split()) for s in sources]
        empty = [i for i, n in enumerate(source_words) if n == 0]
        if empty:
            raise ValueError(
                f"compression: source(s) at position(s) {empty[:10]} have no words; "
                "compression is response words / source words, so every source needs at least one word"
            )
        ratios = [w / s for w, s in zip(words, source_words)]
        return {
            "median_compression": float(statistics.median(ratios)),
            "mean_compression": float(statistics.fmean(ratios)),
            "mean_words": float(statistics.fmean(words)),
            "median_words": float(statistics.median(words)),
        }
