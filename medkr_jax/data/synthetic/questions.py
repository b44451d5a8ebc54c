"""Questions over a synthetic world: knowledge questions (one fact lookup) and reasoning questions
(several steps), each with its label, a gold trace and one misleading trace per wrong option."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from medkr_jax.data.answer import FINAL_LETTER, LETTERS, answer_sentence
from medkr_jax.data.records import MCQRecord
from medkr_jax.data.synthetic.world import CONDITIONS, DOSE_RATES, LABS, SYMPTOMS, Disease, World, capitalize_first
from medkr_jax.data.text import normalize_text

BENCHMARK = "synthetic"
WEIGHTS = tuple(range(40, 101, 10))  # kg
KNOWLEDGE_KINDS = ("drug_class", "first_line", "contraindication", "finding", "lab", "dose_rate")
REASONING_KINDS = ("treatment", "dose")

_AGES = tuple(range(20, 81))
_DISTRACTORS = (
    "{He} works as a teacher.", "{He} lives with {his} sister.", "{He} walks to work every day.",
    "{He} drinks two cups of tea a day.", "{He} came to the clinic in the morning.", "{He} has a pet dog.",
    "{His} last visit was a year ago.", "{He} enjoys reading and walking.", "{He} came with {his} son.",
    "{He} slept well last night.", "{He} has a sister and a brother.",
)
_INTROS = (
    "A {age}-year-old {sex} has {s1}, {s2} and {lab}.",
    "A {sex} aged {age} presents with {s1} and {s2}. Tests show {lab}.",
    "A patient comes in with {s1} and {s2}. Blood tests show {lab}.",
    "A {age}-year-old {sex} reports {s1} and {s2}. {His} labs show {lab}.",
    "A {sex} aged {age} has {s1}. {He} also reports {s2}. Tests show {lab}.",
    "A patient has {s1}, {s2}, {lab}.",
)
_CONDITION_LINES = ("{He} also has {cond}.", "{His} history includes {cond}.", "{He} is known to have {cond}.")
_TREAT_ASKS = ("Which drug is the best treatment?", "Which drug should {he} receive?",
               "What is the most suitable drug for {him}?")
_DOSE_ASKS = ("{He} weighs {w} kg and starts the first-line drug for {his} disease. What dose should {he} get?",
              "{He} weighs {w} kg. What dose of the first-line drug for {his} disease is right?",
              "The first-line drug for {his} disease is started. {He} weighs {w} kg. Which dose is correct?")
_KNOWLEDGE_INTROS = ("A {age}-year-old {sex} asks about {his} care.", "A {sex} aged {age} visits the clinic.",
                     "A patient asks {his} doctor a question.", "A {sex} and {his} son visit the clinic.",
                     "A {age}-year-old patient has questions about treatment.")
_KNOWLEDGE_ASKS = {
    "drug_class": ("Which drug class does {x} belong to?", "{X} is a member of which drug class?",
                   "To which class of drugs does {x} belong?"),
    "first_line": ("What is the first-line drug for {x}?", "Which drug is used first to treat {x}?",
                   "{X} is treated first with which drug?"),
    "contraindication": ("Which condition rules out the use of {x}?", "{X} must be avoided in patients with which condition?",
                         "Which condition is a reason not to give {x}?"),
    "finding": ("Which symptom is typical of {x}?", "{X} causes which of these symptoms?",
                "Which symptom is seen in {x}?"),
    "lab": ("Which lab result is seen in {x}?", "{X} shows which lab pattern?", "Which lab finding fits {x}?"),
    "dose_rate": ("What is the dose of {x} per kg of body weight?", "{X} is dosed at how much per kg?",
                  "How much {x} is given per kg?"),
}


def _pronouns(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.5:
        return {"sex": "man", "He": "He", "he": "he", "His": "His", "his": "his", "him": "him"}
    return {"sex": "woman", "He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"}


def _fill(template: str, **kw) -> str:
    return template.format(**kw)


def _sentences(rng: random.Random, pro: dict, k_max: int = 2) -> list[str]:
    return [_fill(s, **pro) for s in rng.sample(_DISTRACTORS, rng.randint(0, k_max))]


def _options(rng: random.Random, correct: str, pool: Sequence[str]) -> tuple[list[str], int]:
    """4 options: ``correct`` at a uniformly random position, 3 distinct distractors from ``pool``."""
    distractors = rng.sample([p for p in dict.fromkeys(pool) if p != correct], 3)
    pos = rng.randrange(4)
    return distractors[:pos] + [correct] + distractors[pos:], pos


def _join_findings(items: Sequence[str]) -> str:
    return f"{items[0]}, {items[1]} and {items[2]}"


class _Generator:
    def __init__(self, world: World, rng: random.Random):
        self.w, self.rng = world, rng

    # -- knowledge: one fact lookup ------------------------------------------------------------
    def knowledge(self, kind: str) -> tuple[str, list[str], int, list[str], dict]:
        w, rng = self.w, self.rng
        if kind == "drug_class":
            drug = rng.choice(w.drugs)
            subject, correct, pool = drug.name, drug.drug_class, [c.name for c in w.classes]
            fact = lambda v: f"{capitalize_first(drug.name)} belongs to the {v} class."  # noqa: E731
        elif kind == "first_line":
            dis = rng.choice(w.diseases)
            subject, correct, pool = dis.name, dis.first_line, [d.name for d in w.drugs]
            fact = lambda v: f"The first-line drug for {dis.name} is {v}."  # noqa: E731
        elif kind == "contraindication":
            cls = rng.choice(w.classes)
            subject, correct, pool = cls.name, cls.contraindication, list(CONDITIONS)
            fact = lambda v: f"{capitalize_first(cls.name)} are ruled out by {v}."  # noqa: E731
        elif kind == "finding":
            dis = rng.choice(w.diseases)
            subject, correct = dis.name, rng.choice(dis.symptoms)
            pool = [s for s in SYMPTOMS if s not in dis.symptoms]
            fact = lambda v: f"{dis.name} causes {v}."  # noqa: E731
        elif kind == "lab":
            dis = rng.choice(w.diseases)
            subject, correct, pool = dis.name, dis.lab, list(LABS)
            fact = lambda v: f"{dis.name} shows {v}."  # noqa: E731
        elif kind == "dose_rate":
            drug = rng.choice(w.drugs)
            subject, correct = drug.name, f"{drug.dose_per_kg} mg per kg"
            pool = [f"{r} mg per kg" for r in DOSE_RATES]
            fact = lambda v: f"{capitalize_first(drug.name)} is dosed at {v}."  # noqa: E731
        else:
            raise ValueError(f"unknown knowledge kind {kind!r}; kinds: {KNOWLEDGE_KINDS}")
        options, pos = _options(rng, correct, pool)
        ask = _fill(rng.choice(_KNOWLEDGE_ASKS[kind]), x=subject, X=capitalize_first(subject))
        parts = []
        if rng.random() < 0.5:  # irrelevant patient framing, so "patient" words do not give the label away
            pro = _pronouns(rng)
            parts.append(_fill(rng.choice(_KNOWLEDGE_INTROS), age=rng.choice(_AGES), **pro))
            if kind != "contraindication" and rng.random() < 0.5:
                parts.append(_fill(rng.choice(_CONDITION_LINES), cond=rng.choice(CONDITIONS), **pro))
            parts += _sentences(rng, pro, 1)
        question = " ".join(parts + [ask])
        steps = {i: [fact(o)] for i, o in enumerate(options)}
        return question, options, pos, steps, {"kind": kind, "subject": subject}

    # -- reasoning: several steps ---------------------------------------------------------------
    def _vignette(self, dis: Disease, pro: dict) -> tuple[list[str], list[str]]:
        rng = self.rng
        s1, s2 = rng.sample(dis.symptoms, 2)
        intro = _fill(rng.choice(_INTROS), age=rng.choice(_AGES), s1=s1, s2=s2, lab=dis.lab, **pro)
        findings = [s1, s2, dis.lab]
        diag = f"{capitalize_first(_join_findings(findings))} point to {dis.name}."
        return [intro], [diag]

    def treatment(self) -> tuple[str, list[str], int, dict, dict]:
        w, rng = self.w, self.rng
        dis = rng.choice(w.diseases)
        pro = _pronouns(rng)
        parts, diag = self._vignette(dis, pro)
        first = w.drug(dis.first_line)
        first_cls = w.drug_class(first.drug_class)
        r = rng.random()
        if r < 0.5:
            condition = first_cls.contraindication  # forces the switch to the second-line drug
        elif r < 0.75:
            condition = rng.choice([c for c in CONDITIONS if c != first_cls.contraindication])
        else:
            condition = None
        parts += _sentences(rng, pro, 1)
        if condition is not None:
            parts.append(_fill(rng.choice(_CONDITION_LINES), cond=condition, **pro))
        parts += _sentences(rng, pro, 1)
        parts.append(_fill(rng.choice(_TREAT_ASKS), **pro))
        drug = w.treatment(dis, condition)
        pool = [d.name for d in w.drugs]
        # The contraindicated first-line drug (or the unneeded second-line one) is always a distractor.
        trap = dis.second_line if drug.name == first.name else first.name
        options, pos = self._with_trap(drug.name, trap, pool)
        first_step = f"The first-line drug for {dis.name} is {first.name}, one of the {first.drug_class}."
        if condition is None:
            check = "Nothing rules it out."
        elif condition == first_cls.contraindication:
            check = f"{capitalize_first(first.drug_class)} are ruled out by {condition}, so the second-line drug {dis.second_line} is used."
        else:
            check = f"{capitalize_first(condition)} does not rule out {first.drug_class}."
        steps = {}
        for i, o in enumerate(options):
            if i == pos:
                steps[i] = diag + [first_step, check]
            elif o == first.name:  # ignores the contraindication
                steps[i] = diag + [first_step]
            else:
                steps[i] = diag + [f"The best drug for this patient is {o}."]
        meta = {"kind": "treatment", "disease": dis.name, "condition": condition,
                "switched": drug.name != first.name}
        return " ".join(parts), options, pos, steps, meta

    def _with_trap(self, correct: str, trap: str, pool: Sequence[str]) -> tuple[list[str], int]:
        rng = self.rng
        others = rng.sample([p for p in pool if p not in (correct, trap)], 2)
        distractors = [trap] + others
        rng.shuffle(distractors)
        pos = rng.randrange(4)
        return distractors[:pos] + [correct] + distractors[pos:], pos

    def dose(self) -> tuple[str, list[str], int, dict, dict]:
        w, rng = self.w, self.rng
        dis = rng.choice(w.diseases)
        pro = _pronouns(rng)
        parts, diag = self._vignette(dis, pro)
        weight = rng.choice(WEIGHTS)
        drug = w.drug(dis.first_line)
        total = drug.dose_per_kg * weight
        parts += _sentences(rng, pro, 1)
        parts.append(_fill(rng.choice(_DOSE_ASKS), w=weight, **pro))
        candidates = [r * weight for r in DOSE_RATES if r != drug.dose_per_kg]
        candidates += [drug.dose_per_kg * (weight + d) for d in (-10, 10) if weight + d > 0]
        options, pos = _options(rng, f"{total} mg", [f"{c} mg" for c in candidates if c != total])
        first_step = f"The first-line drug for {dis.name} is {drug.name}, dosed at {drug.dose_per_kg} mg per kg."
        steps = {}
        for i, o in enumerate(options):
            if i == pos:
                steps[i] = diag + [first_step, f"{drug.dose_per_kg} times {weight} is {total}, so {total} mg."]
            else:
                steps[i] = diag + [first_step, f"The dose is {o}."]
        meta = {"kind": "dose", "disease": dis.name, "drug": drug.name, "weight": weight}
        return " ".join(parts), options, pos, steps, meta


def _record(rid: str, question: str, options: list[str], pos: int, steps: dict[int, list[str]],
            label: str, meta: dict) -> MCQRecord:
    gold = " ".join(steps[pos] + [answer_sentence(LETTERS[pos])])
    adversarial = [" ".join(steps[i] + [answer_sentence(LETTERS[i])]) for i in range(len(options)) if i != pos]
    return MCQRecord(id=rid, benchmark=BENCHMARK, question=question, options=options, answer=pos, label=label,
                     meta=meta, trace=gold, adversarial_traces=adversarial)


def _generate(world: World, n: int, rng: random.Random, reasoning_fraction: float, seen: set[str],
              id_prefix: str, max_tries_per_question: int) -> list[MCQRecord]:
    if not 0.0 <= reasoning_fraction <= 1.0:
        raise ValueError(f"reasoning_fraction must be in [0, 1], got {reasoning_fraction}")
    n_reason = round(n * reasoning_fraction)
    # Deterministic per-kind counts: kinds cycle so each split is balanced by construction.
    plan = [("reasoning", REASONING_KINDS[i % len(REASONING_KINDS)]) for i in range(n_reason)]
    plan += [("knowledge", KNOWLEDGE_KINDS[i % len(KNOWLEDGE_KINDS)]) for i in range(n - n_reason)]
    gen = _Generator(world, rng)
    out = []
    for label, kind in plan:
        for _ in range(max_tries_per_question):
            if label == "reasoning":
                q, options, pos, steps, meta = gen.treatment() if kind == "treatment" else gen.dose()
            else:
                q, options, pos, steps, meta = gen.knowledge(kind)
            key = normalize_text(q)
            if key not in seen:
                seen.add(key)
                break
        else:
            raise ValueError(f"could not draw a new distinct {kind!r} question after {max_tries_per_question} tries; "
                             "the world is too small for this many questions (raise n_diseases / drugs)")
        out.append((label, q, options, pos, steps, meta))
    rng.shuffle(out)
    return [_record(f"{id_prefix}-{i:05d}", q, options, pos, steps, label, meta)
            for i, (label, q, options, pos, steps, meta) in enumerate(out)]


def make_questions(world: World, n: int, seed: int, *, reasoning_fraction: float = 0.5,
                   id_prefix: str | None = None, max_tries_per_question: int = 200) -> list[MCQRecord]:
    """``n`` distinct questions (no two with the same normalised text), ``round(n * reasoning_fraction)``
    of them reasoning-heavy, kinds balanced, in a seeded random order."""
    rng = random.Random(f"questions:{world.seed}:{seed}")
    return _generate(world, n, rng, reasoning_fraction, set(), id_prefix or f"syn{seed}", max_tries_per_question)


def make_splits(world: World, sizes: Mapping[str, int], seed: int, *, reasoning_fraction: float = 0.5,
                max_tries_per_question: int = 200) -> dict[str, list[MCQRecord]]:
    """Disjoint named splits (e.g. ``{"train": 800, "test": 200}``), no question text shared across
    splits, each with the configured reasoning fraction."""
    rng = random.Random(f"splits:{world.seed}:{seed}")
    seen: set[str] = set()
    return {name: _generate(world, n, rng, reasoning_fraction, seen, f"syn{seed}-{name}", max_tries_per_question)
            for name, n in sizes.items()}


def backtracking_trace(record: MCQRecord, k: int = 0) -> str:
    """A trace that starts down adversarial trace ``k``, catches itself, and ends with the gold
    reasoning: "<wrong steps> Wait, that is not right. <gold trace>" (for SFT on recovery)."""
    if record.trace is None or not record.adversarial_traces:
        raise ValueError(f"record {record.id!r} needs a gold trace and adversarial traces")
    wrong = FINAL_LETTER.sub("", record.adversarial_traces[k]).strip()
    return f"{wrong} Wait, that is not right. {record.trace}"
