"""Writes the Parquet fixtures of the released BioMed-R1-Eval hub layout (run once; output committed).

Layout as published: ``<config>/test-00000-of-00001.parquet`` with columns
id, question, answer, options (a JSON *string* letter->text), answer_idx, dataset_name,
adversarial_trace_0..2, reasoning_prob (float64), is_reasoning (bool), reasoning_threshold (float64).
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("options", pa.string()),
    ("answer_idx", pa.string()), ("dataset_name", pa.string()), ("adversarial_trace_0", pa.string()),
    ("adversarial_trace_1", pa.string()), ("adversarial_trace_2", pa.string()), ("reasoning_prob", pa.float64()),
    ("is_reasoning", pa.bool_()), ("reasoning_threshold", pa.float64()),
])


def row(id_, question, options, answer_idx, dataset, traces, prob, threshold=0.5):
    return {
        "id": id_, "question": question, "answer": options[answer_idx],
        "options": json.dumps(options), "answer_idx": answer_idx, "dataset_name": dataset,
        "adversarial_trace_0": traces[0], "adversarial_trace_1": traces[1], "adversarial_trace_2": traces[2],
        "reasoning_prob": prob, "is_reasoning": prob >= threshold, "reasoning_threshold": threshold,
    }


MEDQA = [
    row("medqa-0", "A 23-year-old woman who is 12 weeks pregnant has burning on urination and frequency. "
        "Which of the following is the most appropriate treatment?",
        {"A": "Ciprofloxacin", "B": "Doxycycline", "C": "Nitrofurantoin", "D": "No treatment"}, "C", "medqa",
        ["Fluoroquinolones cover the usual organisms best. The answer is A.",
         "Doxycycline is well tolerated in early pregnancy. The answer is B.",
         "Symptoms in pregnancy often resolve alone. The answer is D."], 0.83),
    row("medqa-1", "Which enzyme is deficient in classic phenylketonuria?",
        {"A": "Tyrosinase", "B": "Phenylalanine hydroxylase", "C": "Homogentisate oxidase", "D": "Fumarylacetoacetase"},
        "B", "medqa",
        ["Phenylketonuria is a defect of melanin synthesis. The answer is A.",
         "Alkaptonuria and phenylketonuria share a defect. The answer is C.",
         "Tyrosine breakdown fails at its last step. The answer is D."], 0.07),
    row("medqa-2", "A 60-year-old man has crushing chest pain for 30 minutes with ST elevation in leads II, III and aVF. "
        "Which artery is most likely occluded?",
        {"A": "Left anterior descending artery", "B": "Left circumflex artery", "C": "Left main coronary artery",
         "D": "Right coronary artery"}, "D", "medqa",
        ["ST elevation means the anterior wall, supplied by the LAD. The answer is A.",
         "Inferior leads reflect the lateral wall. The answer is B.",
         "Extensive pain means left main disease. The answer is C."], 0.71),
    row("medqa-3", "Which vitamin deficiency causes scurvy?",
        {"A": "Vitamin C", "B": "Vitamin D", "C": "Vitamin B1", "D": "Vitamin K"}, "A", "medqa",
        ["Bleeding gums point to vitamin K. The answer is D.",
         "Bone pain points to vitamin D. The answer is B.",
         "Neuropathy points to thiamine. The answer is C."], 0.02),
]

PUBMEDQA = [
    row("pubmedqa-21645374", "Does daily aspirin reduce the recurrence of colorectal adenomas?",
        {"A": "yes", "B": "no", "C": "maybe"}, "A", "pubmedqa",
        ["The effect was small and not significant. The answer is B.",
         "The data are inconclusive. The answer is C.",
         "Aspirin has no effect on the colon. The answer is B."], 0.44),
    row("pubmedqa-16418930", "Is vitamin E supplementation protective against prostate cancer?",
        {"A": "yes", "B": "no", "C": "maybe"}, "B", "pubmedqa",
        ["Observational studies showed protection. The answer is A.",
         "Antioxidants protect against cancer. The answer is A.",
         "The evidence is mixed. The answer is C."], 0.61),
    row("pubmedqa-19504049", "Does early mobilisation shorten hospital stay after hip fracture surgery?",
        {"A": "yes", "B": "no", "C": "maybe"}, "C", "pubmedqa",
        ["Stay was two days shorter. The answer is A.",
         "Frailty explains everything. The answer is B.",
         "Mobilisation lengthens stay. The answer is B."], 0.52),
]


def main() -> None:
    here = Path(__file__).parent / "biomed_r1_eval"
    for config, rows in (("medqa", MEDQA), ("pubmedqa", PUBMEDQA)):
        out = here / config / "test-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out)


if __name__ == "__main__":
    main()
