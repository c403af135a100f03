"""Pull the final answer out of a model's output and grade it against the gold answer."""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from fractions import Fraction

SYSTEM_PROMPT = (
    "You are a careful math assistant. Reason step by step, then put the final answer (just the number) in \\boxed{}."
)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE = re.compile(r"the\s+(?:final\s+)?answer\s+is|answer\s*:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
# A number as written in prose: optional sign, thousands commas, decimals, a simple a/b.
_NUM = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_VALUE = re.compile(
    r"^\+?(-?\s*(?:\d+(?:\.\d+)?|\.\d+))"  # the number
    r"(?:\s*/\s*(-?\d+(?:\.\d+)?))?"  # an optional denominator
    r"((?:[^\d^]|\^\{?\d+\}?)*)$"  # trailing units/words (no other numbers)
)
_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\\?\$|\\?%|\^\s*\{?\\circ\}?|°")
_TOLERANCE = Fraction(1, 10**6)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every closed `\\boxed{...}` in order, nested braces included."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0 and text[m.end() : i - 1].strip():
            found.append(text[m.end() : i - 1].strip())
    return found


def extract_answer(text: str, complete: bool = True) -> str | None:
    """The model's final answer: the last `\\boxed{}`, else the number after the last
    "the answer is" / "answer:" (in the same sentence), else — only for a `complete` answer, one
    that ended by itself — the last number in the text; None if there is none.

    An answer cut off at max tokens is graded on an explicit final answer only: its last number
    is whatever it was computing (or echoing from the question) when it was cut."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1]
    phrases = list(_PHRASE.finditer(text))
    if phrases:
        end = phrases[-1].end()
        m = _NUM.search(text, end, end + 60)
        if m and not _SENTENCE_END.search(text, end, m.start()):  # same sentence only
            return m.group(0)
    numbers = _NUM.findall(text) if complete else []
    return numbers[-1] if numbers else None


def _value(s: str) -> Fraction | None:
    t = s.strip().replace("\u2212", "-")
    t = _WRAPPERS.sub(r"\1", t)
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    t = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", t)
    t = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\1/\2", t)
    t = _NOISE.sub("", t)
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t).replace("{", "").replace("}", "")
    t = t.rsplit("=", 1)[-1].strip()
    m = _VALUE.match(t)
    if not m:
        return None
    num = Fraction(m.group(1).replace(" ", ""))
    if m.group(2) is None:
        return num
    den = Fraction(m.group(2))
    return num / den if den else None


def _canonical(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:  # not an exact decimal
        x = round(x, 6)
    with localcontext() as ctx:
        ctx.prec = 200
        s = format(Decimal(x.numerator) / Decimal(x.denominator), "f")
    s = s.rstrip("0").rstrip(".") if "." in s else s
    return "0" if s in ("-0", "") else s


def normalize_number(s: str) -> str | None:
    """Canonical number string for an answer like "$1,080.00", "18 eggs", "50%", "\\frac{1}{2}".

    Integers have no ".0"; exact fractions become decimals, others are rounded to 6 places.
    None if `s` is not a single number (possibly with units/words after it).
    """
    v = _value(s)
    return None if v is None else _canonical(v)


def is_correct(pred: str | None, gold: str) -> bool:
    """True if `pred` matches `gold`: numerically (within 1e-6, relative for large values)
    when both are numbers, else as exact stripped strings."""
    if pred is None:
        return False
    a, b = normalize_number(pred), normalize_number(gold)
    if a is not None and b is not None:
        fa, fb = Fraction(a), Fraction(b)
        return abs(fa - fb) <= _TOLERANCE * max(1, abs(fb))
    return pred.strip() == gold.strip()
