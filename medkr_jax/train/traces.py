"""SFT / RL examples from MCQ records with a reasoning trace: plain, adversarial and backtracking.

* plain:        the assistant writes the trace, then "The answer is X."
* adversarial:  the assistant turn is *prefilled* with misleading reasoning toward a wrong option (the
                record's released adversarial trace when it has one, else a template); the trained response
                starts with a recovery cue ("Wait, ..."), rejects the wrong option and reaches the right one.
                The misleading part is prompt, not target, so the model learns to recover, never to mislead
                (the same shape as the adversarial evaluation, where the prefill comes from outside).
* backtracking: the trained response itself takes a wrong step toward a wrong option, notices ("Wait"),
                corrects itself and finishes with the trace and the right answer.

Kinds are drawn per record with the ratios of a `TraceMix` (config.traces: plain / adversarial / backtracking),
from a seeded generator, so a dataset is reproducible.

config.traces.answer_format says how the final statement names the answer: "letter" ("The answer is B.") or
"option" ("The answer is heparin.", the option's own text, which the evaluation's extractor maps back to
the option). A trace that already ends with a letter statement gets it rewritten to the chosen form, and so
does a released adversarial prefix, so prefix and response name options the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from medkr_jax.data.answer import FINAL_LETTER, LETTERS, answer_sentence, option_answer_sentence
from medkr_jax.data.records import MCQRecord

KINDS = ("plain", "adversarial", "backtracking")
ANSWER_FORMATS = ("letter", "option")

MISLEAD_TEMPLATES = (
    "The key finding here points to {letter}. {option} is the classic choice in this setting, so the answer "
    "is {letter}.",
    "This is a typical presentation of {option}, so I would go with {letter}.",
    "Option {letter} ({option}) fits best: it is by far the most common answer to this kind of question.",
)
RECOVERY_CUES = (
    "Wait, that does not hold up. Let me reason it through properly.",
    "Wait, let me re-check this instead of jumping to {letter}.",
    "Wait, I should not trust that first impression. Going step by step:",
)
WRONG_STEP_TEMPLATES = (
    "At first sight {option} ({letter}) looks right.",
    "One might think of {option} ({letter}) here.",
)
BACKTRACK_CUES = (
    "Wait, that does not fit all the details of the question.",
    "Wait, {letter} is not consistent with the facts given; let me reconsider.",
)


@dataclasses.dataclass
class TraceExample:
    """One training example: the user turn, an optional prefilled assistant prefix (not trained on), and
    the trained response. `answer` indexes `options`."""

    record_id: str
    kind: str
    record: MCQRecord
    assistant_prefix: str
    response: str

    @property
    def answer(self) -> int:
        return self.record.answer


@dataclasses.dataclass(frozen=True)
class TraceMix:
    """config.traces as plain values: the ratios of the kinds, the seed of the draw, the answer format."""

    plain: float = 1.0
    adversarial: float = 0.0
    backtracking: float = 0.0
    seed: int = 0
    answer_format: str = "letter"  # "letter" | "option"


def _ratios(mix: TraceMix) -> np.ndarray:
    r = np.array([float(getattr(mix, k) or 0.0) for k in KINDS])
    if (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"config.traces: the ratios plain/adversarial/backtracking must be >= 0 and not all 0, "
                         f"got {dict(zip(KINDS, r.tolist()))}")
    return r / r.sum()


def _wrong_option(record: MCQRecord, rng: np.random.Generator) -> int:
    wrong = [i for i in range(len(record.options)) if i != record.answer]
    return int(rng.choice(wrong))


def _fmt(template: str, record: MCQRecord, idx: int) -> str:
    return template.format(letter=LETTERS[idx], option=record.options[idx].strip())


def answer_statement(record: MCQRecord, idx: int, answer_format: str = "letter") -> str:
    """"The answer is B." or, with answer_format="option", "The answer is <text of option idx>."."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"config.traces.answer_format: expected one of {ANSWER_FORMATS}, got {answer_format!r}")
    if answer_format == "option":
        return option_answer_sentence(record.options[idx])
    return answer_sentence(LETTERS[idx])


def _restate(text: str, record: MCQRecord, answer_format: str) -> str:
    """`text` with a final letter statement rewritten in `answer_format` (unchanged when it has none)."""
    m = FINAL_LETTER.search(text)
    if answer_format == "letter" or m is None or LETTERS.index(m.group(2)) >= len(record.options):
        return text
    return text[:m.start()] + m.group(1) + answer_statement(record, LETTERS.index(m.group(2)), answer_format)


def plain_response(record: MCQRecord, answer_format: str = "letter") -> str:
    """Trace (if any) followed by the final answer statement (see `answer_statement`)."""
    final = answer_statement(record, record.answer, answer_format)
    trace = _restate((record.trace or "").strip(), record, answer_format)
    if trace.endswith(final):  # traces that already close with the answer sentence are not repeated
        return trace
    return f"{trace}\n{final}" if trace else final


def make_example(record: MCQRecord, kind: str, rng: np.random.Generator,
                 answer_format: str = "letter") -> TraceExample:
    """Build one example of `kind` for `record` (randomness from `rng`: wrong option, phrasing)."""
    if kind not in KINDS:
        raise ValueError(f"trace kind {kind!r} unknown; expected one of {KINDS}")
    if kind != "plain" and len(record.options) < 2:
        raise ValueError(f"record {record.id}: {kind} traces need at least two options")
    body = plain_response(record, answer_format)
    if kind == "plain":
        return TraceExample(record.id, kind, record, "", body)
    wrong = _wrong_option(record, rng)
    if kind == "adversarial":
        if record.adversarial_traces:
            prefix = str(record.adversarial_traces[int(rng.integers(len(record.adversarial_traces)))]).strip()
            m = FINAL_LETTER.search(prefix)
            if m is not None and LETTERS.index(m.group(2)) < len(record.options):
                wrong = LETTERS.index(m.group(2))  # the recovery cue names the option the prefix argued for
            prefix = _restate(prefix, record, answer_format)
        else:
            prefix = _fmt(MISLEAD_TEMPLATES[int(rng.integers(len(MISLEAD_TEMPLATES)))], record, wrong)
        cue = _fmt(RECOVERY_CUES[int(rng.integers(len(RECOVERY_CUES)))], record, wrong)
        # the prefix ends the prefilled text; the response continues it on a new line
        return TraceExample(record.id, kind, record, prefix + "\n", f"{cue}\n{body}")
    step = _fmt(WRONG_STEP_TEMPLATES[int(rng.integers(len(WRONG_STEP_TEMPLATES)))], record, wrong)
    cue = _fmt(BACKTRACK_CUES[int(rng.integers(len(BACKTRACK_CUES)))], record, wrong)
    return TraceExample(record.id, kind, record, "", f"{step} {cue}\n{body}")


def build_examples(records: Sequence[MCQRecord], mix: TraceMix, *, require_trace: bool = True) -> list[TraceExample]:
    """One example per record, kinds drawn with the ratios of `mix` from a generator seeded with mix.seed.

    require_trace: skip records without a trace (SFT); GRPO prompts set it False (only the answer is needed).
    """
    ratios = _ratios(mix)
    answer_format = str(mix.answer_format or "letter")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"config.traces.answer_format: expected one of {ANSWER_FORMATS}, got {answer_format!r}")
    rng = np.random.default_rng(int(mix.seed or 0))
    out = []
    for rec in records:
        if require_trace and not (rec.trace or "").strip():
            continue
        kind = KINDS[int(rng.choice(len(KINDS), p=ratios))]
        if kind != "plain" and len(rec.options) < 2:
            kind = "plain"
        out.append(make_example(rec, kind, rng, answer_format))
    return out
