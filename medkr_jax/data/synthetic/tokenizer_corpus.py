"""All text of a synthetic world and its questions, for training the demo's small BPE tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from medkr_jax.data.answer import LETTERS, answer_sentence
from medkr_jax.data.records import MCQRecord
from medkr_jax.data.synthetic.world import World


def corpus(world: World, records: Iterable[MCQRecord] = (), *, extra_texts: Iterable[str] = ()) -> list[str]:
    """All text of the world (facts, questions, options, traces, answer sentences) for tokenizer
    training; ``extra_texts`` adds e.g. prompt templates."""
    texts = list(world.facts())
    texts += [answer_sentence(c) for c in LETTERS[:4]]
    for r in records:
        texts.append(r.question)
        texts += [f"{LETTERS[i]}. {o}" for i, o in enumerate(r.options)]
        if r.trace:
            texts.append(r.trace)
        texts += r.adversarial_traces
    texts += list(extra_texts)
    return texts
