"""Training throughput: our jitted SFT step vs Hugging Face PyTorch, our GRPO step vs google-tunix's GRPO, and our
LoRA SFT step vs full fine-tuning of the same model.

    python bench/train_step.py [--threads 1] [--steps 12] [--setup-tunix] [--skip-tunix] [--lora-rank 16]
    python bench/train_step.py --only grpo --threads 2   # some of the comparisons (sft, grpo, lora, packing)
    python bench/train_step.py --lora-only --steps 1   # the LoRA comparison alone (= --only lora; a smoke run)
    python bench/train_step.py --model smollm2-135m --batch 4   # the SFT comparison on real shapes

Every comparison follows bench/harness.py's method: the process is pinned to --threads CPUs for both sides,
rounds interleave the two sides (the order alternating between rounds), and a ratio is reference time / ours
(> 1: ours is faster), the median of the per-round ratios, with `_best` (best over best), `_cpu` (CPU time) and
`_rounds` fields beside it.

SFT: the same tiny Llama-shaped model with random weights (vocab 1024, hidden 256, MLP 512, 4 layers, 4 query /
2 KV heads of 64) trained on the same random token batch (--batch x --seq, 8 x 256, every target counted; with
--prompt-fraction F the first F of each row is prompt, its targets unscored: HF's labels -100, ours as the sft job,
the LM head on the scored positions only) with AdamW
(lr 1e-4, global-norm clip 1.0). Ours is the `Trainer` step of medkr_jax.train.trainer with the SFT loss;
the reference is transformers' LlamaForCausalLM (PyTorch, CPU) with torch.optim.AdamW and
clip_grad_norm_, run in a worker process of its own pinned to the same CPUs (bench/harness.py's RemoteTimer: in
one process the two sides' multi-GB step buffers fragment the shared heap for each other; SmolLM2 at 1 x 2,048
tokens, our step 27 s alone, 39-43 s after an in-process PyTorch step). With --model (an HF folder or a preset
such as smollm2-135m: 30 layers x 576, vocab 49,152) both sides load that checkpoint instead and only this
comparison runs. After three interleaved warm-up rounds, `--steps`
rounds of one step per side, with the matmul peak timed in the same rounds; tokens/s = batch * seq_len / the best
round's time. `peak_fraction` (`reference_peak_fraction`) = our (HF's) step's model FLOP/s over the peak (the best
call of a large float32 matmul, jitted JAX or torch); model FLOPs (`sft_step_flops`): 6 x the layers' parameters
per token, 6 x vocab x hidden per scored token, causal attention at half the score matrix (6 * layers * B * T^2 *
heads * head_dim), the convention of MaxText's MFU (before commit 92b8adc the untied input embedding was counted
as a matmul and attention at the full T^2, which overstated the fraction: 0.88 -> 0.75 for the same step).

GRPO: the same tiny decoder (vocab 512, hidden 64, MLP 128, 2 layers, 4/2 heads of 16), 4 prompts per step x
8 generations, 16 new tokens at temperature 1, beta 0.04 (a reference model), mu 1, AdamW 1e-3, the same
prompt strings. Ours is the "grpo" job (jitted KV-cache sampler + reference forward + jitted update, reward by
answer extraction); the reference is tunix 0.1.7's GRPOLearner with its vanilla rollout engine on the same
jax/flax. A run's step time is its median step period after the first two steps (wall and CPU seconds between
consecutive steps' metrics for ours, between consecutive reward-function calls for tunix); the two run
alternately, `--repeats` rounds of one run each; samples/s = 32 / the best run's step time, `grpo_ratio` the
median of the per-round ratios (null, with `grpo_reference_error`, unless every round has both sides). `grpo_ours_phases_s`:
our step's median rollout (`generate_s`) and reference log-probs + update (`update_s`) seconds.

tunix is installed in the benchmark's own venv, bench/.venv-tunix (`--setup-tunix` creates it: a venv that
sees the project venv's packages through a .pth file, plus `pip install google-tunix` and its missing
requirements; tunix pins safetensors<0.8, which is removed again so transformers keeps working). When that
venv is missing, the GRPO reference is reported as null with the reason.

LoRA: the SFT model and batch above, once fully fine-tuned and once with rank-`--lora-rank` adapters (alpha =
2 x rank) on every attention and MLP projection and the base frozen (medkr_jax.models.lora), the same AdamW; the
two `Trainer` steps run in `--steps` interleaved rounds as above (no peak). Peak memory is XLA's memory analysis of each compiled step on one device
(arguments + outputs - donated buffers + temporaries: what the step needs, whatever the backend; CPU reports no
device peak); `lora_time_ratio` (median of the per-round ratios) and `lora_memory_ratio` are LoRA over full.

Packing: the same SFT step on the batch above (one sequence per row) and on the same tokens packed four sequences
to a row (`--packed-segments`; segment ids, positions restarting): `packed_time_ratio` is packed over unpacked time
(median of interleaved rounds), the cost of the packing path per real token.

Both sides of each comparison run on the CPU with the same number of threads (default 1: on a shared machine
multi-threaded timings swing by 10x, one thread each gives a stable like-for-like ratio). Ends with the load
average and one JSON line: the SFT comparison in name/ours/reference/unit/ratio*/peak_*, the GRPO one in the
grpo_* fields, the LoRA one in the lora_* fields, the packing one in the packed_* fields, `comparisons` naming those
that ran (`--only`), then load_avg and load_warning (and, with --threads above 1, the thread wake-up round trips:
harness.load_report). Without the SFT comparison the line's name and `ratio` are the first that ran of GRPO
("train_step_grpo_samples_per_s", grpo_ratio), LoRA ("train_step_lora_vs_full", full time / LoRA time) and
packing ("train_step_packed_vs_unpacked", unpacked time / packed), medians of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (RemoteTimer, Timer, cpu_seconds, decoder_config, device_line, llama_config,  # noqa: E402
                     load_report, peak_flops, peak_line, peak_timers, pin, ratio_line, ratios, run_rounds, serve,
                     sft_batch, sft_step_flops, sft_trainer, threads_from_argv, torch_sft_step)

pin(threads_from_argv())  # before jax is imported: both sides on the same --threads CPUs (bench/harness.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNIX_VENV = os.path.join(REPO, "bench", ".venv-tunix")
TUNIX_VERSION = "0.1.7"
TUNIX_REQUIREMENTS = ["jaxtyping", "qwix>=0.1.6", "google-metrax>=0.2.3", "omegaconf", "perfetto", "kagglehub",
                      "numba", "tensorflow_datasets", "sentencepiece", "pylatexenc", "python-dotenv", "hf_transfer",
                      "tenacity", "importlib_resources"]

SFT_DIMS = dict(vocab=1024, hidden=256, mlp=512, layers=4, heads=4, kv_heads=2, head_dim=64)
GRPO_DIMS = dict(vocab=512, hidden=64, mlp=128, layers=2, heads=4, kv_heads=2, head_dim=16)
GRPO = dict(prompts_per_step=4, generations=8, max_new_tokens=16, beta=0.04, lr=1e-3, prompt_len=64)


# ------------------------------------------------------------------------------------------ tunix worker


def tunix_worker(spec_path: str) -> None:
    """Runs under bench/.venv-tunix: tunix GRPO on the spec's tokenizer/prompts; prints one JSON line."""
    import grain
    import jax
    import optax
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.llama3 import model as llama
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    spec = json.load(open(spec_path))
    d, g = spec["dims"], spec["grpo"]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    cfg = llama.ModelConfig(num_layers=d["layers"], vocab_size=d["vocab"], embed_dim=d["hidden"],
                            hidden_dim=d["mlp"], num_heads=d["heads"], head_dim=d["head_dim"],
                            num_kv_heads=d["kv_heads"], rope_theta=10000, norm_eps=1e-5)
    # tunix indexes sharded arrays without explicit out_shardings: it needs Auto mesh axes
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with mesh:
        actor = llama.Llama3(cfg, rngs=nnx.Rngs(0))
        reference = llama.Llama3(cfg, rngs=nnx.Rngs(0))
    stamps: list[tuple[float, float]] = []

    def reward(prompts, completions, answer, **kw):
        stamps.append((time.perf_counter(), cpu_seconds()))
        return [float(a in c) for c, a in zip(completions, answer)]

    steps = spec["steps"]
    cluster_cfg = rlc.ClusterConfig(
        role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rlc.RLTrainingConfig(actor_optimizer=optax.adamw(g["lr"]), eval_every_n_steps=10**9,
                                             max_steps=steps),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=g["max_new_tokens"], max_prompt_length=g["prompt_len"],
            kv_cache_size=g["prompt_len"] + g["max_new_tokens"] + 16, temperature=1.0, top_p=1.0, top_k=None),
    )
    cluster = rlc.RLCluster(actor=actor, reference=reference, tokenizer=tok, cluster_config=cluster_cfg)
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=reward,
        algo_config=grpo_learner.GRPOConfig(num_generations=g["generations"], num_iterations=1, beta=g["beta"],
                                            epsilon=0.2))
    prompts = np.array(spec["prompts"])
    answers = np.array(spec["answers"])
    n = g["prompts_per_step"]
    # numpy batches: tunix repeats every leaf G times along axis 0
    ds = grain.MapDataset.source(list(range(len(prompts)))).repeat(None).batch(n).map(
        lambda idx: {"prompts": prompts[idx], "answer": answers[idx]})
    t0 = time.perf_counter()
    learner.train(ds)
    periods = np.diff(np.asarray(stamps), axis=0)[1:]
    print(json.dumps({"samples_per_s": n * g["generations"] / float(np.median(periods[:, 0])),
                      "step_periods_s": [round(float(p), 4) for p in periods[:, 0]],
                      "cpu_periods_s": [round(float(p), 4) for p in periods[:, 1]], "wall_s": time.perf_counter() - t0,
                      "steps": len(stamps)}))


def setup_tunix() -> None:
    """Create bench/.venv-tunix: the project venv's packages + google-tunix and its missing requirements."""
    import site
    import sysconfig

    if not os.path.exists(os.path.join(TUNIX_VENV, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", TUNIX_VENV], check=True)
    py = os.path.join(TUNIX_VENV, "bin", "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if os.path.isdir(p)] or [sysconfig.get_paths()["purelib"]]
    with open(os.path.join(purelib, "_project_venv.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", f"google-tunix=={TUNIX_VERSION}"], check=True)
    subprocess.run(pip + TUNIX_REQUIREMENTS, check=True)
    # tunix pins safetensors<0.8 only for its own checkpoint loader (unused here); transformers needs >= 0.8
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "safetensors"], check=False)


# ------------------------------------------------------------------------------------------------ ours


def our_sft_step(batch: dict, folder: str | None = None):
    """(our SFT step fn, its parameter count, the decoder config) on `batch`: the tiny random SFT_DIMS model, or the
    checkpoint in ``folder``."""
    import jax
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.hf import load_decoder, one_device_mesh
    from medkr_jax.train import sft

    mesh = one_device_mesh()
    if folder is None:
        cfg = decoder_config(SFT_DIMS)
        with parallel.sharding_context(mesh):
            model = Decoder(cfg, rngs=nnx.Rngs(0))
    else:
        model, cfg = load_decoder(folder, mesh=mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    trainer = sft_trainer(model, mesh)
    scored = sft.scored_positions(batch)  # as the sft job: only scored targets reach the LM head

    def ours():
        m = trainer.update(scored, jax.random.key(0))
        float(m["loss"])  # the loop reads every step's loss (NaN check): the same synchronisation here

    return ours, int(n_params), cfg


def hf_sft_step(batch: dict, folder: str | None = None):
    """The PyTorch reference's SFT step fn on `batch`: transformers' LlamaForCausalLM of SFT_DIMS (random weights),
    or the checkpoint in ``folder`` (the same weights as ours)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if folder is None:
        tmodel = transformers.AutoModelForCausalLM.from_config(llama_config(SFT_DIMS), dtype=torch.float32,
                                                               attn_implementation="sdpa")
    else:
        tmodel = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
    tmodel.train()
    ids = torch.from_numpy(np.asarray(batch["tokens"], np.int64))
    # HF's convention for unscored targets: label -100, which cross_entropy ignores (its logits are still computed)
    labels = torch.from_numpy(np.where(np.asarray(batch["loss_mask"]) > 0, np.asarray(batch["targets"], np.int64), -100))
    return torch_sft_step(tmodel, ids, labels)


def sft_reference_worker(spec: str) -> None:
    """--sft-reference-worker: serve HF's SFT step on the batch the spec (JSON: batch, seq, vocab, prompt_fraction,
    folder) describes, to the parent's RemoteTimer (bench/harness.py)."""
    s = json.loads(spec)
    serve(hf_sft_step(sft_batch(s["batch"], s["seq"], s["vocab"], s["prompt_fraction"]), s["folder"]))


def lora_vs_full(batch: dict, rank: int, steps: int) -> dict:
    """LoRA SFT (rank `rank` on every projection, base frozen) vs full fine-tuning of the SFT model on `batch`:
    best-round step seconds (`steps` interleaved rounds) and the compiled steps' peak bytes; ratios are LoRA over
    full (lora_time_ratio: the median of the per-round ratios, with _best, _cpu and _rounds beside it)."""
    import jax
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.models import lora
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.hf import one_device_mesh

    cfg = decoder_config(SFT_DIMS)
    mesh = one_device_mesh()
    key = jax.random.key(0)
    trainers = []
    for r in (0, rank):
        with parallel.sharding_context(mesh):
            model = Decoder(cfg, rngs=nnx.Rngs(0))
        lora.apply_lora(model, lora.LoRASettings(rank=r, alpha=2.0 * r), mesh=mesh)
        trainers.append(sft_trainer(model, mesh))
    memory = [t.step_memory(batch, key)["peak"] for t in trainers]
    full, low = warmed(*[Timer(lambda t=t: float(t.update(batch, key)["loss"])) for t in trainers])
    run_rounds({"full": full, "lora": low}, steps)
    trained = [sum(x.size for x in jax.tree.leaves(t.params)) for t in trainers]
    return {"lora_rank": rank, "lora_trained_params": int(trained[1]), "full_trained_params": int(trained[0]),
            "lora_step_s": round(low.wall, 5), "full_step_s": round(full.wall, 5),
            **ratios(full, low, key="lora_time_ratio"), "lora_peak_bytes": memory[1], "full_peak_bytes": memory[0],
            "lora_memory_ratio": round(memory[1] / memory[0], 3)}


def packed_batch(batch: dict, segments: int) -> dict:
    """``batch`` with each row cut into ``segments`` packed sequences (segment ids 1..segments, positions restarting
    at each): the same tokens and real-token count, each attending only within its own sequence."""
    b, t = batch["tokens"].shape
    if t % segments:
        raise ValueError(f"--seq {t} must be a multiple of --packed-segments {segments}")
    n = t // segments
    return {**batch, "segment_ids": np.tile(np.repeat(np.arange(1, segments + 1, dtype=np.int32), n), (b, 1)),
            "positions": np.tile(np.arange(n, dtype=np.int32), (b, segments))}


def packed_vs_unpacked(batch: dict, segments: int, steps: int) -> dict:
    """The SFT step on rows that each hold one sequence vs rows packed with ``segments`` sequences (segment ids),
    the same shape and real tokens: `packed_time_ratio` = packed step time / unpacked (median of interleaved
    rounds; 1 = the packing path costs nothing per real token)."""
    import jax
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.hf import one_device_mesh

    mesh = one_device_mesh()
    with parallel.sharding_context(mesh):
        model = Decoder(decoder_config(SFT_DIMS), rngs=nnx.Rngs(0))
    trainer = sft_trainer(model, mesh)
    key, packed = jax.random.key(0), packed_batch(batch, segments)
    one, many = warmed(*[Timer(lambda x=x: float(trainer.update(x, key)["loss"])) for x in (batch, packed)])
    run_rounds({"unpacked": one, "packed": many}, steps)
    return {"packed_segments": segments, "packed_step_s": round(many.wall, 5), "unpacked_step_s": round(one.wall, 5),
            **ratios(one, many, key="packed_time_ratio")}


def _print_lora(res: dict) -> None:
    print(f"LoRA r={res['lora_rank']} SFT step {res['lora_step_s'] * 1e3:.1f} ms vs full {res['full_step_s'] * 1e3:.1f}"
          f" ms (time ratio LoRA / full {res['lora_time_ratio']}, median of rounds; "
          f"{res['lora_time_ratio_cpu']} CPU time); peak {res['lora_peak_bytes'] / 2**20:.1f} MiB vs "
          f"{res['full_peak_bytes'] / 2**20:.1f} MiB (ratio {res['lora_memory_ratio']}); trained params "
          f"{res['lora_trained_params']:,} vs {res['full_trained_params']:,}")


def warmed(*timers: Timer, calls: int = 3) -> tuple[Timer, ...]:
    """`timers` after `calls` untimed rounds that run them in turn, as the timed rounds will (compilation,
    optimizer state, and each process's heap settling into the pattern it is timed in)."""
    for _ in range(calls):
        for t in timers:
            t.warm()
    return timers


@contextlib.contextmanager
def step_stamps(stamps: list):
    """Appends (wall, CPU seconds) to `stamps` each time a training run logs a step's loss (observation only:
    the run's MetricsLogger.log is wrapped for the duration)."""
    from medkr_jax.train.metrics_log import MetricsLogger

    log = MetricsLogger.log

    def stamped(self, step, metrics):
        if "loss" in metrics:
            stamps.append((time.perf_counter(), cpu_seconds()))
        return log(self, step, metrics)

    MetricsLogger.log = stamped
    try:
        yield
    finally:
        MetricsLogger.log = log


def grpo_prompts(tokenizer, n: int = 64) -> tuple[list, list[str], list[str]]:
    """MCQ records, their rendered prompt strings (what both GRPO implementations see) and answer letters."""
    from medkr_jax.data.answer import LETTERS
    from medkr_jax.data.records import MCQRecord
    from medkr_jax.eval.prompts import build_prompt

    recs = [MCQRecord(id=f"b{i}", benchmark="bench", question=f"Signal {['red', 'blue', 'green', 'gold'][i % 4]} {i}",
                      options=["north", "south", "east", "west"], answer=i % 4, label="reasoning") for i in range(n)]
    texts = [build_prompt(tokenizer, r, system_prompt="") for r in recs]
    return recs, texts, [f"answer is {LETTERS[r.answer]}" for r in recs]


def bench_grpo_ours(work: str, tok_dir: str, steps: int) -> dict:
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.config import base_config
    from medkr_jax.data.records import write_records
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.hf import export_decoder, one_device_mesh
    from transformers import AutoTokenizer

    from medkr_jax.jobs import grpo
    from medkr_jax.train.metrics_log import read_metrics

    os.makedirs(work, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    recs, _, _ = grpo_prompts(tok)
    write_records(os.path.join(work, "prompts.jsonl"), recs)
    cfg = decoder_config(GRPO_DIMS, bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                          pad_token_id=tok.pad_token_id)
    mesh = one_device_mesh()
    with parallel.sharding_context(mesh):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
    export_decoder(model, cfg, os.path.join(work, "policy"), tokenizer_dir=tok_dir)
    c = base_config()
    c.job, c.output_dir, c.seed = "grpo", os.path.join(work, "run"), 0
    c.model.path = os.path.join(work, "policy")
    c.eval.system_prompt = ""
    c.grpo.train_path = os.path.join(work, "prompts.jsonl")
    c.grpo.num_generations, c.grpo.prompts_per_step = GRPO["generations"], GRPO["prompts_per_step"]
    c.grpo.max_new_tokens, c.grpo.beta, c.grpo.mu = GRPO["max_new_tokens"], GRPO["beta"], 1
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = GRPO["lr"], 0, "constant"
    c.train.steps, c.train.checkpoint_every = steps, 10**6
    c.train.tensorboard = False
    stamps = []
    with step_stamps(stamps):
        grpo.run(c, mesh=mesh)
    recs = [r for r in read_metrics(c.output_dir) if "loss" in r]
    periods = np.diff(np.asarray(stamps), axis=0)[1:]
    rows = GRPO["prompts_per_step"] * GRPO["generations"]
    return {"samples_per_s": rows / float(np.median(periods[:, 0])),
            "step_periods_s": [round(float(p), 4) for p in periods[:, 0]],
            "cpu_periods_s": [round(float(p), 4) for p in periods[:, 1]],
            "response_length": float(np.mean([r["response_length"] for r in recs])),
            # where a step's time goes: the rollout, and the reference log-probs + the update
            "phases_s": {k: round(float(np.median([r[k] for r in (recs[2:] or recs)])), 4)
                         for k in ("generate_s", "update_s")}}


def bench_grpo_tunix(work: str, tok_dir: str, steps: int, threads: int) -> dict:
    py = os.path.join(TUNIX_VENV, "bin", "python")
    if not os.path.exists(py):
        return {"error": f"{TUNIX_VENV} does not exist; run `python bench/train_step.py --setup-tunix` first"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    _, texts, answers = grpo_prompts(tok)
    spec = {"dims": GRPO_DIMS, "grpo": GRPO, "steps": steps, "tokenizer": tok_dir, "prompts": texts,
            "answers": answers}
    spec_path = os.path.join(work, "tunix_spec.json")
    json.dump(spec, open(spec_path, "w"))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    res = subprocess.run([py, os.path.abspath(__file__), "--tunix-worker", spec_path, f"--threads={threads}"],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": f"tunix worker failed (exit {res.returncode}): {res.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1])


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12,
                    help="interleaved rounds of one step per side (after three warm-up rounds) for SFT and LoRA; "
                         "timed steps per GRPO run")
    ap.add_argument("--repeats", type=int, default=2, help="GRPO rounds: alternating runs per implementation")
    ap.add_argument("--batch", type=int, default=8, help="SFT / LoRA batch rows")
    ap.add_argument("--seq", type=int, default=256, help="SFT / LoRA sequence length")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul used for the peak")
    ap.add_argument("--setup-tunix", action="store_true", help=f"create {TUNIX_VENV} first")
    ap.add_argument("--skip-tunix", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=16, help="adapter rank of the LoRA vs full SFT comparison")
    ap.add_argument("--only", type=comparisons, default=",".join(COMPARISONS), metavar="LIST",
                    help=f"comma-separated comparisons to run, of {','.join(COMPARISONS)} (default: all)")
    ap.add_argument("--lora-only", action="store_true", help="the same as --only lora")
    ap.add_argument("--packed-segments", type=int, default=4,
                    help="sequences per row in the packed vs unpacked SFT step comparison")
    ap.add_argument("--prompt-fraction", type=float, default=0.0,
                    help="SFT comparison: the first this fraction of each row is prompt, its targets not scored "
                         "(ours skips their LM head as the sft job does; HF labels them -100); 0 = every target")
    ap.add_argument("--model", default=None,
                    help="SFT comparison alone on this HF folder or preset (e.g. smollm2-135m, with --batch 4)")
    ap.add_argument("--tunix-worker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--sft-reference-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lora_only:
        args.only = {"lora"}
    return args


COMPARISONS = ("sft", "grpo", "lora", "packing")


def comparisons(text: str) -> set[str]:
    """--only's value: a set of COMPARISONS (argparse reports a bad name with the valid ones)."""
    chosen = {c.strip() for c in text.split(",") if c.strip()}
    unknown = sorted(chosen - set(COMPARISONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown comparison(s) {unknown or [text]}; "
                                         f"choose from {', '.join(COMPARISONS)}")
    return chosen


def sft_comparison(args, vocab: int) -> tuple[dict, str]:
    """Our SFT step vs HF PyTorch's (in a worker process of its own, pinned to the same CPUs) in interleaved rounds
    with the matmul peak: (JSON fields, table lines)."""
    spec = {"batch": args.batch, "seq": args.seq, "vocab": vocab, "prompt_fraction": args.prompt_fraction,
            "folder": args.model_folder}
    batch = sft_batch(args.batch, args.seq, vocab, args.prompt_fraction)
    ref = RemoteTimer([sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                       "--sft-reference-worker", json.dumps(spec)])
    try:
        ours_fn, n_params, cfg = our_sft_step(batch, args.model_folder)
        b, t = batch["tokens"].shape
        flops = sft_step_flops(cfg, n_params, b, t, scored=int(np.asarray(batch["loss_mask"]).sum()))
        # The peak's arrays before the warm-up: allocated after it, they would sit in the block our step frees and
        # reallocates, which then no longer fits there (SmolLM2 at 1 x 2,048 tokens: 27 -> 35 s a step).
        peak_t = peak_timers(args.peak_n)
        ours, ref = warmed(Timer(ours_fn), ref)
        run_rounds({"ours": ours, "reference": ref}, args.steps, peak_t)
    finally:
        ref.close()
    cmp = ratios(ours, ref)
    peak, _ = peak_flops(peak_t)
    ours_tps, ref_tps = b * t / ours.wall, b * t / ref.wall
    lines = (f"{'SFT step tokens/s':28s}{ours_tps:14.1f}{ref_tps:14.1f}{cmp['ratio']:8.2f}   (HF PyTorch; "
             f"{n_params / 1e6:.2f}M params, batch {b}x{t}, best of {args.steps} rounds)\n"
             + ratio_line("SFT ours / HF", cmp) + "\n" + peak_line(peak_t)
             + f"; SFT model FLOPs {flops / 1e9:.2f} G a step: ours {flops / ours.wall / 1e9:.1f} GFLOP/s -> "
               f"peak_fraction {flops / ours.wall / peak:.3f}, HF {flops / ref.wall / peak:.3f}")
    return {"ours": round(ours_tps, 2), "reference": round(ref_tps, 2), "unit": "tokens/s", **cmp,
            "peak_flops": round(peak), "peak_fraction": round(flops / ours.wall / peak, 4),
            "reference_peak_fraction": round(flops / ref.wall / peak, 4), "step_model_flops": round(flops),
            "prompt_fraction": args.prompt_fraction}, lines


def grpo_comparison(args, work: str) -> tuple[dict, str]:
    """Our GRPO job vs tunix's GRPOLearner, `--repeats` rounds of one run each, the order alternating between
    rounds; a run's time is its median step period (wall and CPU): (JSON fields, table line)."""
    from medkr_jax.data.tokenizer import train_bpe_tokenizer

    corpus = [f"Signal {c} {i}: which way? north south east west The answer is {L}."
              for i in range(50) for c in ("red", "blue", "green", "gold") for L in "ABCD"]
    tok_dir = os.path.join(work, "tokenizer")
    train_bpe_tokenizer(corpus, tok_dir, vocab_size=400, min_frequency=1)
    steps, rows = args.steps + 2, GRPO["prompts_per_step"] * GRPO["generations"]
    ours, tunix, errors = Timer(), Timer(), ["skipped (--skip-tunix)"] if args.skip_tunix else []
    phases = []

    def run_ours(r: int) -> None:
        res = bench_grpo_ours(os.path.join(work, f"ours{r}"), tok_dir, steps)
        ours.add(rows / res["samples_per_s"], float(np.median(res["cpu_periods_s"])))
        phases.append(res["phases_s"])

    def run_tunix(r: int) -> None:
        if args.skip_tunix:
            return
        res = bench_grpo_tunix(work, tok_dir, steps, args.threads)
        if "error" in res:
            errors.append(res["error"])
        else:
            tunix.add(rows / res["samples_per_s"], float(np.median(res["cpu_periods_s"])))

    for r in range(args.repeats):
        for run in (run_ours, run_tunix) if r % 2 == 0 else (run_tunix, run_ours):
            run(r)
    fields = {"grpo_ours_samples_per_s": round(rows / ours.wall, 2),
              "grpo_ours_phases_s": {k: round(float(np.median([p[k] for p in phases])), 4) for k in phases[0]},
              "grpo_tunix_samples_per_s": round(rows / tunix.wall, 2) if tunix.walls else None}
    if errors:  # no ratio unless every round has both sides
        fields.update({k: None for k in ("grpo_ratio", "grpo_ratio_best", "grpo_ratio_cpu", "grpo_ratio_rounds")})
        line = f"{'GRPO step samples/s':28s}{rows / ours.wall:14.1f}{'n/a':>14s}{'':8s}   ({errors[-1]})"
    else:
        fields.update(ratios(ours, tunix, key="grpo_ratio"))
        line = (f"{'GRPO step samples/s':28s}{rows / ours.wall:14.1f}{rows / tunix.wall:14.1f}"
                f"{fields['grpo_ratio']:8.2f}   (tunix {TUNIX_VERSION})\n"
                + ratio_line("GRPO ours / tunix", fields, key="grpo_ratio"))
    return {**fields, "grpo_reference_error": errors[-1] if errors else None}, line


def sft_model_only(args) -> None:
    """--model: the SFT comparison on a real checkpoint (same weights both sides), without GRPO and LoRA."""
    import jax

    from medkr_jax.models.presets import resolve_path

    args.model_folder = args.model if os.path.isdir(args.model) else str(resolve_path(args.model))
    with open(os.path.join(args.model_folder, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    sft, sft_lines = sft_comparison(args, vocab)
    print(device_line(args.threads))
    print(f"{'':28s}{'ours':>14s}{'reference':>14s}{'ratio':>8s}")
    print(sft_lines)
    print(json.dumps({"name": "train_step_sft_tokens_per_s", "model": args.model, **sft, "batch": args.batch,
                      "seq": args.seq, "threads": args.threads, "device": jax.devices()[0].platform,
                      **load_report(args.threads)}))


def main() -> None:
    args = parse_args()
    if args.tunix_worker:
        tunix_worker(args.tunix_worker)
        return
    if args.sft_reference_worker:
        sft_reference_worker(args.sft_reference_worker)
        return
    if args.setup_tunix:
        setup_tunix()
    sys.path.insert(0, REPO)

    import jax

    if args.model:
        sft_model_only(args)
        return
    args.model_folder = None
    batch = sft_batch(args.batch, args.seq, SFT_DIMS["vocab"])
    lora_res = lora_vs_full(batch, args.lora_rank, args.steps) if "lora" in args.only else {}
    packing = packed_vs_unpacked(batch, args.packed_segments, args.steps) if "packing" in args.only else {}
    sft, sft_lines = sft_comparison(args, SFT_DIMS["vocab"]) if "sft" in args.only else ({}, None)
    grpo_fields, grpo_line = {}, None
    if "grpo" in args.only:
        with tempfile.TemporaryDirectory() as work:
            grpo_fields, grpo_line = grpo_comparison(args, work)

    print(device_line(args.threads))
    if sft_lines or grpo_line:
        print(f"{'':28s}{'ours':>14s}{'reference':>14s}{'ratio':>8s}")
    for lines in (sft_lines, grpo_line):
        if lines:
            print(lines)
    if lora_res:
        _print_lora(lora_res)
    if packing:
        print(f"SFT step with {packing['packed_segments']} packed sequences per row "
              f"{packing['packed_step_s'] * 1e3:.1f} ms vs one per row {packing['unpacked_step_s'] * 1e3:.1f} ms, "
              f"the same real tokens (time ratio packed / unpacked {packing['packed_time_ratio']}, median of "
              f"rounds; {packing['packed_time_ratio_cpu']} CPU time)")
    print(json.dumps({**headline(args.only, grpo_fields, lora_res, packing), **sft, **grpo_fields, **lora_res,
                      **packing, "comparisons": sorted(args.only), "batch": args.batch, "seq": args.seq,
                      "threads": args.threads, "device": jax.devices()[0].platform, **load_report(args.threads)}))


def headline(only: set[str], grpo: dict, lora_res: dict, packing: dict) -> dict:
    """The JSON line's name and `ratio` (reference time over ours, > 1: ours faster): the SFT comparison's when it
    ran (its fields carry them), else the first of GRPO vs tunix, full fine-tuning over LoRA, unpacked over
    packed rows."""
    if "sft" in only:
        return {"name": "train_step_sft_tokens_per_s"}
    if "grpo" in only:
        return {"name": "train_step_grpo_samples_per_s", "ratio": grpo["grpo_ratio"]}
    if "lora" in only:
        return {"name": "train_step_lora_vs_full",
                "ratio": round(statistics.median(1.0 / r for r in lora_res["lora_time_ratio_rounds"]), 3)}
    return {"name": "train_step_packed_vs_unpacked",
            "ratio": round(statistics.median(1.0 / r for r in packing["packed_time_ratio_rounds"]), 3)}


if __name__ == "__main__":
    main()
