"""Invalid characters: share of responses containing markup or template debris (a regex match)."""
import re

import datasets
import evaluate

DEFAULT_PATTERN = r"[<>{}\[\]|\\^~`#*_]|<\|"

_DESCRIPTION = f"""\
Share of responses in which a regular expression finds at least one match:

    share_invalid = #{{i : re.search(pattern, response_i) is not None}} / n

The default pattern {DEFAULT_PATTERN!r} flags characters a plain-prose summary should not
contain: markup (# * _ ` ~ ^ |), brackets and braces, and chat-template tokens such as <|im_end|>.
"""

_CITATION = """\
No external reference: a regex check, defined in this cookbook (common/metrics/invalid_chars).
"""

_KWARGS_DESCRIPTION = f"""
Args:
    responses (`list` of `str`): the model outputs.
    pattern (`str`, optional): the regular expression (Python `re` syntax); default {DEFAULT_PATTERN!r}.
Returns:
    share_invalid (`float`): fraction of responses with at least one match.
Examples:
    >>> m = evaluate.load("common/metrics/invalid_chars")
    >>> m.compute(responses=["Plain text.", "**bold**"])
    {{'share_invalid': 0.5}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class InvalidChars(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"responses": datasets.Value("string")}),
        )

    def _compute(self, responses, pattern=DEFAULT_PATTERN):
        if len(responses) == 0:
            raise ValueError("invalid_chars: got no responses; pass at least one")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid_chars: pattern {pattern!r} is not a valid regular expression: {e}") from None
        return {"share_invalid": sum(regex.search(r) is not None for r in responses) / len(responses)}
