"""Training throughput: our jitted SFT step vs Hugging Face PyTorch, our GRPO step vs google-tunix's GRPO, and our
LoRA SFT step vs full fine-tuning of the same model.

    python bench/train_step.py [--threads 1] [--steps 12] [--setup-tunix] [--skip-tunix] [--lora-rank 16]
    python bench/train_step.py --lora-only --steps 1   # the LoRA comparison alone (a smoke run)

SFT: the same tiny Llama-shaped model with random weights (vocab 1024, hidden 256, MLP 512, 4 layers, 4 query /
2 KV heads of 64) trained on the same random token batch (8 x 256, every target counted) with AdamW
(lr 1e-4, global-norm clip 1.0). Ours is the `Trainer` step of medkr_jax.train.trainer with the SFT loss;
the reference is transformers' LlamaForCausalLM (PyTorch, CPU) with torch.optim.AdamW and
clip_grad_norm_. The two steps alternate (so both see the same machine load); time per step is the median
over `--steps` steps after two warm-up steps; tokens/s = batch * seq_len / time. `peak_fraction` = our step's
model FLOP/s (6 * params * tokens + 12 * layers * B * T^2 * heads * head_dim) over the FLOP/s of a large
jitted float32 matmul measured in the same run.

GRPO: the same tiny decoder (vocab 512, hidden 64, MLP 128, 2 layers, 4/2 heads of 16), 4 prompts per step x
8 generations, 16 new tokens at temperature 1, beta 0.04 (a reference model), mu 1, AdamW 1e-3, the same
prompt strings. Ours is the "grpo" job (jitted KV-cache sampler + reference forward + jitted update, reward by
answer extraction); the reference is tunix 0.1.7's GRPOLearner with its vanilla rollout engine on the same
jax/flax. samples/s = 32 / the median step period after the first two steps (period = time between
consecutive steps' metrics for ours, between consecutive reward-function calls for tunix). The two run
alternately `--repeats` times each and each keeps its best run.

tunix is installed in the benchmark's own venv, bench/.venv-tunix (`--setup-tunix` creates it: a venv that
sees the project venv's packages through a .pth file, plus `pip install google-tunix` and its missing
requirements; tunix pins safetensors<0.8, which is removed again so transformers keeps working). When that
venv is missing, the GRPO reference is reported as null with the reason.

LoRA: the SFT model and batch above, once fully fine-tuned and once with rank-`--lora-rank` adapters (alpha =
2 x rank) on every attention and MLP projection and the base frozen (medkr_jax.models.lora), the same AdamW; the
two `Trainer` steps alternate as above. Peak memory is XLA's memory analysis of each compiled step on one device
(arguments + outputs - donated buffers + temporaries: what the step needs, whatever the backend; CPU reports no
device peak); `lora_time_ratio` and `lora_memory_ratio` are LoRA over full.

Both sides of each comparison run on the CPU with the same number of threads (default 1: on a shared machine
multi-threaded timings swing by 10x, one thread each gives a stable like-for-like ratio). Ends with one JSON
line: the SFT comparison in name/ours/reference/unit/ratio, the GRPO one in the grpo_* fields, the LoRA one in the
lora_* fields (with --lora-only only those, and name "train_step_lora_vs_full").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNIX_VENV = os.path.join(REPO, "bench", ".venv-tunix")
TUNIX_VERSION = "0.1.7"
TUNIX_REQUIREMENTS = ["jaxtyping", "qwix>=0.1.6", "google-metrax>=0.2.3", "omegaconf", "perfetto", "kagglehub",
                      "numba", "tensorflow_datasets", "sentencepiece", "pylatexenc", "python-dotenv", "hf_transfer",
                      "tenacity", "importlib_resources"]

SFT_DIMS = dict(vocab=1024, hidden=256, mlp=512, layers=4, heads=4, kv_heads=2, head_dim=64)
GRPO_DIMS = dict(vocab=512, hidden=64, mlp=128, layers=2, heads=4, kv_heads=2, head_dim=16)
GRPO = dict(prompts_per_step=4, generations=8, max_new_tokens=16, beta=0.04, lr=1e-3, prompt_len=64)


def _threads_from_argv() -> int:
    n = 1
    for i, a in enumerate(sys.argv):
        if a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
        elif a == "--threads" and i + 1 < len(sys.argv):
            n = int(sys.argv[i + 1])
    return n


def _thread_env(n: int) -> None:
    """XLA's CPU thread pool is fixed when jax starts: set it before any import of jax."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


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
    stamps: list[float] = []

    def reward(prompts, completions, answer, **kw):
        stamps.append(time.perf_counter())
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
    periods = np.diff(stamps)[1:]
    print(json.dumps({"samples_per_s": n * g["generations"] / float(np.median(periods)),
                      "step_periods_s": [round(float(p), 4) for p in periods], "wall_s": time.perf_counter() - t0,
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


def matmul_flops(n: int = 1024, iters: int = 8) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)

    @jax.jit
    def chain(x):
        for _ in range(iters):
            x = (x @ a) * (1.0 / n)
        return x

    chain(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        chain(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * iters / best


def _decoder_config(d: dict, **kw):
    from medkr_jax.models.decoder import DecoderConfig

    return DecoderConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["mlp"],
                         num_layers=d["layers"], num_heads=d["heads"], num_kv_heads=d["kv_heads"],
                         head_dim=d["head_dim"], rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
                         **kw)


def sft_steps(batch: dict, threads: int):
    """(our step fn, its parameter count, the PyTorch step fn) on the same model shape and batch."""
    import jax
    import torch
    import transformers
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.train import sft
    from medkr_jax.train.optim import OptimizerSettings, make_optimizer
    from medkr_jax.train.trainer import Trainer

    cfg = _decoder_config(SFT_DIMS)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with parallel.sharding_context(mesh):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    opt = OptimizerSettings(learning_rate=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0)
    tx = make_optimizer(opt, 100)
    trainer = Trainer(model, loss_fn=sft.sft_loss, tx=tx, mesh=mesh)

    def ours():
        m = trainer.update(batch, jax.random.key(0))
        float(m["loss"])  # the loop reads every step's loss (NaN check): the same synchronisation here

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = SFT_DIMS
    tcfg = transformers.LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["mlp"],
                                    num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                                    num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"],
                                    max_position_embeddings=1024, rms_norm_eps=1e-5)
    tmodel = transformers.AutoModelForCausalLM.from_config(tcfg, dtype=torch.float32, attn_implementation="sdpa")
    tmodel.train()
    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(np.asarray(batch["tokens"], np.int64))
    labels = torch.from_numpy(np.asarray(batch["targets"], np.int64))

    def reference():
        logits = tmodel(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return ours, int(n_params), reference


def lora_vs_full(batch: dict, rank: int, steps: int) -> dict:
    """LoRA SFT (rank `rank` on every projection, base frozen) vs full fine-tuning of the SFT model on `batch`:
    median step seconds (interleaved) and the compiled steps' peak bytes; ratios are LoRA over full."""
    import jax
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.models import lora
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.train import sft
    from medkr_jax.train.optim import OptimizerSettings, make_optimizer
    from medkr_jax.train.trainer import Trainer

    cfg = _decoder_config(SFT_DIMS)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    opt = OptimizerSettings(learning_rate=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0)
    key = jax.random.key(0)
    trainers = []
    for r in (0, rank):
        with parallel.sharding_context(mesh):
            model = Decoder(cfg, rngs=nnx.Rngs(0))
        lora.apply_lora(model, lora.LoRASettings(rank=r, alpha=2.0 * r), mesh=mesh)
        trainers.append(Trainer(model, loss_fn=sft.sft_loss, tx=make_optimizer(opt, 100), mesh=mesh))
    memory = [t.step_memory(batch, key)["peak"] for t in trainers]
    fns = [lambda t=t: float(t.update(batch, key)["loss"]) for t in trainers]
    full_s, lora_s = timed_interleaved(fns, steps)
    trained = [sum(x.size for x in jax.tree.leaves(t.params)) for t in trainers]
    return {"lora_rank": rank, "lora_trained_params": int(trained[1]), "full_trained_params": int(trained[0]),
            "lora_step_s": round(lora_s, 5), "full_step_s": round(full_s, 5),
            "lora_time_ratio": round(lora_s / full_s, 3), "lora_peak_bytes": memory[1], "full_peak_bytes": memory[0],
            "lora_memory_ratio": round(memory[1] / memory[0], 3)}


def _print_lora(res: dict) -> None:
    print(f"LoRA r={res['lora_rank']} SFT step {res['lora_step_s'] * 1e3:.1f} ms vs full {res['full_step_s'] * 1e3:.1f}"
          f" ms (ratio {res['lora_time_ratio']}); peak {res['lora_peak_bytes'] / 2**20:.1f} MiB vs "
          f"{res['full_peak_bytes'] / 2**20:.1f} MiB (ratio {res['lora_memory_ratio']}); trained params "
          f"{res['lora_trained_params']:,} vs {res['full_trained_params']:,}")


def timed_interleaved(fns, steps: int) -> list[float]:
    """Median seconds per call of each fn, calls interleaved (same machine load for all) after 2 warm-ups."""
    times = [[] for _ in fns]
    for i in range(steps + 2):
        for j, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if i >= 2:
                times[j].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


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
    from medkr_jax.models.hf import export_decoder
    import jax
    from transformers import AutoTokenizer

    from medkr_jax.jobs import grpo
    from medkr_jax.train.metrics_log import read_metrics

    os.makedirs(work, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    recs, _, _ = grpo_prompts(tok)
    write_records(os.path.join(work, "prompts.jsonl"), recs)
    cfg = _decoder_config(GRPO_DIMS, bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                          pad_token_id=tok.pad_token_id)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
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
    grpo.run(c, mesh=mesh)
    recs = [r for r in read_metrics(c.output_dir) if "loss" in r]
    periods = np.diff([r["time"] for r in recs])[1:]
    rows = GRPO["prompts_per_step"] * GRPO["generations"]
    return {"samples_per_s": rows / float(np.median(periods)),
            "step_periods_s": [round(float(p), 4) for p in periods],
            "response_length": float(np.mean([r["response_length"] for r in recs]))}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after warm-up) per measurement")
    ap.add_argument("--repeats", type=int, default=2, help="alternating GRPO runs per implementation (best kept)")
    ap.add_argument("--setup-tunix", action="store_true", help=f"create {TUNIX_VENV} first")
    ap.add_argument("--skip-tunix", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=16, help="adapter rank of the LoRA vs full SFT comparison")
    ap.add_argument("--lora-only", action="store_true", help="run only the LoRA vs full SFT comparison")
    ap.add_argument("--tunix-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tunix_worker:
        tunix_worker(args.tunix_worker)
        return
    if args.setup_tunix:
        setup_tunix()
    sys.path.insert(0, REPO)

    import jax

    rng = np.random.default_rng(0)
    b, t = 8, 256
    seq = rng.integers(3, SFT_DIMS["vocab"], size=(b, t + 1)).astype(np.int32)
    batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
    lora_res = lora_vs_full(batch, args.lora_rank, args.steps)
    if args.lora_only:
        _print_lora(lora_res)
        print(json.dumps({"name": "train_step_lora_vs_full", **lora_res, "threads": args.threads,
                          "device": jax.devices()[0].platform}))
        return
    ours_fn, n_params, torch_fn = sft_steps(batch, args.threads)
    ours_s, torch_s = timed_interleaved([ours_fn, torch_fn], args.steps)
    tokens = b * t
    d = SFT_DIMS
    flops = 6.0 * n_params * tokens + 12.0 * d["layers"] * b * t * t * d["heads"] * d["head_dim"]
    peak = matmul_flops()
    ours_tps, torch_tps = tokens / ours_s, tokens / torch_s

    with tempfile.TemporaryDirectory() as work:
        from medkr_jax.data.tokenizer import train_bpe_tokenizer

        corpus = [f"Signal {c} {i}: which way? north south east west The answer is {L}."
                  for i in range(50) for c in ("red", "blue", "green", "gold") for L in "ABCD"]
        tok_dir = os.path.join(work, "tokenizer")
        train_bpe_tokenizer(corpus, tok_dir, vocab_size=400, min_frequency=1)
        steps = args.steps + 2
        # alternate the two implementations and keep each one's best run: both see the same machine load
        ours_runs, tunix_runs = [], []
        for r in range(args.repeats):
            ours_runs.append(bench_grpo_ours(os.path.join(work, f"ours{r}"), tok_dir, steps))
            if not args.skip_tunix:
                tunix_runs.append(bench_grpo_tunix(work, tok_dir, steps, args.threads))
        ours_g = max(ours_runs, key=lambda x: x["samples_per_s"])
        ok = [x for x in tunix_runs if "samples_per_s" in x]
        tunix_g = (max(ok, key=lambda x: x["samples_per_s"]) if ok else
                   tunix_runs[-1] if tunix_runs else {"error": "skipped (--skip-tunix)"})

    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), threads: {args.threads}")
    print(f"{'':28s}{'ours':>14s}{'reference':>14s}{'ratio':>8s}")
    print(f"{'SFT step tokens/s':28s}{ours_tps:14.1f}{torch_tps:14.1f}{ours_tps / torch_tps:8.2f}"
          f"   (HF PyTorch; {n_params / 1e6:.2f}M params, batch {b}x{t})")
    tun = tunix_g.get("samples_per_s")
    print(f"{'GRPO step samples/s':28s}{ours_g['samples_per_s']:14.1f}"
          + (f"{tun:14.1f}{ours_g['samples_per_s'] / tun:8.2f}   (tunix {TUNIX_VERSION})" if tun
             else f"{'n/a':>14s}{'':8s}   ({tunix_g.get('error')})"))
    print(f"SFT model FLOP/s {flops / ours_s:.3g} vs matmul peak {peak:.3g} -> peak_fraction "
          f"{flops / ours_s / peak:.3f}")
    _print_lora(lora_res)
    print(json.dumps({
        "name": "train_step_sft_tokens_per_s", "ours": round(ours_tps, 2), "reference": round(torch_tps, 2),
        "unit": "tokens/s", "ratio": round(ours_tps / torch_tps, 3), "peak_fraction": round(flops / ours_s / peak, 4),
        "grpo_ours_samples_per_s": round(ours_g["samples_per_s"], 2),
        "grpo_tunix_samples_per_s": round(tun, 2) if tun else None,
        "grpo_ratio": round(ours_g["samples_per_s"] / tun, 3) if tun else None,
        "grpo_reference_error": tunix_g.get("error"), **lora_res,
        "threads": args.threads, "device": jax.devices()[0].platform,
    }))


if __name__ == "__main__":
    _thread_env(_threads_from_argv())
    main()
