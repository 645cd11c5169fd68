"""Length violation: share of responses longer than max_words or shorter than min_words."""
import datasets
import evaluate

_DESCRIPTION = """\
Share of responses outside the allowed length, counted in words (str.split() on whitespace):

    share_too_long  = #{i : len(response_i.split()) > max_words} / n
    share_too_short = #{i : len(response_i.split()) < min_words} / n

Bounds are inclusive: a response of exactly max_words (or min_words) words is within bounds.
Defaults: max_words=200, min_words=5. Set them at load time
(evaluate.load(path, max_words=150)) or per call (compute(..., max_words=150)); the call wins.
"""

_CITATION = """\
No external reference: a plain length check, defined in this cookbook (common/metrics/length_violation).
"""

_KWARGS_DESCRIPTION = """
Args:
    responses (`list` of `str`): the model outputs.
    max_words (`int`, optional): longest allowed response in words (default 200, or the load-time value).
    min_words (`int`, optional): shortest allowed response in words (default 5, or the load-time value).
Returns:
    share_too_long (`float`): fraction of responses with more than max_words words.
    share_too_short (`float`): fraction of responses with fewer than min_words words.
Examples:
    >>> m = evaluate.load("common/metrics/length_violation")
    >>> m.compute(responses=["one two", "one two three four five six"], max_words=5, min_words=3)
    {'share_too_long': 0.5, 'share_too_short': 0.5}
"""

DEFAULT_MAX_WORDS = 200
DEFAULT_MIN_WORDS = 5


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LengthViolation(evaluate.Metric):
    def __init__(self, max_words=DEFAULT_MAX_WORDS, min_words=DEFAULT_MIN_WORDS, **kwargs):
        self.max_words = max_words
        self.min_words = min_words
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"responses": datasets.Value("string")}),
        )

    def _compute(self, responses, max_words=None, min_words=None):
        max_words = self.max_words if max_words is None else max_words
        min_words = self.min_words if min_words is None else min_words
        if len(responses) == 0:
            raise ValueError("length_violation: got no responses; pass at least one")
        if min_words > max_words:
            raise ValueError(f"length_violation: min_words ({min_words}) is larger than max_words ({max_words})")
        words = [len(r.split()) for r in responses]
        n = len(words)
        return {
            "share_too_long": sum(w > max_words for w in words) / n,
            "share_too_short": sum(w < min_words for w in words) / n,
        }
