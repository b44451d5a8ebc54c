"""The synthetic world's knowledge base: invented diseases, drug classes and drugs drawn from a seed,
stated as facts, saved to and loaded from JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SYMPTOMS = (
    "fever", "rash", "cough", "headache", "joint pain", "weight loss", "night sweats", "chest pain",
    "back pain", "fatigue", "vomiting", "diarrhea", "dizziness", "leg swelling", "sore throat", "blurred vision",
)
LABS = (
    "high sodium", "low sodium", "high potassium", "low potassium",
    "high glucose", "low platelets", "high calcium", "low iron",
)
CONDITIONS = (
    "asthma", "kidney failure", "liver disease", "heart failure", "gout", "epilepsy", "diabetes", "glaucoma",
)
DOSE_RATES = (2, 3, 4, 5)  # mg per kg

_CONSONANTS = "bdfklmnprstvz"
_VOWELS = "aeiou"
_DISEASE_SUFFIXES = ("osis", "itis", "emia", "oma")
_DRUG_SUFFIXES = ("ex", "ol", "an", "ir", "ide")
_CLASS_SUFFIX = "ates"


@dataclass(frozen=True)
class DrugClass:
    name: str  # plural, e.g. "lomates"
    contraindication: str


@dataclass(frozen=True)
class Drug:
    name: str
    drug_class: str
    dose_per_kg: int


@dataclass(frozen=True)
class Disease:
    name: str
    symptoms: tuple[str, str]
    lab: str
    first_line: str
    second_line: str


@dataclass
class World:
    """The knowledge base. Lookups by name; ``facts()`` states it in plain sentences."""

    seed: int
    diseases: list[Disease]
    drugs: list[Drug]
    classes: list[DrugClass]

    def __post_init__(self):
        self._disease = {d.name: d for d in self.diseases}
        self._drug = {d.name: d for d in self.drugs}
        self._class = {c.name: c for c in self.classes}

    def disease(self, name: str) -> Disease:
        return self._disease[name]

    def drug(self, name: str) -> Drug:
        return self._drug[name]

    def drug_class(self, name: str) -> DrugClass:
        return self._class[name]

    def treatment(self, disease: Disease, condition: str | None) -> Drug:
        """First-line drug unless the patient's condition rules out its class; then second-line."""
        first = self.drug(disease.first_line)
        if condition is not None and self.drug_class(first.drug_class).contraindication == condition:
            return self.drug(disease.second_line)
        return first

    def facts(self) -> list[str]:
        """Every fact of the world as a short sentence (for corpora and inspection)."""
        out = []
        for d in self.diseases:
            out.append(f"{d.name} causes {d.symptoms[0]}, {d.symptoms[1]} and {d.lab}.")
            out.append(f"The first-line drug for {d.name} is {d.first_line}.")
            out.append(f"The second-line drug for {d.name} is {d.second_line}.")
        for c in self.classes:
            out.append(f"{capitalize_first(c.name)} are ruled out by {c.contraindication}.")
        for g in self.drugs:
            out.append(f"{capitalize_first(g.name)} belongs to the {g.drug_class} class.")
            out.append(f"{capitalize_first(g.name)} is dosed at {g.dose_per_kg} mg per kg.")
        return out

    def to_dict(self) -> dict:
        return {"seed": self.seed, "diseases": [dataclasses.asdict(d) for d in self.diseases],
                "drugs": [dataclasses.asdict(d) for d in self.drugs],
                "classes": [dataclasses.asdict(c) for c in self.classes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> World:
        return cls(seed=d["seed"],
                   diseases=[Disease(**(x | {"symptoms": tuple(x["symptoms"])})) for x in d["diseases"]],
                   drugs=[Drug(**x) for x in d["drugs"]], classes=[DrugClass(**x) for x in d["classes"]])


def save_world(world: World, path: str | os.PathLike) -> Path:
    """Write the world as JSON (so later pipeline stages use the same knowledge base)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(world.to_dict(), indent=1))
    return path


def load_world(path: str | os.PathLike) -> World:
    """Read a world written by ``save_world``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such world file")
    try:
        return World.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a synthetic world file ({type(e).__name__}: {e})") from None


def capitalize_first(s: str) -> str:
    """``s`` with its first character upper-cased (the rest kept: "dorex" -> "Dorex")."""
    return s[:1].upper() + s[1:]


def _names(rng: random.Random, n: int, suffixes: Sequence[str], taken: set[str]) -> list[str]:
    """n new short pronounceable names (consonant-vowel-consonant + suffix), none inside another."""
    out = []
    while len(out) < n:
        stem = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        name = stem + rng.choice(suffixes)
        if any(name in t or t in name for t in taken):
            continue
        taken.add(name)
        out.append(name)
    return out


def make_world(seed: int, *, n_diseases: int = 8, n_classes: int = 4, drugs_per_class: int = 2) -> World:
    """Draw a knowledge base from ``seed``.

    Sizes: ``n_diseases`` (<= 960 distinct signatures), ``n_classes`` in [4, 8] (one
    contraindicating condition each), ``drugs_per_class`` >= 1 (4 or more drugs in total).
    """
    if not 4 <= n_classes <= len(CONDITIONS):
        raise ValueError(f"n_classes must be in [4, {len(CONDITIONS)}] (4 options per question), got {n_classes}")
    if drugs_per_class < 1:
        raise ValueError(f"drugs_per_class must be >= 1, got {drugs_per_class}")
    max_diseases = len(SYMPTOMS) * (len(SYMPTOMS) - 1) // 2 * len(LABS)
    if not 2 <= n_diseases <= max_diseases:
        raise ValueError(f"n_diseases must be in [2, {max_diseases}], got {n_diseases}")
    rng = random.Random(f"world:{seed}")
    taken: set[str] = set(" ".join(SYMPTOMS + LABS + CONDITIONS).split())
    class_names = _names(rng, n_classes, (_CLASS_SUFFIX,), taken)
    conditions = rng.sample(CONDITIONS, n_classes)
    classes = [DrugClass(c, k) for c, k in zip(class_names, conditions)]
    drugs = []
    for c in classes:
        for name in _names(rng, drugs_per_class, _DRUG_SUFFIXES, taken):
            drugs.append(Drug(name, c.name, rng.choice(DOSE_RATES)))
    rng.shuffle(drugs)
    signatures: set[tuple[frozenset, str]] = set()
    diseases = []
    for name in _names(rng, n_diseases, _DISEASE_SUFFIXES, taken):
        while True:
            symptoms = tuple(rng.sample(SYMPTOMS, 2))
            lab = rng.choice(LABS)
            if (frozenset(symptoms), lab) not in signatures:
                signatures.add((frozenset(symptoms), lab))
                break
        first = rng.choice(drugs)
        second = rng.choice([d for d in drugs if d.drug_class != first.drug_class])
        diseases.append(Disease(capitalize_first(name), symptoms, lab, first.name, second.name))
    return World(seed=seed, diseases=diseases, drugs=drugs, classes=classes)
