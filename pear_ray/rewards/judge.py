"""An LLM judge's prompt and answer: the job's template with the sample's texts filled in, and the number the judge
writes read back as a score in [0, 1]."""

from __future__ import annotations

import math
import re
import string

TEMPLATE_FIELDS = ("response", "prompt", "answer")  # `{response}` is required, the others optional


def check_template(template: str) -> str:
    """The template, or a ValueError: it must name `{response}` and no placeholder other than TEMPLATE_FIELDS
    (literal braces are written `{{` and `}}`, as in str.format)."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise ValueError(f"the template does not parse as a str.format text ({error}); write a literal brace "
                         "as {{ or }}") from None
    if unknown := sorted({field for field in fields if field not in TEMPLATE_FIELDS}):
        raise ValueError(f"the template names {', '.join('{' + field + '}' for field in unknown)}; it may name only "
                         f"{', '.join('{' + field + '}' for field in TEMPLATE_FIELDS)}")
    if "response" not in fields:
        raise ValueError("the template must name {response}: the judge has to see the response it scores")
    return template


def render_template(template: str, *, response: str, prompt: str = "", answer: str = "") -> str:
    """The judge's question about one sample (the template checked by check_template)."""
    return template.format(response=response, prompt=prompt, answer=answer)


def parse_judge_score(text: str, pattern: str | re.Pattern, max_score: float) -> float | None:
    """The first match of `pattern` in the judge's answer, its first group read as a number, divided by max_score
    and clamped to [0, 1]; None when nothing matches or the group is not a finite number."""
    match = re.search(pattern, text)
    if match is None or match.group(1) is None:
        return None
    try:
        number = float(match.group(1))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return min(1.0, max(0.0, number / max_score))
