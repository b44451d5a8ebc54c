"""The generation engine (continuous batching) and the static-batch sampler: greedy parity with HF generate
and with each other, log-probs vs a teacher-forced forward pass, sampling distribution (chi-square), top-p
nucleus, per-row stops and limits, outputs independent of slot and order, n samples, compile counts, sharding."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from medkr_jax import parallel, xla_options
from medkr_jax.models.hf import load_decoder
from medkr_jax.sampling import Sampler, StaticSampler, ThinkingBudget
from tests.helpers_models import make_tiny_hf_model

PAD, EOS = 0, 2
BUCKETS = dict(prompt_buckets=(16, 32), gen_buckets=(16, 32))


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral", "gemma3"])  # the last two slide
def tiny(request, tmp_path_factory):
    """(torch model, our model, our config) for a tiny random checkpoint."""
    folder = tmp_path_factory.mktemp(f"sampler_{request.param}")
    torch_model = make_tiny_hf_model(request.param, folder, seed=1)
    model, cfg = load_decoder(folder)
    return torch_model, model, cfg, folder


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampler_qwen3_single")
    torch_model = make_tiny_hf_model("qwen3", folder, seed=2)
    model, cfg = load_decoder(folder)
    return torch_model, model, cfg, folder


def ragged_prompts(lengths=(13, 5, 2, 20, 9), seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def hf_greedy(torch_model, prompts, max_new):
    """HF generate(do_sample=False) on the whole left-padded batch."""
    t = max(map(len, prompts))
    ids = torch.full((len(prompts), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                   eos_token_id=EOS, pad_token_id=PAD)
    return out[:, t:].numpy()


def teacher_forced_logprobs(torch_model, prompt, generated):
    """log_softmax of the HF model's logits for each generated token, one unpadded forward pass."""
    seq = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        logits = torch_model(input_ids=seq).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(generated) - 1)
    return lp[pos, torch.tensor(generated)].numpy(), logits[pos].numpy()


def first_token_probs(torch_model, prompt, temperature=1.0):
    with torch.no_grad():
        logits = torch_model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1).numpy()


def test_greedy_parity_with_hf_generate(tiny):
    """The engine with fewer slots than rows (rows stop at different steps and their slots are refilled, decode
    chunks of 3 steps) and a max_new_tokens per row: token for token HF generate's and the static sampler's."""
    torch_model, model, cfg, _ = tiny
    prompts = ragged_prompts()
    ref = hf_greedy(torch_model, prompts, max_new=14)
    static = StaticSampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS).generate(model, prompts, max_new_tokens=14)
    limits = [14, 6, 14, 9, 14]
    engine = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), chunk_steps=3, min_refill=1, **BUCKETS)
    out = engine.generate(model, prompts, max_new_tokens=limits, batch_size=2)
    assert out.tokens.shape == static.tokens.shape == (len(prompts), 14)
    for i in range(len(prompts)):
        n = static.lengths[i]
        np.testing.assert_array_equal(static.tokens[i, :n], ref[i, :n], err_msg=f"row {i}")
        assert out.lengths[i] == min(n, limits[i])
        np.testing.assert_array_equal(out.tokens[i], np.where(np.arange(14) < out.lengths[i], static.tokens[i], PAD))
        np.testing.assert_allclose(out.logprobs[i, :out.lengths[i]], static.logprobs[i, :out.lengths[i]], atol=1e-5)
    # the greedy continuations are not trivially constant
    assert len({tuple(r) for r in static.tokens.tolist()}) == len(prompts)


def test_logprobs_match_teacher_forced_forward(tiny):
    torch_model, model, cfg, _ = tiny
    prompts = ragged_prompts(seed=3)
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    for temperature in (0.0, 1.0):
        out = sampler.generate(model, prompts, max_new_tokens=10, temperature=temperature, seed=5)
        for r in range(len(prompts)):
            gen = out.row_tokens(r)
            ref, _ = teacher_forced_logprobs(torch_model, prompts[r], gen)
            np.testing.assert_allclose(out.logprobs[r, :len(gen)], ref, atol=1e-4, rtol=0)


def _chi_square_pvalue(counts, probs):
    """Pearson chi-square p-value, cells with expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue, int(keep.sum())


def test_first_token_frequencies_match_softmax(tiny_qwen3):
    torch_model, model, cfg, _ = tiny_qwen3
    prompt = ragged_prompts(lengths=(9,), seed=11)[0]
    probs = first_token_probs(torch_model, prompt)
    assert probs.max() < 0.9  # a non-degenerate distribution, so the test can fail
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    out = sampler.generate(model, [prompt], max_new_tokens=1, temperature=1.0, n=4000, seed=0, batch_size=1024)
    counts = np.bincount(out.tokens[:, 0], minlength=cfg.vocab_size).astype(float)
    p, cells = _chi_square_pvalue(counts, probs)
    assert cells >= 5
    assert p > 1e-3, f"chi-square p={p:.2e} over {cells} cells"
    # The same test rejects a wrong distribution (temperature 2 samples vs temperature-1 probabilities).
    hot = sampler.generate(model, [prompt], max_new_tokens=1, temperature=2.0, n=4000, seed=0, batch_size=1024)
    p_hot, _ = _chi_square_pvalue(np.bincount(hot.tokens[:, 0], minlength=cfg.vocab_size).astype(float), probs)
    assert p_hot < 1e-6


def test_top_k_temperature_distribution(tiny_qwen3):
    torch_model, model, cfg, _ = tiny_qwen3
    prompt = ragged_prompts(lengths=(6,), seed=12)[0]
    probs = first_token_probs(torch_model, prompt, temperature=0.7)
    top = np.argsort(-probs)[:5]
    expect = np.zeros_like(probs)
    expect[top] = probs[top] / probs[top].sum()
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    out = sampler.generate(model, [prompt], max_new_tokens=1, temperature=0.7, top_k=5, n=3000, seed=1,
                           batch_size=1024)
    counts = np.bincount(out.tokens[:, 0], minlength=cfg.vocab_size).astype(float)
    assert set(np.nonzero(counts)[0]) <= set(top.tolist())
    p, _ = _chi_square_pvalue(counts[top], expect[top])
    assert p > 1e-3


def test_top_p_never_leaves_the_nucleus(tiny_qwen3):
    torch_model, model, cfg, _ = tiny_qwen3
    top_p = 0.6
    prompts = ragged_prompts(lengths=(7, 12, 4), seed=13)
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    out = sampler.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=top_p, n=40, seed=3,
                           batch_size=128)
    checked = 0
    for r in range(out.tokens.shape[0]):
        gen = out.row_tokens(r)
        _, logits = teacher_forced_logprobs(torch_model, prompts[out.prompt_index[r]], gen)
        for t, tok in enumerate(gen):
            p = np.exp(logits[t] - logits[t].max())
            p /= p.sum()
            order = np.argsort(-p)
            # nucleus: the smallest top set whose mass reaches top_p
            size = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
            assert tok in set(order[:size].tolist()), f"row {r} step {t}: token outside the top-p nucleus"
            checked += 1
    assert checked == int(out.lengths.sum()) > 500
    # the nucleus is a real restriction here: over all steps, more than one token was seen
    assert len(np.unique(out.tokens[:, 0])) > 1


def test_rows_stop_independently(tiny_qwen3):
    torch_model, model, cfg, _ = tiny_qwen3
    prompts = ragged_prompts(lengths=(8, 3, 15, 6), seed=21)
    free = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS).generate(model, prompts, max_new_tokens=12)
    # Stop ids that the greedy continuations hit at different steps (or never).
    stop_a, stop_b = int(free.tokens[0, 2]), int(free.tokens[2, 5])
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS, stop_a, stop_b), **BUCKETS)
    out = sampler.generate(model, prompts, max_new_tokens=12)
    seen_lengths = set()
    for r in range(len(prompts)):
        row = free.tokens[r].tolist()
        hits = [t for t, tok in enumerate(row) if tok in (EOS, stop_a, stop_b)]
        expected_len = hits[0] + 1 if hits else 12
        assert out.lengths[r] == expected_len
        np.testing.assert_array_equal(out.tokens[r, :expected_len], free.tokens[r, :expected_len])
        assert (out.tokens[r, expected_len:] == PAD).all()
        assert (out.logprobs[r, expected_len:] == 0).all()
        assert (out.logprobs[r, :expected_len] < 0).all()
        seen_lengths.add(int(expected_len))
    assert len(seen_lengths) >= 2


def test_n_samples_layout_and_determinism(tiny_qwen3):
    _, model, cfg, _ = tiny_qwen3
    prompts = ragged_prompts(lengths=(5, 9, 3), seed=31)
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    a = sampler.generate(model, prompts, max_new_tokens=6, temperature=1.0, n=4, seed=7)
    np.testing.assert_array_equal(a.prompt_index, np.repeat(np.arange(3), 4))
    # samples of one prompt differ from each other
    assert len({tuple(r) for r in a.tokens[:4].tolist()}) > 1
    # same seed -> same samples, whatever the batch size (each row has its own key)
    b = sampler.generate(model, prompts, max_new_tokens=6, temperature=1.0, n=4, seed=7, batch_size=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # a prompt's samples depend on its key, not on its neighbours
    c = sampler.generate(model, prompts[1:2], max_new_tokens=6, temperature=1.0, n=4, seed=7, prompt_keys=[1])
    np.testing.assert_array_equal(c.tokens, a.tokens[4:8])
    d = sampler.generate(model, prompts, max_new_tokens=6, temperature=1.0, n=4, seed=8)
    assert not np.array_equal(a.tokens, d.tokens)


def test_cache_in_the_compute_dtype_changes_no_token_or_logprob(tmp_path):
    """A bfloat16 model's KV cache defaults to bfloat16 (engine and static path): the same greedy and sampled
    tokens and log-probs, bit for bit, as a float32 cache, since keys and values are computed in bfloat16 and cast
    to it again before attention; the cache takes half the memory. A float32 model keeps a float32 cache."""
    make_tiny_hf_model("gemma3", tmp_path, seed=3)  # qk-norm, sliding layers, scaled embeddings
    model, cfg = load_decoder(tmp_path, dtype=jnp.bfloat16)
    prompts = ragged_prompts(lengths=(13, 5, 20), seed=41)
    for cls in (Sampler, StaticSampler):
        narrow = cls(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
        wide = cls(cfg, pad_id=PAD, stop_ids=(EOS,), cache_dtype=jnp.float32, **BUCKETS)
        assert narrow.cache_dtype_for(model) == jnp.bfloat16 and wide.cache_dtype_for(model) == jnp.float32
        for kw in (dict(), dict(temperature=1.0, n=2, seed=5)):
            a = narrow.generate(model, prompts, max_new_tokens=12, **kw)
            b = wide.generate(model, prompts, max_new_tokens=12, **kw)
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.logprobs, b.logprobs)
            assert (a.lengths > 1).all()
        if cls is Sampler:  # the engine's state (cache included) is made in the cache dtype
            assert {k[1].cache_dtype for k in narrow._programs if k[0] == "init"} == {jnp.dtype(jnp.bfloat16)}
            assert {k[1].cache_dtype for k in wide._programs if k[0] == "init"} == {jnp.dtype(jnp.float32)}
        else:  # the static program allocates its cache inside: half the temporary bytes for keys and values
            temp = [sum(p.memory_analysis().temp_size_in_bytes for p in s._programs.values()) for s in (narrow, wide)]
            assert temp[0] < temp[1]
    f32_model, _ = load_decoder(tmp_path)
    assert Sampler(cfg, pad_id=PAD, stop_ids=(EOS,)).cache_dtype_for(f32_model) == jnp.float32


def test_run_stats_count_decode_steps_tokens_and_prefill_padding(tiny_qwen3):
    """last_stats against hand counts: no row stops early (a stop id no model emits), so each emits its limit."""
    _, model, cfg, _ = tiny_qwen3
    prompts = ragged_prompts(lengths=(8, 3, 15, 6), seed=41)  # 32 prompt tokens, all in the 16-token bucket
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(cfg.vocab_size + 5,), **BUCKETS)
    # one slot: a step per token, a chunk and a one-prompt prefill per row
    out = sampler.generate(model, prompts, max_new_tokens=[4, 9, 2, 6], batch_size=1)
    st = sampler.last_stats
    assert out.lengths.tolist() == [4, 9, 2, 6]
    assert (st.slots, st.cache_length, st.tokens, st.steps, st.chunks) == (1, 16 + 16, 21, 21, 4)
    assert (st.prefill_calls, st.prompt_tokens, st.prefill_positions) == (4, 32, 4 * 16)
    assert st.occupancy == 1.0 and st.prefill_padding == 0.5
    # four slots, equal limits: one prefill of the four prompts, every slot emits at each of the 5 steps
    sampler.generate(model, prompts, max_new_tokens=5, batch_size=4)
    st = sampler.last_stats
    assert (st.slots, st.tokens, st.steps, st.chunks, st.prefill_calls) == (4, 20, 5, 1, 1)
    assert st.occupancy == 1.0 and st.prefill_positions == 4 * 16
    # two slots, ragged limits: fewer steps than tokens, some slot-steps idle
    sampler.generate(model, prompts, max_new_tokens=[4, 9, 2, 6], batch_size=2)
    st = sampler.last_stats
    assert st.tokens == 21 and 21 / 2 <= st.steps < 21 and st.occupancy == 21 / (2 * st.steps) < 1.0
    assert st.as_dict()["occupancy"] == st.occupancy and st.as_dict()["steps"] == st.steps


@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # untied and tied LM head
def test_decode_head_batch_one_and_new_weights(kind, tmp_path):
    """The decode steps' LM head (a transposed copy of a tied embedding on CPU, an untied kernel as it is), at
    batch 1 too, and a model whose weights change between calls (as in GRPO) is sampled with the new weights."""
    from flax import nnx

    torch_model = make_tiny_hf_model(kind, tmp_path / "a", seed=3, vocab_size=101)
    make_tiny_hf_model(kind, tmp_path / "b", seed=4, vocab_size=101)
    model, cfg = load_decoder(tmp_path / "a")
    other, _ = load_decoder(tmp_path / "b")
    head = model.decode_head()  # the path under test is the one taken
    if kind == "qwen3" and xla_options.decode_head_layout(None) == "transposed":  # a tied embedding, on CPU
        np.testing.assert_array_equal(np.asarray(head), np.asarray(model.embed.embedding[...]).T)
    else:  # an untied kernel serves as it is; elsewhere than on CPU the model's own weights serve
        assert head is None
    prompts = ragged_prompts(lengths=(7, 12, 3), seed=51, vocab=101)
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    out = sampler.generate(model, prompts, max_new_tokens=10)
    ref = hf_greedy(torch_model, prompts, max_new=10)
    one = sampler.generate(model, prompts, max_new_tokens=10, batch_size=1)  # one slot: batch-1 decode steps
    for r in range(len(prompts)):
        gen = out.row_tokens(r)
        np.testing.assert_array_equal(gen, ref[r, :len(gen)], err_msg=f"row {r}")
        np.testing.assert_array_equal(one.row_tokens(r), gen, err_msg=f"row {r}, batch 1")
        lp, _ = teacher_forced_logprobs(torch_model, prompts[r], gen)
        np.testing.assert_allclose(out.logprobs[r, :len(gen)], lp, atol=1e-4, rtol=0)
        np.testing.assert_allclose(one.logprobs[r, :len(gen)], lp, atol=1e-4, rtol=0)
    # The same model object with new weights, through the same sampler, equals a fresh sampler's output.
    nnx.update(model, nnx.state(other))
    again = sampler.generate(model, prompts, max_new_tokens=10)
    fresh = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS).generate(other, prompts, max_new_tokens=10)
    np.testing.assert_array_equal(again.tokens, fresh.tokens)
    np.testing.assert_allclose(again.logprobs, fresh.logprobs, atol=1e-6)
    assert not np.array_equal(again.tokens, out.tokens)


def test_bucketing_limits_compiles(tiny_qwen3):
    _, model, cfg, _ = tiny_qwen3
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    rng = np.random.default_rng(0)
    for _ in range(3):
        prompts = [rng.integers(3, 96, int(n)).tolist() for n in rng.integers(1, 30, size=6)]
        sampler.generate(model, prompts, max_new_tokens=int(rng.integers(3, 15)), batch_size=4)
    # 4 slots, one generation bucket (16), one cache length (32 + 16): an empty state, a decode chunk and one
    # prefill per prompt bucket (16, 32)
    assert sampler.num_compiles == 4
    # a call whose prompts are all short runs in the longer cache already compiled (at most 2x), compiling nothing
    sampler.generate(model, [[5, 6, 7]] * 4, max_new_tokens=4, batch_size=4)
    assert sampler.num_compiles == 4
    # and one program laying out the LM head for 4-slot decode steps (xla_options.decode_head_layout: "packed" on
    # CPU; none elsewhere), made once for all calls
    assert sampler.num_layout_compiles == (1 if xla_options.decode_head_layout(4) else 0)


@pytest.mark.devices(8)
def test_sharded_sampling_matches_single_device(tiny_qwen3):
    """Slots split over data x fsdp (4 slots for 12 rows: refills on the mesh), KV heads over tensor: the same
    rows as on one device, also with per-row limits and a thinking budget."""
    _, model, cfg, folder = tiny_qwen3
    prompts = ragged_prompts(lengths=(13, 5, 2, 20, 9, 4), seed=41)
    budget = ThinkingBudget(3, start=(prompts[0][-1],), end=(7, 8), cue=(9,))
    calls = [dict(max_new_tokens=8), dict(max_new_tokens=[8, 3, 8, 5, 8, 2], thinking=budget)]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_decoder(folder, mesh=mesh)
    sampler = Sampler(cfg, mesh=mesh, pad_id=PAD, stop_ids=(EOS,), chunk_steps=3, **BUCKETS)
    single = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), chunk_steps=3, **BUCKETS)
    for kw in calls:
        ref = single.generate(model, prompts, temperature=1.0, n=2, seed=3, batch_size=4, **kw)
        out = sampler.generate(sharded, prompts, temperature=1.0, n=2, seed=3, batch_size=4, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert ref.row_tokens(0)[3:6] == [7, 8, 9]  # the budget closed row 0's block


def test_sampled_rows_depend_only_on_seed_prompt_and_sample(tiny):
    """Shuffled prompt order, other slot counts, chunk lengths and prefill widths: every (prompt, sample) row is
    the same, and the same as the static sampler's."""
    _, model, cfg, _ = tiny
    prompts = ragged_prompts(lengths=(13, 5, 2, 20, 9, 4), seed=61)
    static = StaticSampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS).generate(
        model, prompts, max_new_tokens=10, temperature=1.0, n=2, seed=4)
    engine = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), chunk_steps=4, **BUCKETS)
    a = engine.generate(model, prompts, max_new_tokens=10, temperature=1.0, n=2, seed=4, batch_size=4)
    perm = np.random.default_rng(0).permutation(len(prompts))
    b = engine.generate(model, [prompts[i] for i in perm], max_new_tokens=10, temperature=1.0, n=2, seed=4,
                        batch_size=3, prompt_keys=perm.tolist())
    rows_b = np.array([np.nonzero(perm == p)[0][0] * 2 + j for p in range(len(prompts)) for j in range(2)])
    # One prompt per model call in the prefill: a fill of several prompts loops inside one prefill program.
    narrow = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), chunk_steps=4, prefill_tokens=16, **BUCKETS)
    c = narrow.generate(model, prompts, max_new_tokens=10, temperature=1.0, n=2, seed=4, batch_size=8)
    assert narrow._prefill_rows(16, 8) == 1
    for out, rows in ((static, np.arange(len(rows_b))), (b, rows_b), (c, np.arange(len(rows_b)))):
        np.testing.assert_array_equal(out.tokens[rows], a.tokens)
        np.testing.assert_array_equal(out.lengths[rows], a.lengths)
        np.testing.assert_allclose(out.logprobs[rows], a.logprobs, atol=1e-5)
    assert len({tuple(r) for r in a.tokens[::2].tolist()}) == len(prompts)
    assert not np.array_equal(a.tokens[::2], a.tokens[1::2])  # the two samples of a prompt differ


def test_engine_streams_prompts_as_they_finish_and_runs_scanned_layers(tmp_path):
    """stream() yields each prompt once, as soon as its rows stop (short rows before a long one that started
    first); a model with scanned layers (one stacked cache, sliding and global layers) gives the same tokens."""
    make_tiny_hf_model("gemma3", tmp_path, seed=5)
    model, cfg = load_decoder(tmp_path)
    scanned, _ = load_decoder(tmp_path, scan_layers=True)
    prompts = ragged_prompts(lengths=(6, 11, 3, 8, 14), seed=71)
    limits = [24, 3, 4, 3, 5]
    engine = Sampler(cfg, pad_id=PAD, stop_ids=(cfg.vocab_size,), chunk_steps=2, min_refill=1, **BUCKETS)
    order = [f.prompt for f in engine.stream(model, prompts, max_new_tokens=limits, batch_size=2)]
    assert sorted(order) == list(range(5)) and order[-1] == 0  # the long row was placed first, finishes last
    flat = engine.generate(model, prompts, max_new_tokens=limits, batch_size=2)
    np.testing.assert_array_equal(flat.lengths, limits)
    out = Sampler(cfg, pad_id=PAD, stop_ids=(cfg.vocab_size,), chunk_steps=2, **BUCKETS).generate(
        scanned, prompts, max_new_tokens=limits, batch_size=2)
    np.testing.assert_array_equal(out.tokens, flat.tokens)
    np.testing.assert_allclose(out.logprobs, flat.logprobs, atol=1e-5)


def _unused_ids(vocab, *token_lists, count):
    """``count`` token ids found in none of the given token lists."""
    used = {int(t) for toks in token_lists for t in np.ravel(np.concatenate([np.ravel(x) for x in toks]))
            if len(toks)}
    return [t for t in range(3, vocab) if t not in used][:count]


def test_thinking_budget_closes_the_block_and_lets_the_row_answer(tiny_qwen3):
    """Rows think from the prompt (it ends with the start marker) or from when they emit it; after `budget`
    thinking tokens the engine writes the end marker and the answer cue, then the row goes on as the model would
    (HF greedy from the forced text); a row that never thinks is left alone."""
    torch_model, model, cfg, _ = tiny_qwen3
    base = ragged_prompts(lengths=(8, 5, 11), seed=81)
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), chunk_steps=4, **BUCKETS)
    row1 = sampler.generate(model, base[1:2], max_new_tokens=8).row_tokens(0)
    k = next(i for i in range(1, 8) if row1[i] not in row1[:i])  # row 1 emits the start marker first at step k
    start = row1[k]
    prompts = [base[0] + [start], base[1], base[2]]
    free = sampler.generate(model, prompts, max_new_tokens=20)
    assert start not in free.row_tokens(2) + prompts[2]
    end, cue = _unused_ids(cfg.vocab_size, [free.tokens], prompts, count=2), [int(free.tokens[0, 0])]
    budget = ThinkingBudget(4, start=(start,), end=end, cue=cue)
    assert budget.opens(prompts[0]) and not budget.opens(prompts[1]) and budget.closing == tuple(end + cue)
    out = sampler.generate(model, prompts, max_new_tokens=20, thinking=budget, batch_size=2)
    forced_at = {0: 4, 1: k + 1 + 4}  # row 1 thinks after its start marker
    for r, at in forced_at.items():
        got = out.row_tokens(r)
        assert got[:at] == free.row_tokens(r)[:at] and got[at:at + 3] == end + cue, (r, got)
        rest = hf_greedy(torch_model, [prompts[r] + got[:at + 3]], max_new=20 - at - 3)[0]
        np.testing.assert_array_equal(got[at + 3:], rest[:len(got) - at - 3], err_msg=f"row {r}")
    assert out.row_tokens(2) == free.row_tokens(2)
    assert (out.logprobs[:, :3] < 0).all()  # forced tokens carry the model's log-probability of them


def test_budget_forcing_replaces_an_early_end_of_thinking_by_wait(tiny_qwen3):
    """s1 budget forcing: the end marker the model samples while thinking becomes the wait text (once per
    max_waits); the row then continues as the model would from there."""
    torch_model, model, cfg, _ = tiny_qwen3
    prompt = ragged_prompts(lengths=(9,), seed=91)[0]
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), chunk_steps=3, **BUCKETS)
    free = sampler.generate(model, [prompt], max_new_tokens=16).row_tokens(0)
    start = _unused_ids(cfg.vocab_size, [free, prompt], count=1)[0]
    prompt = prompt + [start]
    free = sampler.generate(model, [prompt], max_new_tokens=16).row_tokens(0)
    t = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # the first new token from step 2 on
    wait = _unused_ids(cfg.vocab_size, [free, prompt], count=2)
    budget = ThinkingBudget(0, start=(start,), end=(free[t],), wait=wait, max_waits=1)
    got = sampler.generate(model, [prompt], max_new_tokens=16, thinking=budget).row_tokens(0)
    assert got[:t] == free[:t] and got[t:t + 2] == wait
    rest = hf_greedy(torch_model, [prompt + got[:t + 2]], max_new=16 - t - 2)[0]
    np.testing.assert_array_equal(got[t + 2:], rest[:len(got) - t - 2])
    with pytest.raises(ValueError, match="one-token end marker"):
        ThinkingBudget(0, start=(start,), end=(5, 6), wait=wait, max_waits=1)


def test_bad_arguments_raise_clear_errors(tiny_qwen3):
    _, model, cfg, _ = tiny_qwen3
    sampler = Sampler(cfg, pad_id=PAD, stop_ids=(EOS,), **BUCKETS)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(model, [[5, 6], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate(model, [[5, 6]], max_new_tokens=0)
    with pytest.raises(ValueError, match="3 max_new_tokens for 2 prompts"):
        sampler.generate(model, [[5, 6], [7]], max_new_tokens=[4, 5, 6])
    with pytest.raises(ValueError, match="one max_new_tokens"):
        StaticSampler(cfg, pad_id=PAD, stop_ids=(EOS,)).generate(model, [[5, 6], [7]], max_new_tokens=[4, 5])
    with pytest.raises(ValueError, match="stop id"):
        Sampler(cfg, pad_id=PAD, stop_ids=())


def test_first_argmax_is_numpy_argmax_with_ties():
    import jax.numpy as jnp

    from medkr_jax.sampling import first_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (64, 1000)).astype(np.float32)  # many tied maxima per row
    x[5] = -np.inf
    x[6, 999] = 100.0  # the maximum at the last index
    x[7, 0] = 100.0  # and at the first
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_sort_free_nucleus_matches_a_sorting_reference():
    """top-k / top-p masks from threshold bisection equal HF's sort-based definition (NumPy, float64)."""
    import jax.numpy as jnp

    from medkr_jax.sampling.ops import nucleus_keep

    rng = np.random.default_rng(0)
    # peaked and flat rows, plus a -inf (banned) token
    logits = np.concatenate([rng.normal(0, 4, (6, 300)), rng.normal(0, 0.3, (6, 300))]).astype(np.float32)
    logits[:, 7] = -np.inf
    for top_k, top_p in [(0, 0.9), (0, 0.5), (20, 1.0), (5, 0.7), (1, 1.0), (0, 0.999), (400, 0.3)]:
        got = np.asarray(nucleus_keep(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
        for r, row in enumerate(logits.astype(np.float64)):
            order = np.argsort(-row, kind="stable")
            k = len(row) if top_k <= 0 else min(top_k, len(row))
            kept = order[:k]
            p = np.exp(row[kept] - row[kept].max())
            p /= p.sum()
            above = np.cumsum(p) - p
            want = np.zeros(len(row), bool)
            want[kept[above < top_p]] = True
            np.testing.assert_array_equal(got[r], want, err_msg=f"top_k={top_k} top_p={top_p} row {r}")
        assert got.sum(axis=1).min() >= 1
