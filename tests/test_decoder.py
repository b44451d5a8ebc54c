"""Decoder parity with HF PyTorch (Llama w/ llama3 RoPE, Qwen2, Qwen3), KV cache, packing, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medkr_jax import parallel
from medkr_jax.models.decoder import (Decoder, DecoderConfig, UnsupportedModelError, init_cache, rope_inv_freq)
from medkr_jax.models.decoder.layers import matmul, query_blocks
from medkr_jax.models.decoder.params import hf_param_mapping
from medkr_jax.models.hf import export_decoder, load_decoder
from tests.helpers_models import (ARCHITECTURE_OF, SLIDING_WINDOW, hf_logits, make_tiny_hf_model,  # noqa: F401
                                  ragged_batch, tiny_decoder_folder, tiny_hf_config)

TOL = 1e-4


_FWD = nnx.jit(lambda m, t, p, a, s: m(t, p, attention_mask=a, segment_ids=s)[0])


def _forward(model, tokens, positions, mask=None, segment_ids=None):
    return np.asarray(_FWD(model, jnp.asarray(tokens), jnp.asarray(positions),
                        None if mask is None else jnp.asarray(mask),
                        None if segment_ids is None else jnp.asarray(segment_ids)))


def test_parity_with_hf_on_ragged_left_padded_batch(tiny_decoder_folder):
    kind, folder, hf_model = tiny_decoder_folder
    model, cfg = load_decoder(folder)
    assert cfg.architecture == ARCHITECTURE_OF[kind]
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.qk_norm == (kind in ("qwen3", "gemma3"))
    if kind == "llama":
        assert cfg.rope_scaling["rope_type"] == "llama3"
    if kind in ("mistral", "gemma3"):  # every layer, or the layers of the config's layer_types, slide
        assert cfg.sliding_window == SLIDING_WINDOW
        assert cfg.sliding_layers == ((True,) * 2 if kind == "mistral" else (True, False, True))
    if kind == "gemma3":
        assert (cfg.local_rope_theta, cfg.rope_theta, cfg.rope_scaling["factor"]) == (1e4, 1e6, 4.0)
        assert (cfg.query_pre_attn_scalar, cfg.final_logit_softcapping, cfg.tie_word_embeddings) == (12, 3.0, True)
    tokens, mask, positions = ragged_batch(cfg.vocab_size, lengths=(13, 8, 3))
    ref = hf_logits(hf_model, tokens, mask, positions)
    ours = _forward(model, tokens, positions, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = np.abs(ours - ref)[mask].max()
    print(f"{kind}: max |logits - transformers| {diff:.2e}")
    assert diff <= TOL, f"{kind}: max |logits diff| {diff:.2e}"
    if cfg.sliding_window:  # the window matters here: attending to every earlier token gives other logits
        full = dataclasses.replace(cfg, sliding_window=None, layer_types=())
        unwindowed = Decoder(full, rngs=nnx.Rngs(0))
        nnx.update(unwindowed, nnx.state(model))
        assert np.abs(_forward(unwindowed, tokens, positions, mask) - ref)[mask].max() > 100 * TOL


def test_llama3_rope_scaling_changes_frequencies():
    cfg = DecoderConfig.from_hf(tiny_hf_config("llama").to_dict() | {"architectures": ["LlamaForCausalLM"]})
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    # High frequencies untouched, the lowest divided by `factor` (8), a smooth band in between.
    assert scaled[0] == plain[0]
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)
    assert np.any((scaled < plain) & (scaled > plain / 8.0))


def test_kv_cache_incremental_decoding_matches_full_forward(tiny_decoder_folder):
    kind, folder, _ = tiny_decoder_folder
    model, cfg = load_decoder(folder)
    tokens, mask, positions = ragged_batch(cfg.vocab_size, lengths=(12, 9, 5), seed=1)
    full = _forward(model, tokens, positions, mask)

    step = nnx.jit(lambda m, t, p, a, c: m(t, p, attention_mask=a, cache=c))
    cache = init_cache(cfg, batch=3, max_len=16)
    prefill = 6  # prompt chunk, then one token at a time
    logits, cache = step(model, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache)
    outs = [np.asarray(logits)]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = step(model, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(np.asarray(logits))
    inc = np.concatenate(outs, axis=1)
    assert int(cache.index) == tokens.shape[1]
    # heads-major, one array per layer
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    assert all(k.shape == (3, cfg.num_kv_heads, cfg.head_dim, 16) for k in cache.k)
    assert all(v.shape == (3, cfg.num_kv_heads, 16, cfg.head_dim) for v in cache.v)
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :tokens.shape[1]], mask)
    assert np.abs(inc - full)[mask].max() <= 1e-5

    # Attending over a leading window of the cache only (kv_len): the prompt within itself, then each
    # step over the first 12 slots. Same logits, same cache.
    windowed = nnx.jit(lambda m, t, p, a, c, n: m(t, p, attention_mask=a, cache=c, kv_len=n), static_argnums=5)
    cache2 = init_cache(cfg, batch=3, max_len=16)
    logits, cache2 = windowed(model, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache2, prefill)
    outs = [np.asarray(logits)]
    for t in range(prefill, tokens.shape[1]):
        logits, cache2 = windowed(model, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache2,
                                  tokens.shape[1])
        outs.append(np.asarray(logits))
    assert np.abs(np.concatenate(outs, axis=1) - inc)[mask].max() <= 1e-5
    real = np.asarray(cache.mask)  # padding slots hold never-attended values that may differ
    for a, b in zip(cache.k, cache2.k):
        np.testing.assert_allclose(np.asarray(a).transpose(0, 3, 1, 2)[real], np.asarray(b).transpose(0, 3, 1, 2)[real],
                                   atol=1e-5)
    for a, b in zip(cache.v, cache2.v):
        np.testing.assert_allclose(np.asarray(a).transpose(0, 2, 1, 3)[real], np.asarray(b).transpose(0, 2, 1, 3)[real],
                                   atol=1e-5)
    with pytest.raises(ValueError, match="kv_len=17"):
        model(tokens[:, :1], positions[:, :1], cache=init_cache(cfg, batch=3, max_len=16), kv_len=17)


def test_segment_ids_packing_equals_separate_forwards():
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, qkv_bias=True, architecture="Qwen2ForCausalLM")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 64, 7), rng.integers(0, 64, 5)
    packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    out = _forward(model, packed, pos, seg > 0, seg)
    # Each sequence alone, right-padded to the same length (so one compiled forward serves all).
    sep = np.zeros((2, 14), np.int32)
    sep[0, :7], sep[1, :5] = a, b
    sep_pos = np.tile(np.arange(14, dtype=np.int32), (2, 1))
    alone = _forward(model, sep, sep_pos, sep_pos < np.array([[7], [5]]), np.ones((2, 14), np.int32))
    np.testing.assert_allclose(out[0, :7], alone[0, :7], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], alone[1, :5], atol=1e-5)
    # Without segment ids the second sequence would see the first: the outputs differ.
    mixed = _forward(model, packed, pos, seg > 0, np.ones_like(seg))
    assert np.abs(mixed[0, 7:12] - alone[1, :5]).max() > 1e-3


@pytest.mark.devices(8)
def test_same_logits_on_one_device_and_on_fsdp_tensor_mesh(tiny_decoder_folder):
    kind, folder, _ = tiny_decoder_folder
    tokens, mask, positions = ragged_batch(96, lengths=(10, 6, 2, 9), seed=2)
    one, _ = load_decoder(folder)
    ref = _forward(one, tokens, positions, mask)

    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model, _ = load_decoder(folder, mesh=mesh)
    q = model.layers[1].attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor") and len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2)
    emb = model.embed.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    batch = parallel.shard_batch({"t": tokens, "p": positions, "m": mask}, mesh)
    with parallel.sharding_context(mesh):
        out = nnx.jit(lambda m, b: m(b["t"], b["p"], attention_mask=b["m"])[0])(model, batch)
    assert len(out.sharding.device_set) == 8
    assert np.abs(np.asarray(out) - ref)[mask].max() <= 1e-5


def test_gradients_match_hf_pytorch(tiny_decoder_folder):
    """d(sum(logits * C)) / d(every parameter) equals PyTorch autograd's on the same HF model and batch (a ragged,
    left-padded batch; scored rows only): the backward pass, custom gradients included (layers.matmul), is
    checked against the reference, not only the forward."""
    import torch

    kind, folder, hf_model = tiny_decoder_folder
    model, cfg = load_decoder(folder)
    tokens, mask, positions = ragged_batch(cfg.vocab_size, lengths=(21, 17, 9))
    cot = np.random.default_rng(1).standard_normal((*tokens.shape, cfg.vocab_size)).astype(np.float32)
    cot *= mask[..., None]  # padding rows carry no gradient (their logits differ between the two by design)

    def loss(m):
        logits = m(jnp.asarray(tokens), jnp.asarray(positions), attention_mask=jnp.asarray(mask))[0]
        return jnp.sum(logits * cot)

    grads = {".".join(map(str, path)): np.asarray(v[...])
             for path, v in nnx.to_flat_state(nnx.state(nnx.jit(nnx.grad(loss))(model), nnx.Param))}
    hf_model.zero_grad()
    logits = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(positions.astype(np.int64))).logits
    (logits * torch.from_numpy(cot)).sum().backward()
    theirs = dict(hf_model.named_parameters())
    mapping = hf_param_mapping(cfg)
    assert set(grads) == set(mapping), set(grads) ^ set(mapping)
    for name, (hf_name, transpose) in mapping.items():
        ref = theirs[hf_name].grad.numpy()
        ref = ref.T if transpose else ref
        err = np.abs(grads[name] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"{kind} {name}: max |grad - transformers| / max |grad| = {err:.2e}"


@pytest.mark.parametrize("shape_a,shape_b", [((48, 96), (96, 64)), ((48, 64), (64, 96)),
                                             ((2, 3, 40, 24), (2, 3, 24, 16))])
def test_matmul_gradients_and_their_compiled_form(shape_a, shape_b):
    """layers.matmul: value and both gradients equal the float64 products; on CPU, where the right operand is
    [K, N] with K > N, its gradient is compiled out-major, [N, K] then transposed (the faster GEMM there), else as
    a^T dY directly, [K, N]."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(shape_a).astype(np.float32), rng.standard_normal(shape_b).astype(np.float32)
    dy = rng.standard_normal((*shape_a[:-1], shape_b[-1])).astype(np.float32)

    def f(a, b):
        return jnp.sum(matmul(a, b) * dy)

    value, (da, db) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(a, b)
    a64, b64, dy64 = (x.astype(np.float64) for x in (a, b, dy))
    np.testing.assert_allclose(float(value), float(np.sum((a64 @ b64) * dy64)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(da), dy64 @ np.swapaxes(b64, -1, -2), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(db), np.swapaxes(a64, -1, -2) @ dy64, rtol=1e-5, atol=1e-4)
    if jax.default_backend() != "cpu":
        return  # the compiled form is the CPU's (elsewhere XLA picks the GEMM's layouts itself)
    hlo = jax.jit(jax.grad(f, argnums=1)).lower(a, b).compile().as_text()
    *batch, k, n = shape_b
    dot_outputs = {line.split(" = ")[1].split("{")[0] for line in hlo.splitlines() if " dot(" in line}
    out_major, in_major = (f"f32[{','.join(map(str, (*batch, *dims)))}]" for dims in ((n, k), (k, n)))
    assert dot_outputs == ({out_major} if k > n else {in_major}), dot_outputs


def test_remat_gives_same_loss_and_gradients():
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        num_kv_heads=4, head_dim=8, qk_norm=True, tie_word_embeddings=True,
                        architecture="Qwen3ForCausalLM")
    tokens = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)
    pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))

    def loss(m):
        logits, _ = m(tokens[:, :-1], pos[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    grads = []
    for remat in (False, True):
        model = Decoder(cfg, remat=remat, rngs=nnx.Rngs(0))
        value, g = nnx.jit(nnx.value_and_grad(loss))(model)
        grads.append((float(value), jax.tree.map(np.asarray, nnx.state(g))))
    for value, g in grads[1:]:
        assert abs(value - grads[0][0]) < 1e-6
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g, grads[0][1])
    Decoder(cfg, remat="dots_with_no_batch_dims_saveable", rngs=nnx.Rngs(0))  # a named policy is accepted
    with pytest.raises(ValueError, match="remat"):
        Decoder(cfg, remat="no_such_policy", rngs=nnx.Rngs(0))


def test_bf16_compute_is_close_to_fp32(tmp_path):
    folder = tmp_path / "qwen3"
    make_tiny_hf_model("qwen3", folder)
    tokens, mask, positions = ragged_batch(96, lengths=(9, 4))
    f32, _ = load_decoder(folder)
    bf16, _ = load_decoder(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    a, b = _forward(f32, tokens, positions, mask), _forward(bf16, tokens, positions, mask)
    assert b.dtype == np.float32
    assert np.abs(a - b)[mask].max() < 0.1 * np.abs(a).max()


def test_config_round_trip_and_errors():
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, rope_theta=5e5,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        eos_token_ids=(2, 3), architecture="LlamaForCausalLM")
    assert DecoderConfig.from_hf(cfg.to_hf()) == cfg
    hash(cfg)  # usable as a static jit argument
    # Old-style config.json keys (rope_theta / rope_scaling with "type") read the same.
    old = cfg.to_hf()
    del old["rope_parameters"]
    assert DecoderConfig.from_hf(old) == cfg
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        DecoderConfig.from_hf(dict(cfg.to_hf(), architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        DecoderConfig.from_hf(dict(cfg.to_hf(), rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers"):
        DecoderConfig.from_hf({k: v for k, v in cfg.to_hf().items() if k != "num_hidden_layers"})


def test_gemma3_and_mistral_config_round_trip_old_layout_and_errors():
    gemma = DecoderConfig.from_hf(tiny_hf_config("gemma3", num_hidden_layers=7).to_dict()
                                  | {"architectures": ["Gemma3ForCausalLM"]})
    assert DecoderConfig.from_hf(gemma.to_hf()) == gemma
    hash(gemma)
    # The layout of the released Gemma 3 / MedGemma config.json files: rope_theta + rope_local_base_freq +
    # rope_scaling and a sliding_window_pattern instead of layer_types (every 6th layer global).
    old = {k: v for k, v in gemma.to_hf().items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_local_base_freq": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0},
            "sliding_window_pattern": 6}
    again = DecoderConfig.from_hf(old)
    assert again.sliding_layers == (True,) * 5 + (False, True)
    assert dataclasses.replace(again, layer_types=gemma.layer_types) == gemma
    # a multimodal checkpoint's config gives its text decoder
    mm = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "tie_word_embeddings": True,
          "text_config": {k: v for k, v in gemma.to_hf().items() if k != "architectures"}}
    assert DecoderConfig.from_hf(mm) == gemma
    mistral = DecoderConfig.from_hf(tiny_hf_config("mistral").to_dict() | {"architectures": ["MistralForCausalLM"]})
    assert mistral.sliding_layers == (True, True) and DecoderConfig.from_hf(mistral.to_hf()) == mistral
    no_window = DecoderConfig.from_hf(dict(mistral.to_hf(), sliding_window=None))
    assert no_window.sliding_layers == (False, False)
    for bad, needle in [({"hidden_activation": "gelu"}, r"hidden_activation='gelu'.*gelu_pytorch_tanh"),
                        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
                        ({"layer_types": ["full_attention"] * 6 + ["chunked_attention"]}, "chunked_attention"),
                        ({"layer_types": ["full_attention"] * 3}, "layer_types lists 3 layers"),
                        ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
                         r"sliding_attention.*'linear'")]:
        with pytest.raises(UnsupportedModelError, match=needle):
            DecoderConfig.from_hf(dict(gemma.to_hf(), **bad))
    with pytest.raises(UnsupportedModelError, match="'text_config'"):
        DecoderConfig.from_hf({"architectures": ["Gemma3ForConditionalGeneration"]})


def test_attention_logit_softcapping_matches_numpy():
    """c * tanh(s / c) on the scaled scores before the mask (Gemma 2's formula), against NumPy."""
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, qk_norm=True, query_pre_attn_scalar=6.0,
                        attn_logit_softcapping=0.7, architecture="Gemma3ForCausalLM")
    attn = Decoder(cfg, rngs=nnx.Rngs(0)).layers[0].attn
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, 8, 5)).astype(np.float32), rng.normal(size=(2, 2, 5, 8)).astype(np.float32)
    allowed = np.tril(np.ones((5, 5), bool))[None].repeat(2, 0)
    got = np.asarray(attn.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)))
    kk = np.repeat(k, 2, axis=1)  # [B, H, D, S]: query head h uses kv head h // 2
    scores = np.einsum("bthd,bhds->bhts", q.astype(np.float64), kk) / np.sqrt(6.0)
    scores = np.where(allowed[:, None], 0.7 * np.tanh(scores / 0.7), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bthd", probs, np.repeat(v, 2, axis=1)).reshape(2, 5, 32)
    ref = out @ np.asarray(attn.o_proj.kernel[...], np.float64)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    uncapped = dataclasses.replace(cfg, attn_logit_softcapping=None)
    plain = Decoder(uncapped, rngs=nnx.Rngs(0)).layers[0].attn
    assert np.abs(np.asarray(plain.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          jnp.asarray(allowed))) - got).max() > 1e-2


@pytest.mark.parametrize("t", [130, 1030])
def test_causal_query_blocks_equal_one_pass_over_the_whole_score_matrix(t):
    """attend(causal=True) runs query_blocks(t) > 1 blocks of queries (uneven at 1,030), each over the keys up to
    its last query: the same outputs and gradients as one pass over the whole masked score matrix, with packed
    segments and left padding in the mask (a padding query row, with no allowed key, is not compared)."""
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, architecture="LlamaForCausalLM")
    attn = Decoder(cfg, rngs=nnx.Rngs(0)).layers[0].attn
    assert query_blocks(t) == (2 if t < 512 else 4)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, 8, t)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 2, t, 8)), jnp.float32)
    segments = np.stack([1 + (np.arange(t) >= t // 3), np.ones(t, int)])  # row 0: two packed sequences
    real = np.stack([np.ones(t, bool), np.arange(t) >= 5])  # row 1: five padding slots first
    allowed = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & real[:, None, :]
                          & (segments[:, :, None] == segments[:, None, :]))
    cotangent = jnp.asarray(rng.normal(size=(2, t, 32)) * real[..., None], jnp.float32)

    def run(causal):
        def loss(q, k, v):
            out = attn.attend(q, k, v, allowed, causal=causal)
            return jnp.sum(out * cotangent), out
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (grads, blocked), (ref_grads, whole) = run(True), run(False)
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(whole)[real], rtol=1e-5, atol=1e-6)
    for name, got, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_params_carry_logical_axes_without_a_mesh(scan_layers):
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, architecture="LlamaForCausalLM")
    model = Decoder(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    layer, pre = (specs["layers"], ("layers",)) if scan_layers else (specs["layers"][1], ())
    assert layer["attn"]["q_proj"]["kernel"].get_value() == P(*pre, "embed", "heads")
    assert layer["attn"]["k_proj"]["kernel"].get_value() == P(*pre, "embed", "kv_heads")
    assert layer["mlp"]["down_proj"]["kernel"].get_value() == P(*pre, "mlp", "embed")
    assert layer["attn_norm"]["scale"].get_value() == P(*pre, "norm")
    assert specs["embed"]["embedding"].get_value() == P("vocab", "embed")
    assert specs["lm_head"]["kernel"].get_value() == P("embed", "vocab")
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])  # Gemma 3: the layer kind (sliding or not) is scanned data
def test_scanned_layers_give_the_same_logits_and_cache(tmp_path, kind):
    folder = tmp_path / kind
    make_tiny_hf_model(kind, folder)
    tokens, mask, positions = ragged_batch(96, lengths=(7, 4), seed=4)
    plain, cfg = load_decoder(folder)
    scanned, _ = load_decoder(folder, scan_layers=True, remat=True)
    assert scanned.layers.attn.q_proj.kernel[...].shape[0] == cfg.num_layers
    np.testing.assert_allclose(_forward(scanned, tokens, positions, mask)[mask],
                               _forward(plain, tokens, positions, mask)[mask], atol=1e-5)
    step = nnx.jit(lambda m, c, t, p, a: m(t, p, attention_mask=a, cache=c))

    def decode(model, cache):
        """The ragged batch as a prefill of all but the last token, then that token on its own."""
        logits, cache = step(model, cache, tokens[:, :-1], positions[:, :-1], mask[:, :-1])
        last, cache = step(model, cache, tokens[:, -1:], positions[:, -1:], mask[:, -1:])
        stack = lambda x: np.asarray(x) if cache.stacked else np.stack(x)  # noqa: E731
        return np.concatenate([logits, last], axis=1), stack(cache.k), stack(cache.v)

    assert plain.init_cache(2, 8).stacked is False and scanned.init_cache(2, 8).stacked is True
    ref = decode(plain, plain.init_cache(2, 8))
    assert ref[1].shape == (cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, 8)
    np.testing.assert_allclose(ref[0][mask], _forward(plain, tokens, positions, mask)[mask], atol=1e-5)
    # each layer layout with each cache layout (native or converted) gives the same logits and cache
    for model, stacked in [(scanned, True), (scanned, False), (plain, True)]:
        out = decode(model, init_cache(cfg, 2, 8, stacked=stacked))
        np.testing.assert_allclose(out[0][mask], ref[0][mask], atol=1e-5)
        np.testing.assert_allclose(out[1], ref[1], atol=1e-5)
        np.testing.assert_allclose(out[2], ref[2], atol=1e-5)
    # the stacked layout exports to the same per-layer HF tensors
    export_decoder(scanned, cfg, tmp_path / "hf")
    again, _ = load_decoder(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), nnx.state(plain, nnx.Param))


def test_both_layer_layouts_start_from_the_same_weights():
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, qkv_bias=True, architecture="Qwen2ForCausalLM")
    plain = Decoder(cfg, rngs=nnx.Rngs(7))
    scanned = Decoder(cfg, scan_layers=True, rngs=nnx.Rngs(7))
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(plain.layers[i].mlp.gate_proj.kernel[...],
                                      scanned.layers.mlp.gate_proj.kernel[...][i])
    np.testing.assert_array_equal(plain.embed.embedding[...], scanned.embed.embedding[...])
    assert not np.array_equal(plain.layers[0].attn.q_proj.kernel[...], plain.layers[1].attn.q_proj.kernel[...])


def test_compiled_training_step_computes_rope_tables_once(tmp_path):
    """The forward + backward of a 2-layer Llama computes RoPE's cosines in one place, not inside each layer's q and
    k rotations (on CPU XLA recomputed full-width tables in every rotation fusion, once per head: rope_tables)."""
    make_tiny_hf_model("llama", tmp_path, seed=4)
    model, _ = load_decoder(tmp_path)
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(st):
        return nnx.merge(graphdef, st)(tokens, positions)[0].sum()

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    assert sum("cosine(" in block for block in hlo.split("\n\n")) == 1
