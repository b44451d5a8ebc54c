"""A controlled synthetic medical-QA world where "reasoning or knowledge?" is known by construction.

``make_world`` draws a small knowledge base from a seed: invented diseases (each with two symptoms
and a lab pattern, a unique signature), drug classes (each ruled out by one condition), drugs
(class + dose in mg per kg) and, per disease, a first- and a second-line drug. ``make_questions``
turns it into 4-option ``MCQRecord``s:

* knowledge questions look up one fact ("Which class does dorex belong to?"), in several phrasings,
  sometimes wrapped in irrelevant patient details;
* reasoning questions need several steps: symptoms + lab -> diagnosis -> first-line drug ->
  contraindication check -> drug, or diagnosis -> drug -> dose per kg x weight.

Every record carries its label, a short gold ``trace`` ending "The answer is X.", and three
misleading ``adversarial_traces`` (one per wrong option). Vocabulary and lengths are kept small so
a tiny policy with a small BPE tokenizer can learn the world on a CPU in minutes.

Layout: ``world`` (the knowledge base and its facts), ``questions`` (question, gold-trace and
adversarial-trace builders), ``tokenizer_corpus`` (all text, for the tokenizer).
"""

from medkr_jax.data.synthetic.questions import (BENCHMARK, KNOWLEDGE_KINDS, REASONING_KINDS, WEIGHTS,
                                                backtracking_trace, make_questions, make_splits)
from medkr_jax.data.synthetic.tokenizer_corpus import corpus
from medkr_jax.data.synthetic.world import (CONDITIONS, DOSE_RATES, LABS, SYMPTOMS, Disease, Drug, DrugClass, World,
                                            load_world, make_world, save_world)

__all__ = [
    "BENCHMARK", "CONDITIONS", "DOSE_RATES", "KNOWLEDGE_KINDS", "LABS", "REASONING_KINDS", "SYMPTOMS", "WEIGHTS",
    "Disease", "Drug", "DrugClass", "World", "backtracking_trace", "corpus", "load_world", "make_questions",
    "make_splits", "make_world", "save_world",
]
