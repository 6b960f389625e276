"""A final answer pulled out of a response text, and the generic verifiers that compare it with the gold answer:
`exact` (normalised text or number) and `math` (math-verify), registered by name; `score_metadata` scores a row with
the verifier its metadata names (tasks/base.py says why rows carry it)."""

from __future__ import annotations

import math
import re
from typing import Any

from pear_ray.tasks.base import load_metadata
from pear_ray.tasks.registry import VERIFIERS, register_verifier

_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_FULL_NUMBER_RE = re.compile(r"\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*")
_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_MARKER_RE = re.compile(r"\banswer\b\s*(?:is\s*:?|:|=)", re.IGNORECASE)
_BOXED = "\\boxed{"


def is_number(text: str | None) -> bool:
    """True for an integer or decimal such as `-12`, `3.5`, `1,000` (what arithmetic answers look like)."""
    return text is not None and _FULL_NUMBER_RE.fullmatch(text) is not None


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _clean(text: str) -> str:
    text = text.strip()
    for _ in range(3):  # peel markdown bold, inline math, quotes and a final full stop, in any nesting
        before = text
        text = text.strip().rstrip(".").strip()
        for left, right in (("**", "**"), ("$", "$"), ('"', '"'), ("'", "'"), ("`", "`")):
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left):len(text) - len(right)]
        if text == before:
            break
    return text.strip()


def explicit_answer(response: str) -> str | None:
    """The answer a response marks explicitly, or None: the last `<answer>...</answer>` (reasoning-gym's
    convention; an unclosed final tag counts), else the last `\\boxed{...}`, else the rest of the line after the
    last `answer:` / `answer is` / `answer =` (case-insensitive)."""
    tags = [tag for tag in _TAG_RE.findall(response) if tag.strip()]
    if tags:
        return _clean(tags[-1])
    boxed = _last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    markers = list(_MARKER_RE.finditer(response))
    if markers:
        rest = response[markers[-1].end():].lstrip()
        return _clean(rest.splitlines()[0] if rest else "")
    return None


def extract_answer(response: str | None, *, numeric: bool = False) -> str:
    """The final answer in a response, for models that format it differently (a tiny model that learnt to
    reply `7`, a chat model that writes `... so the answer is **7**.` or `<answer>7</answer>`).

    1. An explicitly marked answer (see `explicit_answer`): `<answer>` tags, `\\boxed{}`, or `answer:`/`answer is`.
    2. Otherwise the last non-empty line of the response.
    Then, when `numeric` (the gold answer is a number): the last number-like token of that text, commas removed
    (`Answer: 1,234 apples` -> `1234`; `3 + 4 = 7` -> `7`); if there is none, the text as it is.
    Surrounding whitespace, `**`, `$`, quotes, backticks and a final full stop are stripped. Never raises.
    """
    if not response:
        return ""
    text = explicit_answer(response)
    if text is None:
        lines = [line for line in response.splitlines() if line.strip()]
        text = _clean(lines[-1]) if lines else ""
    if numeric:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return text


# ---------------------------------------------------------------- generic verifiers


def normalize_text(text: str, *, ignore_case: bool = False) -> str:
    """Collapse runs of whitespace to one space and strip; lower-case too when `ignore_case`."""
    text = " ".join(str(text).split())
    return text.casefold() if ignore_case else text


def exact_score(response: str, answer: str, *, ignore_case: bool = False) -> float:
    """1.0 when the extracted answer equals the gold one after `normalize_text`, else 0.0.

    A numeric gold answer is compared as a number token (`Answer: 7.` and `7` both match `7`)."""
    predicted = extract_answer(response, numeric=is_number(answer))
    gold = str(answer).replace(",", "") if is_number(answer) else str(answer)
    if predicted and normalize_text(predicted, ignore_case=ignore_case) == normalize_text(gold, ignore_case=ignore_case):
        return 1.0
    return 0.0


def _math_verify():
    """math-verify's parse and verify, with its own timeouts off.

    math-verify 0.9 times out parsing (`parsing_timeout`, default 5 s) and comparing (`timeout_seconds`, default
    5 s) with `signal.alarm`, which only works in a process's main thread: anywhere else it raises ValueError
    ("signal only works in main thread"). We call it with both set to None, so it runs in any thread; the
    per-sample timeout is enforced by pear_ray.tasks.verify (a killable child process). math-verify then logs
    a warning that we must time it out ourselves: we do, so that warning is marked as already shown.
    """
    import math_verify.grader
    import math_verify.parser
    from math_verify import parse, verify

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return parse, verify


def _math_parse(text: str, *, as_latex_first: bool):
    parse, _ = _math_verify()
    attempts = [f"${text}$", text] if as_latex_first and "$" not in text and "\\boxed" not in text else [text]
    for attempt in attempts:
        parsed = parse(attempt, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def _looks_like_formula(text: str) -> bool:
    """No two words in a row and no `=`: `x + 1`, `\\frac{1}{2}`, `0.5`, but not `so it is 1/2` or `3 + 4 = 7`."""
    return "=" not in text and re.search(r"[A-Za-z]{2,}[^A-Za-z\\]+[A-Za-z]{2,}", text) is None


def math_score(response: str, answer: str) -> float:
    """1.0 when math-verify finds the response's answer equivalent to the gold one (`0.5` == `\\frac{1}{2}`).

    The response's explicitly marked answer (tags, `\\boxed{}`, `answer:`), or else its last line when that is a
    bare formula, is parsed as a formula; otherwise math-verify extracts from the whole response (it prefers the
    last boxed/LaTeX/plain expression). A gold answer
    math-verify cannot parse falls back to `exact_score`. Timeouts: see `_math_verify`.
    """
    _, verify = _math_verify()
    gold = _math_parse(str(answer), as_latex_first=True)
    if not gold:
        return exact_score(response, answer)
    response = response or ""
    marked = explicit_answer(response)
    if marked is None:
        lines = [line.strip() for line in response.splitlines() if line.strip()]
        if lines and _looks_like_formula(lines[-1]):
            marked = lines[-1]  # a bare formula such as `x + 1`, which plain-text parsing would read as `1`
    predicted = _math_parse(marked, as_latex_first=True) if marked else _math_parse(response, as_latex_first=False)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0


def clamp_reward(value: Any) -> float:
    """A verifier's output as a reward in [0, 1]; raises ValueError for something that is not a finite number."""
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"verifier returned {reward}")
    return min(1.0, max(0.0, reward))


def score_metadata(response: str, answer: str, metadata: str | dict | None) -> float:
    """Score a row from its own columns: the registered verifier its metadata names (`exact` when it names none)."""
    meta = load_metadata(metadata)
    name = meta.get("verifier", "exact")
    verifier = VERIFIERS.get(name) if isinstance(name, str) else None
    if verifier is None:
        raise ValueError(f"unknown verifier {name!r} in task metadata (known: {', '.join(sorted(VERIFIERS))})")
    return verifier(response, answer, meta)


@register_verifier("exact")
def _exact_verifier(response: str, answer: str, meta: dict[str, Any]) -> float:
    return exact_score(response, answer, ignore_case=bool(meta.get("ignore_case", False)))


def _import_math_verify(metadatas: list[dict[str, Any]]) -> None:
    """Import math-verify and sympy (seconds) once, rather than in each scoring process."""
    math_score("$1$", "1")


@register_verifier("math", warm_up=_import_math_verify)
def _math_verifier(response: str, answer: str, meta: dict[str, Any]) -> float:
    return math_score(response, answer)
