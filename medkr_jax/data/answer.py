"""The answer contract: how a response states its answer, and how any output is mapped back to an option.

Written answers: every trace we train on ends with ``answer_sentence`` ("The answer is B.", or with the
option's text, "The answer is heparin."); the GRPO reward reads only the closing statement
(``final_statement_answer``); the SFT answer mask covers what ``ANSWER_STATEMENT`` captures.

Extraction: map a free-text model output to the index of the option it chose.

``extract_answer(text, options) -> int | None``. ``None`` means "no answer": nothing found, a letter
outside the option range, or an ambiguous final statement ("A or C", "both B and D", ``\\boxed{A, C}``).
Callers score ``None`` as wrong and count it separately.

Rules, tried in order on the part after the last ``</think>`` (the reasoning block of thinking
models is only searched, with the explicit rules 1-2, when the visible answer says nothing):

1. ``\\boxed{...}`` (last one).
2. An explicit answer phrase, last one first: "The answer is (C)", "**Answer:** C", "Final answer: C",
   "the correct option is C", "Answer: Metformin" (option text).
3. The last non-empty line is an option line: "C", "(C)", "C. <text>", "C) <text>".
4. Option text alone: the last line is (or names exactly one) option text.
5. The last option letter mentioned as "(C)", "option C" or "choice C".

A stage that finds two different options in the same statement returns ``None`` right away instead
of falling through, since the model did not commit to one.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from medkr_jax.data.text import normalize_text, option_key

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ----------------------------------------------------------------------------------- the written answer
ANSWER_TEMPLATE = "The answer is {letter}."
OPTION_ANSWER_TEMPLATE = "The answer is {option}."
# A closing letter statement ("The answer is B." / "(B)."), with the whitespace before it as group 1.
FINAL_LETTER = re.compile(r"(\s*)The answer is \(?([A-Z])\)?\.\s*$")
# The last "the answer is ..." statement, when it ends the text (what the GRPO reward reads).
LAST_STATEMENT = re.compile(r"the answer is (?!.*the answer is)[^\n]+?\.?\s*$", re.IGNORECASE)
# Any answer statement: what follows "answer is" on its line, without brackets or the final period ("B" in
# "The answer is (B).", "240 mg" in "The answer is 240 mg."): the decision the evaluation scores.
ANSWER_STATEMENT = re.compile(r"answer is \(?([^\n]*?)\)?\.?[ \t]*(?=\n|$)", re.IGNORECASE)


def answer_sentence(letter: str) -> str:
    """The closing sentence of a trace that answers with a letter: "The answer is B."."""
    return ANSWER_TEMPLATE.format(letter=letter)


def option_answer_sentence(option: str) -> str:
    """The closing sentence of a trace that answers with the option's text: "The answer is heparin."."""
    return OPTION_ANSWER_TEMPLATE.format(option=option.strip())


def final_letter(trace: str) -> str | None:
    """The letter of a trace's closing "The answer is X." sentence, or None."""
    m = FINAL_LETTER.search(trace)
    return m.group(2) if m else None


# ------------------------------------------------------------------------------------------- extraction

# Sentinel for "this stage saw conflicting answers"; distinct from "this stage saw nothing" (None).
_AMBIGUOUS = -1

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)

_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|correct\s+answer|best\s+answer|right\s+answer|most\s+likely\s+answer|"
    r"correct\s+(?:option|choice|response)|best\s+(?:option|choice)|the\s+answer|answer)"
    r"\s*(?:is|would\s+be|should\s+be|must\s+be|will\s+be|=|:|-)?\s*"
    r"(?:therefore|thus|then|clearly|likely|probably)?\s*[:\-]?\s*"
    r"(?:option|choice|letter)?\s*[:\-]?\s*",
    re.IGNORECASE,
)
_CONNECTOR = re.compile(r"^\s*(?:,|/|&|\bor\b|\band\b|\bvs\.?\b|\bversus\b)\s*", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*(?:option\s+|choice\s+)?\(?([A-Za-z])(?:\)|\.|:|\s*$)\s*(.*)$", re.IGNORECASE)
_MENTION = re.compile(r"\(([A-Z])\)|\b(?:option|choice)\s*\(?([A-Z])\b\)?", re.IGNORECASE)
_AMBIG_WORDS = re.compile(r"\b(?:either|both|neither|cannot\s+(?:be\s+)?determine|can't\s+determine)\b",
                          re.IGNORECASE)


def _clean(text: str) -> str:
    """Drop markdown emphasis and simple LaTeX wrappers that hide the letter."""
    text = text.replace("**", "").replace("__", "").replace("`", "")
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\$([^$]*)\$", r"\1", text)
    return text


def _norm(s: str) -> str:
    # The records' normalisation (NFKC, casefold, non-word characters -> space). It keeps non-ASCII letters
    # ("α-blocker" and "β-blocker" stay distinct, where an ASCII-only rule mapped both to "blocker").
    return normalize_text(s)


def _exact(s: str) -> str:
    # case and symbols kept; read-time validation rejects options equal under this key
    return option_key(s)


def _tiebreak(cands: list[int], exact_match: Callable[[int], bool]) -> int | None:
    """The one candidate when there is one; among options equal under ``_norm`` ("BB BB" / "BB Bb",
    "BMI > 25" / "BMI = 25"), the single one ``exact_match`` accepts, else _AMBIGUOUS; None for no candidate."""
    if len(cands) <= 1:
        return cands[0] if cands else None
    exact = [i for i in cands if exact_match(i)]
    return exact[0] if len(exact) == 1 else _AMBIGUOUS


def _opens_exact(text: str, option: str) -> bool:
    t, o = _exact(text), _exact(option)
    return t.startswith(o) and (len(t) == len(o) or not t[len(o)].isalnum())


def _leading_letter(tail: str, n: int) -> tuple[int | None, str]:
    """Parse an option letter at the start of ``tail``; return (index or None, rest of tail).

    A lowercase letter only counts when nothing word-like follows ("answer: c", not "answer is a drug").
    """
    m = re.match(r"\s*[\(\[]?([A-Za-z])(?![A-Za-z0-9'])\s*[\)\]]?", tail)
    if not m:
        return None, tail
    letter, rest = m.group(1), tail[m.end():]
    if letter.islower() and re.match(r"\s*[A-Za-z0-9]", rest):
        return None, tail
    if letter.upper() == "I" and letter == "I" and re.match(r"\s+[a-z]", rest):
        return None, tail  # the pronoun: "the answer, I think, ..." / "I believe"
    idx = LETTERS.index(letter.upper())
    return (idx if idx < n else _AMBIGUOUS), rest


def _option_text_at_start(tail: str, options: Sequence[str]) -> int | None:
    """Index of the (longest) option whose text opens ``tail``, word-bounded."""
    def opens(t: str, o: str) -> bool:
        return bool(o) and (t == o or t.startswith(o + " "))

    t = _norm(tail)
    hits = [i for i, opt in enumerate(options) if opens(t, _norm(opt))]
    longest = max((len(_norm(options[i])) for i in hits), default=0)
    best = [i for i in hits if len(_norm(options[i])) == longest]
    return _tiebreak(best, lambda i: _opens_exact(tail.strip(), options[i]))


def _options_named(text: str, options: Sequence[str]) -> set[int]:
    """Options whose full text appears in ``text`` (word-bounded); shorter texts inside longer named ones
    are ignored ("aspirin" inside "aspirin and clopidogrel")."""
    t = " " + _norm(text) + " "
    hits = [(i, _norm(o)) for i, o in enumerate(options) if _norm(o) and f" {_norm(o)} " in t]
    named = {i for i, o in hits if not any(o != o2 and f" {o} " in f" {o2} " for _, o2 in hits)}
    if len({_norm(options[i]) for i in named}) == 1:  # options equal under _norm: which one, exactly
        one = _tiebreak(sorted(named), lambda i: re.search(
            rf"(?<!\w){re.escape(_exact(options[i]))}(?!\w)", _exact(text)) is not None)
        return named if one == _AMBIGUOUS else {one}
    return named


def _parse_statement(tail: str, options: Sequence[str]) -> int | None:
    """Resolve the text right after an answer phrase (or inside a box) to one option."""
    n = len(options)
    tail = tail.strip()
    if _AMBIG_WORDS.match(tail):
        return _AMBIGUOUS
    idx, rest = _leading_letter(tail, n)
    if idx is not None:
        if idx == _AMBIGUOUS:
            return _AMBIGUOUS
        # "A or C", "B and D", "A, C": a second letter joined to the first -> not committed.
        c = _CONNECTOR.match(rest)
        if c:
            idx2, _ = _leading_letter(rest[c.end():], n)
            if idx2 is not None and idx2 != idx:
                return _AMBIGUOUS
        return idx
    opt = _option_text_at_start(tail, options)
    if opt is not None:
        return opt
    return None


def _stage_boxed(text: str, options: Sequence[str]) -> int | None:
    boxes = re.findall(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text)
    if not boxes:
        return None
    content = _clean(boxes[-1]).strip()
    got = _parse_statement(content, options)
    if got is None:
        named = _options_named(content, options)
        if len(named) == 1:
            return named.pop()
        return _AMBIGUOUS if named else None
    return got


def _stage_phrase(text: str, options: Sequence[str]) -> int | None:
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        # A statement ends at a line break or a sentence end followed by a capital letter.
        tail = text[m.end():].split("\n", 1)[0][:200]
        got = _parse_statement(tail, options)
        if got is not None:
            return got
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _stage_option_line(text: str, options: Sequence[str]) -> int | None:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    n = len(options)

    def as_option(line: str) -> int | None:
        m = _OPTION_LINE.match(line)
        if not m:
            return None
        letter, rest = m.group(1), m.group(2)
        if letter.islower() and rest:
            return None
        idx = LETTERS.index(letter.upper())
        if idx >= n:
            return None
        # "C. <text>" must look like the option, not a sentence that starts with a capital letter.
        if rest and not (_norm(rest).startswith(_norm(options[idx])[:12]) or len(rest) <= 3):
            return None
        return idx

    last = as_option(lines[-1])
    if last is None:
        return None
    # A listing of the options ("A. x / B. y / C. z") is not an answer.
    if len(lines) >= 2 and as_option(lines[-2]) is not None:
        return _AMBIGUOUS
    return last


def _stage_option_text(text: str, options: Sequence[str]) -> int | None:
    line = _last_line(text)
    if not line:
        return None
    exact = [i for i, o in enumerate(options) if _norm(o) and _norm(o) == _norm(line)]
    if exact:
        return _tiebreak(exact, lambda i: _exact(options[i]) == _exact(line))
    named = _options_named(line, options)
    if len(named) == 1:
        return named.pop()
    return _AMBIGUOUS if len(named) > 1 else None


def _stage_mention(text: str, options: Sequence[str]) -> int | None:
    n = len(options)
    mentions = [(m.group(1) or m.group(2)) for m in _MENTION.finditer(text)]
    mentions = [LETTERS.index(x.upper()) for x in mentions if x.isupper() or x.upper() == x]
    mentions = [i for i in mentions if i < n]
    return mentions[-1] if mentions else None


_STRONG = (_stage_boxed, _stage_phrase)
_ALL = (_stage_boxed, _stage_phrase, _stage_option_line, _stage_option_text, _stage_mention)


def _cascade(text: str, options: Sequence[str], stages) -> int | None:
    for stage in stages:
        got = stage(text, options)
        if got == _AMBIGUOUS:
            return _AMBIGUOUS
        if got is not None:
            return got
    return None


def split_think(text: str) -> tuple[str, str]:
    """Split an output into (reasoning block, visible answer).

    With ``</think>`` the visible answer is what follows the last one; an unclosed ``<think>`` means the
    output was cut off inside its reasoning, so there is no visible answer.
    """
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        head, answer = text[: closes[-1].start()], text[closes[-1].end():]
        return _THINK_OPEN.sub("", head), answer
    opened = _THINK_OPEN.search(text)
    if opened:
        return text[opened.end():], ""
    return "", text


def extract_answer(text: str | None, options: Sequence[str]) -> int | None:
    """Index (0-based) of the option a model output commits to, or None for no / ambiguous answer."""
    if not text or not options:
        return None
    think, visible = split_think(text)
    visible = _clean(visible)
    got = _cascade(visible, options, _ALL) if visible.strip() else None
    if got is None and think.strip():
        got = _cascade(_clean(think), options, _STRONG)
    return None if got is None or got == _AMBIGUOUS else got


def answer_letter(index: int | None) -> str:
    """Letter for an option index ('' for None), as written in logs and reports."""
    return "" if index is None else LETTERS[index]


def final_statement_answer(text: str, options: Sequence[str]) -> int | None:
    """The option named by the text's closing "The answer is X." (letter or option text), else None.

    Only the last such statement, ending the text, counts: a letter mentioned earlier ("At first sight (C)
    looks right") or a closing statement that names no option gives None.
    """
    m = LAST_STATEMENT.search(text.strip())
    return None if m is None else extract_answer(m.group(0), options)
