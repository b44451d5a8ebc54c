"""Synthetic medical-QA world: determinism, balance, valid answers, traces consistent with the world."""

import re
from collections import Counter

import pytest

from medkr_jax.data import synthetic as S
from medkr_jax.data.answer import LETTERS, final_letter
from medkr_jax.data.text import normalize_text


@pytest.fixture(scope="module")
def world():
    return S.make_world(0)


@pytest.fixture(scope="module")
def questions(world):
    return S.make_questions(world, 600, seed=1)


def _has(phrase: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text, re.IGNORECASE) is not None


def test_world_is_deterministic_and_well_formed():
    a, b, c = S.make_world(3), S.make_world(3), S.make_world(4)
    assert a.to_dict() == b.to_dict() and a.to_dict() != c.to_dict()
    w = S.make_world(5, n_diseases=12, n_classes=6, drugs_per_class=3)
    assert (len(w.diseases), len(w.classes), len(w.drugs)) == (12, 6, 18)
    sigs = {(frozenset(d.symptoms), d.lab) for d in w.diseases}
    assert len(sigs) == 12  # every disease identifiable from its findings
    assert len({c.contraindication for c in w.classes}) == 6
    by_name = {g.name: g for g in w.drugs}
    for d in w.diseases:
        assert by_name[d.first_line].drug_class != by_name[d.second_line].drug_class
    names = [d.name.lower() for d in w.diseases] + [g.name for g in w.drugs] + [c.name for c in w.classes]
    assert len(set(names)) == len(names)
    assert not any(x != y and x in y for x in names for y in names)  # no name hides inside another
    with pytest.raises(ValueError, match="n_classes"):
        S.make_world(0, n_classes=3)


def test_world_save_load_round_trip(tmp_path, world):
    path = S.save_world(world, tmp_path / "w" / "world.json")
    assert S.load_world(path).to_dict() == world.to_dict()
    with pytest.raises(FileNotFoundError):
        S.load_world(tmp_path / "missing.json")


def test_questions_are_deterministic_by_seed(world, questions):
    again = S.make_questions(world, 600, seed=1)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in questions]
    other = S.make_questions(world, 600, seed=2)
    assert [r.question for r in other] != [r.question for r in questions]


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.0, 1.0])
def test_labels_balanced_as_configured(world, fraction):
    recs = S.make_questions(world, 101, seed=7, reasoning_fraction=fraction)
    labels = Counter(r.label for r in recs)
    assert labels["reasoning"] == round(101 * fraction) and labels["knowledge"] == 101 - round(101 * fraction)
    kinds = Counter(r.meta["kind"] for r in recs)
    for group in (S.REASONING_KINDS, S.KNOWLEDGE_KINDS):
        counts = [kinds[k] for k in group]
        assert max(counts) - min(counts) <= 1


def test_answers_valid_and_positions_uniform(questions):
    for r in questions:
        r.validate()
        assert len(r.options) == 4 and len(set(r.options)) == 4
        assert r.benchmark == S.BENCHMARK and r.label in ("reasoning", "knowledge")
    pos = Counter(r.answer for r in questions)
    assert set(pos) == {0, 1, 2, 3}
    # 600 draws: each position ~150 (sd ~10.6); 110..190 is ~3.8 sd either side.
    assert all(110 <= pos[i] <= 190 for i in range(4)), pos


def test_no_duplicate_questions_within_and_across_splits(world, questions):
    keys = [normalize_text(r.question) for r in questions]
    assert len(set(keys)) == len(keys)
    splits = S.make_splits(world, {"train": 300, "test": 100}, seed=3, reasoning_fraction=0.4)
    train = {normalize_text(r.question) for r in splits["train"]}
    test = {normalize_text(r.question) for r in splits["test"]}
    assert len(train) == 300 and len(test) == 100 and train.isdisjoint(test)
    assert Counter(r.label for r in splits["test"])["reasoning"] == 40
    assert len({r.id for r in splits["train"] + splits["test"]}) == 400


def test_too_many_questions_for_a_tiny_world_is_a_clear_error():
    tiny = S.make_world(0, n_diseases=2, n_classes=4, drugs_per_class=1)
    with pytest.raises(ValueError, match="too small"):
        S.make_questions(tiny, 3000, seed=0, reasoning_fraction=0.0, max_tries_per_question=2)


def test_short_questions_and_traces(questions):
    assert max(len(r.question.split()) for r in questions) < 60
    assert max(len(t.split()) for r in questions for t in [r.trace, *r.adversarial_traces]) < 60


def _solve_reasoning(world, q: str) -> tuple[str, str]:
    """Independent oracle: read the findings off the question text and apply the world's rules."""
    symptoms = {s for s in S.SYMPTOMS if _has(s, q)}
    labs = [lab for lab in S.LABS if _has(lab, q)]
    conditions = [c for c in S.CONDITIONS if _has(c, q)]
    assert len(symptoms) == 2 and len(labs) == 1 and len(conditions) <= 1, q
    matches = [d for d in world.diseases if set(d.symptoms) == symptoms and d.lab == labs[0]]
    assert len(matches) == 1, q
    disease = matches[0]
    drugs = {g.name: g for g in world.drugs}
    classes = {c.name: c for c in world.classes}
    first = drugs[disease.first_line]
    weight = re.search(r"\b(\d+) kg\b", q)
    if weight:  # dose question: first-line drug, mg per kg x weight
        return disease.name, f"{first.dose_per_kg * int(weight.group(1))} mg"
    if conditions and classes[first.drug_class].contraindication == conditions[0]:
        return disease.name, disease.second_line
    return disease.name, first.name


def test_reasoning_answers_recomputed_from_the_world(world, questions):
    reasoning = [r for r in questions if r.label == "reasoning"]
    assert len(reasoning) == 300
    switched = 0
    for r in reasoning:
        disease, expected = _solve_reasoning(world, r.question)
        assert r.answer_text == expected, (r.question, r.options, r.answer)
        assert disease in r.trace  # the trace names the diagnosis ...
        assert r.trace.endswith(f"The answer is {r.answer_letter}.")  # ... and ends with the gold letter
        assert len(r.trace.split(". ")) >= 3  # several steps
        switched += r.meta.get("switched", False)
        if r.meta["kind"] == "dose":
            m = re.search(r"(\d+) times (\d+) is (\d+)", r.trace)
            assert m and int(m.group(1)) * int(m.group(2)) == int(m.group(3)) and r.answer_text == f"{m.group(3)} mg"
    assert 50 < switched < 100  # about half of the 150 treatment questions need the contraindication switch


def test_knowledge_answers_are_the_one_true_fact(world, questions):
    facts = {}
    for d in world.diseases:
        facts[d.name] = {*d.symptoms, d.lab, d.first_line}
    for g in world.drugs:
        facts[g.name] = {g.drug_class, f"{g.dose_per_kg} mg per kg"}
    for c in world.classes:
        facts[c.name] = {c.contraindication}
    knowledge = [r for r in questions if r.label == "knowledge"]
    assert len(knowledge) == 300
    for r in knowledge:
        entities = [e for e in facts if _has(e, r.question)]
        assert len(entities) == 1, r.question  # one fact lookup about one named entity
        true = [i for i, o in enumerate(r.options) if o in facts[entities[0]]]
        assert true == [r.answer], (r.question, r.options)
        assert r.trace.endswith(f"The answer is {r.answer_letter}.") and r.answer_text in r.trace
        assert len(r.trace.split(". ")) == 2  # one fact, then the answer


def test_adversarial_traces_cover_each_wrong_option_once(questions):
    for r in questions:
        letters = [final_letter(t) for t in r.adversarial_traces]
        assert sorted(letters) == sorted(set(LETTERS[:4]) - {r.answer_letter})
        assert final_letter(r.trace) == r.answer_letter
    switched = next(r for r in questions if r.meta.get("switched"))
    first_line = [t for t in switched.adversarial_traces if "ruled out" not in t and "first-line" in t]
    assert first_line  # one misleading trace ignores the contraindication


def test_backtracking_trace(questions):
    r = questions[0]
    t = S.backtracking_trace(r, 1)
    wrong, gold = t.split(" Wait, that is not right. ")
    assert gold == r.trace and final_letter(t) == r.answer_letter
    assert "The answer is" not in wrong and r.adversarial_traces[1].startswith(wrong)


def test_no_single_word_gives_the_label_away(questions):
    words = lambda s: set(re.findall(r"[a-z\-]+", s.lower()))  # noqa: E731
    reasoning = [words(r.question) for r in questions if r.label == "reasoning"]
    knowledge = [words(r.question) for r in questions if r.label == "knowledge"]
    vocab = set().union(*reasoning, *knowledge)
    for w in vocab:
        in_r = sum(w in q for q in reasoning) / len(reasoning)
        in_k = sum(w in q for q in knowledge) / len(knowledge)
        assert not (in_r == 1.0 and in_k == 0.0), w
        assert not (in_k == 1.0 and in_r == 0.0), w
    # Patient framing appears on both sides.
    for label in ("reasoning", "knowledge"):
        assert any("year-old" in r.question for r in questions if r.label == label)


def test_corpus_covers_every_word(world, questions):
    texts = S.corpus(world, questions[:100], extra_texts=["Question:", "Answer:"])
    vocab = set(" ".join(texts).split())
    for r in questions[:100]:
        for t in [r.question, *r.options, r.trace, *r.adversarial_traces]:
            assert set(t.split()) <= vocab
    assert set(world.facts()) <= set(texts) and "Answer:" in texts
    assert {"The answer is A.", "The answer is D."} <= set(texts)
