"""Canonical record: validation, JSONL/Parquet round trips, duplicate hashing."""

import hashlib
import json

import pytest

from medkr_jax.data.answer import LETTERS
from medkr_jax.data.text import normalize_text
from medkr_jax.data.records import MCQRecord, RecordError, question_hash, read_records, text_hash, write_records


def _rec(**kw) -> MCQRecord:
    base = dict(id="q1", benchmark="demo", question="Which organ makes insulin?",
                options=["Liver", "Pancreas", "Spleen", "Kidney"], answer=1)
    return MCQRecord(**(base | kw))


def _full_records() -> list[MCQRecord]:
    return [
        _rec(),
        _rec(id="q2", context="Passage one.\nPassage two.", label="reasoning", meta={"subject": "x", "n": [1, 2]},
             trace="Insulin comes from beta cells. The answer is B.", adversarial_traces=["Wrong. The answer is A.", "No. The answer is C."],
             reasoning_prob=0.75, is_reasoning=True),
        _rec(id="q3", options=["yes", "no", "maybe"], answer=2, label="knowledge", reasoning_prob=0.0, is_reasoning=False),
    ]


def test_answer_letter_and_text():
    r = _rec(answer=3)
    assert r.answer_letter == "D" and r.answer_text == "Kidney" and r.letters == "ABCD"
    assert LETTERS[:10] == "ABCDEFGHIJ"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    recs = _full_records()
    path = write_records(tmp_path / f"sub/recs{suffix}", recs)
    back = read_records(path)
    assert back == recs
    assert not list(tmp_path.glob("sub/*.tmp"))  # atomic write leaves no temp file


def test_jsonl_is_one_object_per_line(tmp_path):
    path = write_records(tmp_path / "r.jsonl", _full_records())
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[1])["adversarial_traces"][1] == "No. The answer is C."


@pytest.mark.parametrize(
    "kw, field, needle",
    [
        (dict(options=["only one"], answer=0), "options", "at least 2 options"),
        (dict(options=[]), "options", "at least 2 options"),
        (dict(answer=4), "answer", "out of range"),
        (dict(answer=-1), "answer", "out of range"),
        (dict(answer=True), "answer", "integer"),
        (dict(question="   "), "question", "non-empty"),
        (dict(label="Reasoning"), "label", "reasoning"),
        (dict(options=["a", ""], answer=0), "options", "option B"),
        (dict(reasoning_prob=1.5), "reasoning_prob", "[0, 1]"),
        (dict(is_reasoning="yes"), "is_reasoning", "bool"),
        (dict(id=""), "id", "non-empty"),
        (dict(adversarial_traces=["ok", 3]), "adversarial_traces", "strings"),
    ],
)
def test_validation_errors_name_field(kw, field, needle):
    with pytest.raises(RecordError) as e:
        _rec(**kw).validate(source="f.jsonl", where="line 7")
    msg = str(e.value)
    assert msg.startswith("f.jsonl, line 7, field")
    assert f"field {field!r}" in msg and needle in msg
    assert e.value.field == field and e.value.where == "line 7"


def test_write_refuses_invalid(tmp_path):
    with pytest.raises(RecordError, match="'answer'"):
        write_records(tmp_path / "r.jsonl", [_rec(), _rec(id="bad", answer=9)])
    assert not (tmp_path / "r.jsonl").exists()


def test_read_errors_name_file_and_line(tmp_path):
    good = json.dumps(_rec().to_dict())
    p = tmp_path / "recs.jsonl"
    p.write_text(good + "\n\n" + good[:-5] + "\n")
    with pytest.raises(RecordError, match=r"recs\.jsonl, line 3: invalid JSON"):
        read_records(p)

    p.write_text(good + "\n" + json.dumps(_rec().to_dict() | {"colour": "red"}) + "\n")
    with pytest.raises(RecordError, match=r"recs\.jsonl, line 2, field 'colour': unknown field"):
        read_records(p)

    d = _rec().to_dict()
    del d["options"]
    p.write_text(json.dumps(d) + "\n")
    with pytest.raises(RecordError, match=r"recs\.jsonl, line 1, field 'options': required field is missing"):
        read_records(p)

    p.write_text("\n  \n")
    with pytest.raises(RecordError, match=r"recs\.jsonl: file is empty"):
        read_records(p)

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="extension"):
        read_records(tmp_path / "recs.csv")


def test_parquet_read_error_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_rec().to_dict() | {"meta": "{}"}, _rec(id="q2").to_dict() | {"meta": "{}", "answer": 7}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(RecordError, match=r"r\.parquet, row 2, field 'answer'"):
        read_records(tmp_path / "r.parquet")


def test_normalised_hash_is_stable_and_insensitive():
    a = "Which  organ makes INSULIN?"
    b = "which organ, makes insulin"
    assert normalize_text(a) == normalize_text(b) == "which organ makes insulin"
    assert text_hash(a) == text_hash(b)
    # SHA-1 of the normalised text: the same in every process (no Python hash randomisation).
    assert text_hash(a) == hashlib.sha1(b"which organ makes insulin").hexdigest()[:16]
    assert text_hash("Which organ makes glucagon?") != text_hash(a)


def test_question_hash_uses_option_set():
    r = _rec()
    shuffled = _rec(id="other", options=["Kidney", "Spleen", "Pancreas", "Liver"], answer=2)
    different = _rec(id="x", options=["Liver", "Pancreas", "Spleen", "Heart"])
    assert question_hash(r) == question_hash(shuffled)
    assert question_hash(r) != question_hash(different)
    assert question_hash(r, with_options=False) == question_hash(different, with_options=False)


def test_duplicate_option_texts_are_rejected_at_read_time(tmp_path):
    # [Liver, Liver, Kidney, Spleen] answer 1: "The answer is Liver." would be scored as option A, i.e. wrong.
    p = tmp_path / "dup.jsonl"
    p.write_text(json.dumps(_rec(id="q9", options=["Liver", " Liver.", "Kidney", "Spleen"], answer=1).to_dict()) + "\n")
    with pytest.raises(RecordError) as e:
        read_records(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}, line 1, field 'options'")
    assert "options A and B of record 'q9'" in msg and "'Liver'" in msg
    # distinct (both in MMLU): letter case (genotypes, high_school_biology) and symbols (nutrition)
    _rec(options=["BB BB", "BB Bb", "Bb Bb"], answer=1).validate()
    _rec(options=["BMI > 25 kg/m2", "BMI = 25 kg/m2"], answer=1).validate()
    _rec(options=["α-blocker", "β-blocker"], answer=0).validate()
    _rec(options=["+", "-", "+/-"], answer=0).validate()


def test_extractor_tells_non_ascii_options_apart():
    from medkr_jax.data.answer import extract_answer

    assert extract_answer("The answer is β-blocker.", ["α-blocker", "β-blocker"]) == 1


@pytest.mark.parametrize("text, expected", [
    ("The answer is BB Bb.", 1), ("The answer is BB BB.", 0), ("BB Bb", 1), ("\\boxed{BB Bb}", 1),
    ("I pick BB Bb", 1), ("The answer is bb bb.", None),
])
def test_extractor_breaks_case_only_ties_by_case(text, expected):
    from medkr_jax.data.answer import extract_answer

    assert extract_answer(text, ["BB BB", "BB Bb", "bb bb x"]) == expected


def test_extractor_breaks_symbol_only_ties_exactly():
    from medkr_jax.data.answer import extract_answer

    options = ["BMI > 25 kg/m2", "BMI = 25 kg/m2", "BMI < 18"]
    assert extract_answer("The answer is BMI = 25 kg/m2.", options) == 1
    assert extract_answer("Final answer: BMI > 25 kg/m2", options) == 0
    assert extract_answer("So: BMI = 25 kg/m2", options) == 1
