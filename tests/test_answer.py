"""Answer extraction on a table of realistic model outputs, including ambiguous ones (-> None)."""

import pytest

from medkr_jax.data.answer import extract_answer, split_think

OPTS4 = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin"]
OPTS5 = ["Aortic stenosis", "Mitral regurgitation", "Hypertrophic cardiomyopathy", "Pericarditis",
         "Aortic dissection"]
YNM = ["yes", "no", "maybe"]
DRUGS = ["Aspirin", "Aspirin and clopidogrel", "Warfarin", "Heparin"]

# (output, options, expected index or None)
TABLE = [
    # explicit answer phrases
    ("Let's think step by step. The patient has T2DM with normal renal function. The answer is (A).", OPTS4, 0),
    ("...so first-line therapy is metformin. The answer is A", OPTS4, 0),
    ("The answer is: C", OPTS4, 2),
    ("**Answer:** B", OPTS4, 1),
    ("Answer: D. Sitagliptin", OPTS4, 3),
    ("Final answer: (C) Glipizide", OPTS4, 2),
    ("Therefore, the correct answer is option D.", OPTS4, 3),
    ("The correct option is B) Insulin glargine, given the HbA1c of 11%.", OPTS4, 1),
    ("Based on the murmur, the best answer would be E.", OPTS5, 4),
    ("the answer is c", OPTS4, 2),
    ("Answer - B", OPTS4, 1),
    ("The answer is [A].", OPTS4, 0),
    ("The answer is Metformin.", OPTS4, 0),
    ("Answer: Hypertrophic cardiomyopathy", OPTS5, 2),
    ("The answer is yes.", YNM, 0),
    ("Considering the trial's null result, the answer is no.", YNM, 1),
    # revised answers: the last committed statement wins
    ("The answer is B. Wait, the creatinine is 2.8, so metformin is contraindicated... The answer is (D).", OPTS4, 3),
    ("Initially I thought A. However, on reflection the answer is C.", OPTS4, 2),
    # boxed
    ("Thus the diagnosis is HCM.\n\n\\boxed{C}", OPTS5, 2),
    ("$\\boxed{\\text{B}}$", OPTS4, 1),
    ("So we get \\boxed{D. Sitagliptin}", OPTS4, 3),
    ("\\boxed{(A)}", OPTS4, 0),
    ("\\boxed{Aortic dissection}", OPTS5, 4),
    # think blocks
    ("<think>\nHmm, maybe A? No: renal failure. It is D.\n</think>\n\nThe answer is D.", OPTS4, 3),
    ("<think>The answer is A... wait, no.</think>\nAfter review, the answer is (B).", OPTS4, 1),
    ("<think>Weighing options... the murmur increases with Valsalva, so the answer is C.</think>", OPTS5, 2),
    ("<think>Long reasoning that was cut off before it finished because of the token lim", OPTS4, None),
    # option lines at the end
    ("Step 1: HbA1c is 7.2%.\nStep 2: no contraindications.\n\nA. Metformin", OPTS4, 0),
    ("Reasoning as above.\n\n(C)", OPTS4, 2),
    ("Given all of this:\nB) Insulin glargine", OPTS4, 1),
    ("Hence:\nD", OPTS4, 3),
    # option text alone
    ("Sitagliptin", OPTS4, 3),
    ("Mitral regurgitation.", OPTS5, 1),
    ("The most appropriate next step is to start aspirin and clopidogrel.", DRUGS, 1),
    ("Overall, the data support the hypothesis.\nYes", YNM, 0),
    # last letter mentioned
    ("Option A is unsafe with eGFR < 30, option B causes hypoglycemia, so I'd go with option (D) here.", OPTS4, 3),
    ("Among these, (B) fits best with the hypoglycaemia risk profile.", OPTS4, 1),
    # ambiguous or missing -> None
    ("The answer is A or C, depending on renal function.", OPTS4, None),
    ("The answer is either B or D.", OPTS4, None),
    ("Both A and C could be correct here.", OPTS4, None),
    ("\\boxed{A, C}", OPTS4, None),
    ("Final answer: B and D", OPTS4, None),
    ("I cannot determine the answer from the information given.", OPTS4, None),
    ("The answer is F.", OPTS4, None),
    ("", OPTS4, None),
    ("The patient should be referred to endocrinology for further workup.", OPTS4, None),
    ("A. Metformin\nB. Insulin glargine\nC. Glipizide\nD. Sitagliptin", OPTS4, None),
    ("Either metformin or glipizide would be reasonable.", OPTS4, None),
    # pitfalls: articles, pronouns, medical letter names
    ("A 54-year-old man presents with polyuria. The answer is C.", OPTS4, 2),
    ("Vitamin A deficiency is unlikely here; I would choose glipizide.\nGlipizide", OPTS4, 2),
    ("The answer is a sulfonylurea, which is glipizide.", OPTS4, 2),  # "a" is not option A
    ("I think the answer is (B) Insulin glargine, not (A).", OPTS4, 1),
    ("Answer: A\n\nExplanation: option C is wrong because glipizide causes hypoglycaemia.", OPTS4, 0),
    ("Answer: I", [f"opt{i}" for i in range(10)], 8),
    ("To answer this, we first note hepatitis B serology... Answer: A", OPTS4, 0),
]


def test_table_is_big_enough():
    assert len(TABLE) >= 40
    assert sum(e is None for _, _, e in TABLE) >= 8


@pytest.mark.parametrize("text,options,expected", TABLE, ids=[f"row{i}" for i in range(len(TABLE))])
def test_extract_table(text, options, expected):
    assert extract_answer(text, options) == expected


def test_split_think():
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("<think>cut") == ("cut", "")
    assert split_think("plain") == ("", "plain")
