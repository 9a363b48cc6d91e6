"""Graders: (model answer, gold answer) → correct or not, chosen by name.

``math`` reads the last ``\\boxed{...}`` of the answer, or else its final number, and compares it with the gold
answer after normalisation (commas, ``$``, units of thousands separators, trailing ``.0``, surrounding text).
Register another grader with :func:`register`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

Grader = Callable[[str, str], bool]

_GRADERS: dict[str, Grader] = {}


def register(name: str) -> Callable[[Grader], Grader]:
    def wrap(fn: Grader) -> Grader:
        _GRADERS[name] = fn
        return fn

    return wrap


def get_grader(name: str) -> Grader:
    try:
        return _GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r} (have: {', '.join(sorted(_GRADERS))})") from None


def grader_names() -> list[str]:
    return sorted(_GRADERS)


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> str | None:
    """The last number written in ``text`` (with thousands separators), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


_LATEX_NOISE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{[^}]*\}|\\[,;!: ]|\\\$|\\%|\\left|\\right")


def normalise_number(text: str) -> str:
    """A canonical string for a numeric answer: '$1,000.00' → '1000', '\\frac{1}{2}' → '0.5', '50%' → '50'."""
    s = text.strip()
    frac = re.fullmatch(r"-?\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s.replace(" ", ""))
    if frac:
        sign = -1 if s.lstrip().startswith("-") else 1
        value = sign * Fraction(int(frac.group(1)), int(frac.group(2)))
        return _canonical(value)
    s = _LATEX_NOISE.sub("", s)
    s = s.replace("$", "").replace(",", "").replace("%", "").strip()
    slash = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", s)
    if slash and int(slash.group(2)) != 0:
        return _canonical(Fraction(int(slash.group(1)), int(slash.group(2))))
    m = re.search(r"-?\d+(?:\.\d+)?|-?\.\d+", s)
    if m is None:
        return s.lower()
    try:
        return _canonical(Fraction(m.group(0)))
    except (ValueError, ZeroDivisionError):
        return m.group(0)


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    f = float(value)
    return repr(round(f, 6)).rstrip("0").rstrip(".")


def extract_answer(text: str) -> str | None:
    """The answer a math completion commits to: its last ``\\boxed{}``, else its final number."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed
    return final_number(text)


@register("math")
def grade_math(answer: str, gold: str) -> bool:
    """Numeric equality of the completion's final answer and the gold answer, after normalisation."""
    predicted = extract_answer(answer or "")
    if predicted is None:
        return False
    return normalise_number(predicted) == normalise_number(str(gold))


@register("exact")
def grade_exact(answer: str, gold: str) -> bool:
    """Whitespace- and case-insensitive exact match of the whole answer."""
    return " ".join((answer or "").split()).lower() == " ".join(str(gold).split()).lower()
