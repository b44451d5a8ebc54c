"""Text keys that decide when two questions or two options are the same (records, readers, answers)."""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of ``text`` (NFKC, casefolded)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).replace("_", " ").split())


def option_key(text: str) -> str:
    """An option text as far as any reader can tell options apart: NFKC, spacing collapsed, surrounding
    spaces and a final period dropped; letter case and symbols kept ("BB BB" / "BB Bb" are different
    genotypes, "BMI > 25" / "BMI = 25" different thresholds). ``data.answer`` matches options
    ``normalize_text``-insensitively and breaks the ties that leaves with this key."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).removesuffix(".").rstrip()
