"""Trace construction: plain / adversarial / backtracking examples and their mix."""

import collections
import dataclasses

import numpy as np
import pytest

from medkr_jax.data.records import MCQRecord
from medkr_jax.data.answer import extract_answer
from medkr_jax.train import traces


def rec(i, answer=1, trace="Step 1: the drug inhibits thrombin.\nStep 2: so it is heparin.", adv=()):
    return MCQRecord(id=f"q{i}", benchmark="toy", question=f"Which anticoagulant? ({i})",
                     options=["Aspirin", "Heparin", "Warfarin", "Insulin"], answer=answer, trace=trace,
                     adversarial_traces=list(adv))


def test_plain_example_ends_with_the_answer():
    ex = traces.make_example(rec(0), "plain", np.random.default_rng(0))
    assert ex.assistant_prefix == ""
    assert ex.response.startswith("Step 1") and ex.response.endswith("The answer is B.")
    assert extract_answer(ex.response, ex.record.options) == 1
    assert traces.plain_response(rec(1, trace=None)) == "The answer is B."
    assert traces.plain_response(rec(1, trace="X points to Y. The answer is B.")) == "X points to Y. The answer is B."


@pytest.mark.parametrize("seed", range(6))
def test_adversarial_prefix_misleads_and_response_recovers(seed):
    ex = traces.make_example(rec(0, answer=seed % 4), "adversarial", np.random.default_rng(seed))
    wrong = extract_answer(ex.assistant_prefix, ex.record.options)
    assert wrong is not None and wrong != ex.answer  # the prefilled part argues for a wrong option
    assert ex.response.startswith("Wait")
    assert extract_answer(ex.assistant_prefix + ex.response, ex.record.options) == ex.answer
    assert "Step 1" in ex.response  # the gold trace is in the trained part


def test_adversarial_uses_released_traces_when_present():
    released = ["Clearly aspirin, as it is an antiplatelet. The answer is A."]
    ex = traces.make_example(rec(0, adv=released), "adversarial", np.random.default_rng(0))
    assert ex.assistant_prefix.strip() == released[0]
    assert extract_answer(ex.assistant_prefix + ex.response, ex.record.options) == 1


@pytest.mark.parametrize("seed", range(4))
def test_backtracking_takes_a_wrong_step_then_corrects(seed):
    ex = traces.make_example(rec(0, answer=2), "backtracking", np.random.default_rng(seed))
    assert ex.assistant_prefix == ""
    first, rest = ex.response.split("Wait", 1)
    named = [i for i, o in enumerate(ex.record.options) if o in first]
    assert named and named[0] != 2  # the wrong step names a wrong option
    assert extract_answer(ex.response, ex.record.options) == 2


def test_mix_ratios_reproducibility_and_skipping():
    records = [rec(i, answer=i % 4) for i in range(600)] + [rec(999, trace=None)]
    cfg = traces.TraceMix(plain=0.5, adversarial=0.3, backtracking=0.2, seed=3)
    exs = traces.build_examples(records, cfg)
    assert len(exs) == 600  # the record without a trace is skipped for SFT
    counts = collections.Counter(e.kind for e in exs)
    assert abs(counts["plain"] / 600 - 0.5) < 0.07
    assert abs(counts["adversarial"] / 600 - 0.3) < 0.07
    assert abs(counts["backtracking"] / 600 - 0.2) < 0.07
    again = traces.build_examples(records, cfg)
    assert [(e.kind, e.response) for e in again] == [(e.kind, e.response) for e in exs]
    other = traces.build_examples(records, dataclasses.replace(cfg, seed=4))
    assert [e.kind for e in other] != [e.kind for e in exs]
    assert len(traces.build_examples(records, cfg, require_trace=False)) == 601
    only_plain = traces.build_examples(records[:50], traces.TraceMix(plain=1.0))
    assert {e.kind for e in only_plain} == {"plain"}
    with pytest.raises(ValueError, match="config.traces"):
        traces.build_examples(records, traces.TraceMix(plain=0.0, adversarial=0.0, backtracking=0.0))


def test_option_answer_format_names_the_option_text():
    ex = traces.make_example(rec(0, trace="X points to heparin. The answer is B."), "plain",
                             np.random.default_rng(0), "option")
    assert ex.response == "X points to heparin. The answer is Heparin."
    assert extract_answer(ex.response, ex.record.options) == 1
    # a trace without a final statement gets one; letter format stays as before
    assert traces.plain_response(rec(1, trace="Step 1."), "option") == "Step 1.\nThe answer is Heparin."
    assert traces.plain_response(rec(1, trace="Step 1. The answer is B."), "letter") == "Step 1. The answer is B."
    with pytest.raises(ValueError, match="answer_format"):
        traces.build_examples([rec(0)], traces.TraceMix(plain=1.0, answer_format="number"))


@pytest.mark.parametrize("seed", range(4))
def test_option_format_restates_released_prefix_and_cue_names_its_option(seed):
    released = ["Clearly aspirin. The answer is A.", "Surely warfarin. The answer is C."]
    ex = traces.make_example(rec(0, adv=released), "adversarial", np.random.default_rng(seed), "option")
    prefix = ex.assistant_prefix.strip()
    assert prefix in ("Clearly aspirin. The answer is Aspirin.", "Surely warfarin. The answer is Warfarin.")
    wrong = extract_answer(prefix, ex.record.options)
    assert wrong in (0, 2)
    if "jumping to" in ex.response:
        assert f"jumping to {'ABCD'[wrong]}" in ex.response  # the cue names the option the prefix argued for
    assert ex.response.endswith("The answer is Heparin.")
    assert extract_answer(ex.assistant_prefix + ex.response, ex.record.options) == 1


def test_build_examples_reads_answer_format_from_the_mix():
    exs = traces.build_examples([rec(i, answer=i % 4) for i in range(8)], traces.TraceMix(answer_format="option"))
    for e in exs:
        assert e.response.endswith(f"The answer is {e.record.options[e.answer]}.")
