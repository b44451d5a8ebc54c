"""What every bench/*.py shares: CPU pinning, interleaved timing rounds, the ratios it reports, the load check.

Benchmark method (all scripts):

* Pinning. ``pin(threads_from_argv())`` runs when a script is imported, before jax is: the process is pinned to
  the first ``--threads`` CPUs it may use (XLA sizes its thread pools, the matmul one included, from those CPUs;
  torch gets ``set_num_threads(threads)`` in the same process), and one thread also turns off XLA's
  multi-threaded Eigen. Both sides therefore run on the same cores. jax defaults to its CPU backend
  (``JAX_PLATFORMS=cpu`` unless set): the references are CPU PyTorch. ``pin`` also applies the host memory
  policy of the entry point (``medkr_jax.host_memory.reuse_freed_memory``: freed memory stays in the process),
  so the benchmark measures what ``python -m medkr_jax.main`` runs with; being process-wide, it holds for the
  in-process reference too (and for the GRPO benchmark's tunix worker, which calls ``pin`` as well).
* Separate processes where the heap is shared badly. A reference that allocates gigabytes a step runs in a worker
  process of its own (``RemoteTimer`` here, ``serve`` there), pinned to the same CPUs and driven round by round:
  two frameworks freeing and reallocating multi-GB blocks in one glibc heap fragment it for each other, and the
  next step's block lands on pages never touched before. Measured on a 2-core VM, SmolLM2-135M SFT at 1 x 2,048
  tokens, one thread: our step alone 27.0 s with 0 page faults; the same step right after an in-process PyTorch
  step 39-43 s, with 1.2 million page faults and 11-13 s of system time, round after round; the PyTorch step
  alone 26.5-29 s. A user runs one framework per process, which is what the worker measures.
* Rounds. ``run_rounds`` runs one untimed round of everything first, then every ``Timer`` (ours, the
  reference(s)) once per round and the matmul-peak timers ``peak_calls`` times each, in one order on even rounds
  and the reverse on odd ones, so no side always runs first and every side, the peak included, sees the same
  machine load. Each Timer keeps every round's wall and CPU seconds (CPU = user + system time of the process that
  ran the calls, all threads).
* Ratios (``ratios``), reference time / our time, so > 1 means ours is faster: ``ratio`` is the median of the
  per-round ratios (``ratio_rounds``: each round compares two timings taken moments apart, so a busy moment
  hits both), ``ratio_best`` the best round over the best round (taken separately), ``ratio_cpu`` the median
  CPU seconds of the reference over ours.
* Peak. ``peak_flops`` is the best single call of a jitted JAX and of a PyTorch fp32 square matmul (the better
  framework); ``peak_fraction`` = our best-round FLOP/s over it.
* Bandwidth (decode benchmarks). A decode step reads every weight and the KV cache to produce a few tokens, so
  its roofline is memory bandwidth, not the matmul peak. ``stream_bandwidth`` is the best single call of a jitted
  JAX and of a PyTorch sum over a float32 array larger than this machine's caches (the better framework), timed in
  the same rounds as the peak; ``bandwidth_fraction`` = the bytes our decode step reads per second over it (above
  1 when a step's bytes stay in the CPU's caches between steps).
* Load. ``load_report`` prints the load average and warns when the 1-minute load per core exceeds
  ``LOAD_WARNING_PER_CORE``: timings taken then are not comparable with a quiet machine's. With more than one
  thread it also prints what one thread waking another costs (``wakeup_round_trip_us``: a pipe ping-pong between
  two threads on one CPU and across two). XLA:CPU hands a program's ready operations to the other threads of its
  pool, which sleep when idle, so every hand-off pays a wake-up. On the 2-core VM of the README's tables (its
  kernel halts an idle vCPU at once: ``haltpoll.guest_halt_poll_ns=0``) a round trip takes 6-8 us on one CPU and
  42-49 us across the two, which is why programs of tiny operations (the GRPO benchmark's) run slower on two
  threads than on one there; a machine whose idle CPUs poll before halting pays a few microseconds.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

PEAK_CALLS = 5  # peak matmul calls per timer and round: a quiet call is what the peak means
STREAM_MB = 512  # the streamed array: larger than the last-level caches of the CPUs measured (32 MiB and 260 MiB L3)
LOAD_WARNING_PER_CORE = 1.5


# ------------------------------------------------------------------------------------------------ pinning


def threads_from_argv(argv: list[str] | None = None) -> int:
    """--threads (default 1), read from the command line before argparse runs: it must reach XLA before jax is
    imported."""
    argv = sys.argv if argv is None else argv
    n = 1
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
        elif a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    return n


def pin(threads: int) -> list[int]:
    """Pin this process to `threads` CPUs (the first it may use) for XLA and torch alike; returns those CPUs.

    Call before jax is imported (XLA reads the affinity and XLA_FLAGS once, when it starts). Idempotent.
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from medkr_jax.host_memory import reuse_freed_memory

    reuse_freed_memory()  # before XLA starts its threads, as the entry point does
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
    flag = "--xla_cpu_multi_thread_eigen=false"
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1 and flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    import torch  # the reference framework; imported here so its thread count is set with the affinity

    torch.set_num_threads(threads)
    return sorted(os.sched_getaffinity(0))


def device_line(threads: int) -> str:
    """One line naming the backend, the threads of both sides and the CPUs they are pinned to."""
    import platform

    import jax
    import torch

    return (f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}, {platform.machine()}), threads "
            f"{threads} (torch {torch.get_num_threads()}, CPUs {sorted(os.sched_getaffinity(0))} of "
            f"{os.cpu_count()}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


# ------------------------------------------------------------------------------------------- SFT steps


def decoder_config(dims: dict, *, max_positions: int = 1024, **kw):
    """Our DecoderConfig of a benchmark model's `dims` (vocab, hidden, mlp, layers, heads, kv_heads, head_dim;
    optional rope_theta, default 10,000, and tied, default False); `kw` sets further fields (token ids)."""
    from medkr_jax.models.decoder import DecoderConfig

    return DecoderConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["mlp"],
                         num_layers=dims["layers"], num_heads=dims["heads"], num_kv_heads=dims["kv_heads"],
                         head_dim=dims["head_dim"], rope_theta=dims.get("rope_theta", 10000.0), rms_norm_eps=1e-5,
                         tie_word_embeddings=dims.get("tied", False), max_position_embeddings=max_positions, **kw)


def llama_config(dims: dict, *, max_positions: int = 1024):
    """transformers' LlamaConfig of the same `dims` as `decoder_config`: the PyTorch reference's model."""
    import transformers

    return transformers.LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"],
                                    intermediate_size=dims["mlp"], num_hidden_layers=dims["layers"],
                                    num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                                    head_dim=dims["head_dim"], rope_theta=dims.get("rope_theta", 10000.0),
                                    rms_norm_eps=1e-5, tie_word_embeddings=dims.get("tied", False),
                                    max_position_embeddings=max_positions)


def sft_batch(b: int, t: int, vocab: int, prompt_fraction: float = 0.0) -> dict:
    """A random [b, t] next-token batch over a `vocab`-token vocabulary; every target counted, or with
    `prompt_fraction` > 0 the first that fraction of each row taken as the prompt (its targets not scored)."""
    seq = np.random.default_rng(0).integers(3, vocab, size=(b, t + 1)).astype(np.int32)
    loss_mask = np.ones((b, t), np.float32)
    loss_mask[:, :int(prompt_fraction * t)] = 0.0
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32), "loss_mask": loss_mask}


def sft_step_flops(cfg, n_params: int, b: int, t: int, *, scored: int) -> float:
    """Model FLOPs of one SFT step (forward + backward, 3 x the forward's matmuls) on b x t tokens of which `scored`
    reach the loss: 6 x the layers' parameters per token, 6 x vocab x hidden per scored token (the LM head; the
    embedding lookup is no matmul), and causal attention at half the T x T score matrix (the convention of
    MaxText's MFU), 6 x layers x heads x head_dim x T^2 per row. Work a side computes and discards (masked
    score blocks, the LM head on unscored positions) is not counted, so both sides' rates are comparable."""
    embed = cfg.vocab_size * cfg.hidden_size
    layer_params = n_params - embed * (1 if cfg.tie_word_embeddings else 2) - cfg.hidden_size  # - the final norm
    return (6.0 * layer_params * b * t + 6.0 * embed * scored
            + 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * b * t * t)


def sft_trainer(model, mesh):
    """Our SFT step as the benchmarks run it: medkr_jax's Trainer of the SFT loss with the optimizer
    `torch_sft_step` gives the reference, AdamW at a constant lr 1e-4 and global-norm clipping at 1.0."""
    from medkr_jax.train import sft
    from medkr_jax.train.optim import OptimizerSettings, make_optimizer
    from medkr_jax.train.trainer import Trainer

    opt = OptimizerSettings(learning_rate=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0)
    return Trainer(model, loss_fn=sft.sft_loss, tx=make_optimizer(opt, 100), mesh=mesh)


def torch_sft_step(model, ids, labels, autocast: Callable[[], object] | None = None) -> Callable[[], None]:
    """The PyTorch reference's SFT step on a transformers causal LM, as a user writes it: cross-entropy of the
    logits against `labels` (-100: not scored; HF computes those logits anyway), backward, global-norm clipping at
    1.0, AdamW (lr 1e-4, no weight decay), ending on ``loss.item()``. `autocast`: a context-manager factory around
    the forward and the loss (e.g. torch.autocast to bfloat16), None for none."""
    import contextlib

    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    context = autocast or contextlib.nullcontext

    def step() -> None:
        with context():
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


# ------------------------------------------------------------------------------------- generation workloads


def add_workload_args(ap, *, prompts: int = 256, batch: int = 16) -> None:
    """The heavy-tailed generation workload's command-line options (bench/engine.py, bench/accelerator_generate.py)."""
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--median-new", type=float, default=48.0)
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of max_new_tokens")
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--batch", type=int, default=batch, help="engine slots = static and HF batch size")
    ap.add_argument("--seed", type=int, default=0)


def heavy_tailed_workload(args, vocab: int) -> tuple[list[list[int]], np.ndarray]:
    """(prompts, per-prompt max_new_tokens): ``args.prompts`` prompts of random tokens in [3, vocab), lengths
    uniform in [min_prompt, max_prompt], each with its own max_new_tokens from a log-normal (median ``median_new``,
    sigma ``sigma``) clipped to [1, max_new]: a few rows run ~10x longer than most."""
    rng = np.random.default_rng(args.seed)
    lens = rng.integers(args.min_prompt, args.max_prompt + 1, size=args.prompts)
    prompts = [rng.integers(3, vocab, int(n)).tolist() for n in lens]
    limits = np.clip(np.round(rng.lognormal(np.log(args.median_new), args.sigma, size=args.prompts)), 1,
                     args.max_new).astype(np.int64)
    return prompts, limits


def length_sorted_batches(prompts, batch: int) -> list[np.ndarray]:
    """Prompt indices sorted by length, in batches of `batch`: how a user batches a static generate."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def hf_generate_batches(torch_model, prompts, limits, batches, device=None) -> Callable[[], list[np.ndarray]]:
    """fn() -> the new tokens of HF ``generate`` (KV cache, greedy, left padding) on each of `batches`, each batch
    to its longest row's limit, on `device` (a torch.device; None: the CPU)."""
    import torch

    inputs = []
    for b in batches:
        width = max(len(prompts[i]) for i in b)
        ids = torch.zeros((len(b), width), dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for row, i in enumerate(b):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        inputs.append((ids.to(device), mask.to(device), width, int(limits[b].max())))

    def run() -> list[np.ndarray]:
        outs = []
        for ids, mask, width, new in inputs:
            with torch.no_grad():
                out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                           min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(out[:, width:].cpu().numpy())
        return outs

    return run


def never_stopping(cfg, cls=None, **kw):
    """A sampler (``cls``, default the engine ``Sampler``) whose stop id is one no model emits, so every row
    generates exactly its own max_new_tokens; `kw`: further sampler settings (e.g. cache_dtype)."""
    from medkr_jax.sampling import Sampler

    return (cls or Sampler)(cfg, pad_id=0, stop_ids=(cfg.vocab_size,), **kw)


def generation_sides(model, cfg, torch_model, prompts, limits, batch: int, device=None):
    """The three sides of the heavy-tailed generation benchmarks on `prompts` with per-row `limits` (no row stops
    early: the stop id is one no model emits): ({"engine", "static", "hf"} -> fn(), the engine, the sorted batches).
    engine: our ``Sampler`` with `batch` slots; static: ``StaticSampler`` on the length-sorted batches, each to its
    longest row's limit; hf: ``hf_generate_batches`` on the same batches, on `device`."""
    from medkr_jax.sampling import StaticSampler

    batches = length_sorted_batches(prompts, batch)
    engine = never_stopping(cfg)
    static = never_stopping(cfg, StaticSampler)

    def run_engine():
        return engine.generate(model, prompts, max_new_tokens=limits, batch_size=batch)

    def run_static():
        return [static.generate(model, [prompts[i] for i in b], max_new_tokens=int(limits[b].max()),
                                batch_size=batch) for b in batches]

    hf = hf_generate_batches(torch_model, prompts, limits, batches, device)
    return {"engine": run_engine, "static": run_static, "hf": hf}, engine, batches


def warm_up_generation(sides: Mapping[str, Callable[[], object]], batches, limits) -> tuple[dict, dict[str, float]]:
    """One call of each of `generation_sides` (compiles; its time printed): (each side's output, the share of the
    useful tokens on which the static path and HF agree with the engine, ``greedy_match``)."""
    first = {}
    for k, fn in sides.items():
        t0 = time.perf_counter()
        first[k] = fn()
        print(f"{k} warm-up call: {time.perf_counter() - t0:.1f}s", flush=True)
    return first, greedy_match(first["engine"].tokens, {"static": [o.tokens for o in first["static"]],
                                                        "hf": first["hf"]}, batches, limits)


def count_engine_programs(model, cfg, prompts, limits, batch: int):
    """A fresh engine run once over the whole workload: its ``num_compiles`` / ``num_layout_compiles`` are the
    programs one whole evaluation over these mixed lengths compiles."""
    counter = never_stopping(cfg)
    counter.generate(model, prompts, max_new_tokens=limits, batch_size=batch)
    return counter


def print_generation_table(args, name: str, cfg, useful: int, timers: Mapping[str, Timer], match, counter,
                           precision: str = "") -> tuple[dict, dict, dict]:
    """The generation benchmarks' table: the model and workload, each side's best wall / CPU seconds and tokens/s,
    the engine's ratios to HF and to the static path, the greedy agreement (`precision` names its dtype) and the
    programs compiled. Returns (tokens/s per side, the ratios to HF, the ratios to static)."""
    tps = {k: useful / t.wall for k, t in timers.items()}
    cmp = ratios(timers["engine"], timers["hf"])
    cmp_static = ratios(timers["engine"], timers["static"], key="ratio_static")
    print(f"model: {name}, {cfg.num_params / 1e6:.1f}M params; {args.prompts} prompts of {args.min_prompt}.."
          f"{args.max_prompt} tokens, max_new_tokens log-normal (median {args.median_new:g}, sigma {args.sigma:g}, "
          f"max {args.max_new}): {useful} useful tokens; batch / slots {args.batch}, greedy; {args.repeats} rounds")
    print(f"{'':28s}{'best wall (s)':>14s}{'CPU (s)':>10s}{'tokens/s':>12s}")
    for k, label in (("engine", "engine (continuous batching)"), ("static", "static batches (before)"),
                     ("hf", "HF generate, sorted batches")):
        print(f"{label:28s}{timers[k].wall:14.2f}{timers[k].cpu:10.2f}{tps[k]:12.1f}")
    print(ratio_line("engine / HF", cmp))
    print(ratio_line("engine / static", cmp_static, key="ratio_static"))
    print(f"greedy tokens equal to the engine's{f' ({precision})' if precision else ''}: static "
          f"{100 * match['static']:.1f}%, HF {100 * match['hf']:.1f}%")
    print(f"compiled programs for the whole run: {counter.num_compiles} (+ {counter.num_layout_compiles} laying out "
          f"the LM head)")
    return tps, cmp, cmp_static


def accelerator_torch_device(dtype: str):
    """PyTorch's device for the accelerator benchmarks ("cuda", else the CPU); with float32, TF32 matmuls on both
    sides where the hardware has them (jax's "tensorfloat32" default precision, torch's allow_tf32)."""
    import jax
    import torch

    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def greedy_match(engine_tokens, others: Mapping[str, list], batches, limits) -> dict[str, float]:
    """Fraction of the useful tokens (each row's first limit) on which each of `others` (per batch, rows in the
    batch's order: a static path's token arrays) agrees with the engine's (rows in prompt order)."""
    same = dict.fromkeys(others, 0)
    for bi, b in enumerate(batches):
        for row, i in enumerate(b):
            n = int(limits[i])
            for k, outs in others.items():
                same[k] += int((np.asarray(outs[bi])[row, :n] == engine_tokens[i, :n]).sum())
    return {k: v / int(limits.sum()) for k, v in same.items()}


# ------------------------------------------------------------------------------------------------- timing


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system (robust to other processes sharing the cores)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Seconds per call of `fn` (averaged over `iters` calls per round), wall and CPU, every round kept.
    `flops`: the FLOPs of one call, where a FLOP rate is reported; `nbytes`: the bytes one call reads, where a
    bandwidth is reported."""

    def __init__(self, fn: Callable[[], object] | None = None, iters: int = 1, flops: float | None = None,
                 nbytes: float | None = None):
        self.fn, self.iters, self.flops, self.nbytes = fn, iters, flops, nbytes
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def round(self) -> float:
        """Time one round of `iters` calls; returns its wall seconds per call."""
        c, t = cpu_seconds(), time.perf_counter()
        for _ in range(self.iters):
            self.fn()
        self.add((time.perf_counter() - t) / self.iters, (cpu_seconds() - c) / self.iters)
        return self.walls[-1]

    def warm(self) -> None:
        """One round's calls, not recorded."""
        for _ in range(self.iters):
            self.fn()

    def add(self, wall: float, cpu: float) -> None:
        """Record a round timed elsewhere (e.g. step periods read from a run's own log)."""
        self.walls.append(float(wall))
        self.cpus.append(float(cpu))

    @property
    def wall(self) -> float:
        """Best (minimum) wall seconds per call."""
        return min(self.walls)

    @property
    def cpu(self) -> float:
        """Best (minimum) CPU seconds per call."""
        return min(self.cpus)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpus)


REMOTE_TAG = "@@timer"  # prefix of the lines a `serve` worker answers with (other output of the worker passes by)


class RemoteTimer(Timer):
    """A Timer whose calls run in a worker process started from `argv`, which must end in `serve(fn)` (see the
    module docstring for why). The worker inherits this process's CPU affinity and environment, so it runs pinned
    to the same CPUs; it times its own calls (wall and CPU seconds of its process), so the pipe's round trip is not
    counted. `call` runs calls without recording them (warm-up); `round` records one round as `Timer.round` does."""

    def __init__(self, argv: list[str], iters: int = 1, flops: float | None = None, nbytes: float | None = None):
        super().__init__(None, iters, flops, nbytes)
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._answer("ready")

    def _answer(self, what: str) -> list[str]:
        for line in self.proc.stdout:
            if line.startswith(REMOTE_TAG):
                return line.split()[1:]
            sys.stdout.write(line)  # the worker's own output
        raise RuntimeError(f"benchmark worker exited with {self.proc.wait()} before answering {what!r}: "
                           f"{' '.join(self.argv)}")

    def call(self, n: int = 1) -> tuple[float, float]:
        """Run `n` calls in the worker: (wall, CPU) seconds of all `n` together."""
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        wall, cpu = self._answer(f"{n} calls")
        return float(wall), float(cpu)

    def warm(self) -> None:
        self.call(self.iters)

    def round(self) -> float:
        wall, cpu = self.call(self.iters)
        self.add(wall / self.iters, cpu / self.iters)
        return self.walls[-1]

    def close(self) -> None:
        """End the worker (it exits when its input closes)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def serve(fn: Callable[[], object]) -> None:
    """The worker side of `RemoteTimer`: answer "ready", then for each line n read from stdin run `fn` n times and
    answer their wall and CPU seconds; return when stdin closes."""
    print(REMOTE_TAG, "ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        c, t = cpu_seconds(), time.perf_counter()
        for _ in range(n):
            fn()
        print(REMOTE_TAG, time.perf_counter() - t, cpu_seconds() - c, flush=True)


def run_rounds(timers: Mapping[str, Timer], repeats: int, peak: Mapping[str, Timer] | None = None,
               peak_calls: int = PEAK_CALLS, warmup: int = 1) -> None:
    """`warmup` untimed rounds (every timer and peak timer once), then `repeats` interleaved rounds: each timer once
    and each peak timer `peak_calls` times per round, the order reversed on every other round.

    The untimed round comes after every array the rounds use exists (the peak's and the stream's among them): an
    array allocated after a side's own warm-up can take the place its step's block had in the heap, and the next
    step then pages its block in afresh, once."""
    for _ in range(warmup):
        for t in [*timers.values(), *(peak or {}).values()]:
            t.warm()
    order = [(t, 1) for t in timers.values()] + [(t, peak_calls) for t in (peak or {}).values()]
    for r in range(repeats):
        for t, calls in order if r % 2 == 0 else order[::-1]:
            for _ in range(calls):
                t.round()


def peak_timers(n: int, dtype: str = "float32", device=None) -> dict[str, Timer]:
    """Timers of a jitted JAX and a PyTorch [n, n] x [n, n] matmul in `dtype`, warmed up (see `peak_flops`): JAX
    on its default device, PyTorch on `device` (a torch.device; None: the CPU), synchronised when that is a GPU."""
    import jax  # after pin(): jax must not start before the affinity and XLA_FLAGS are set
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ta = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    on_gpu = device is not None and torch.device(device).type == "cuda"

    def torch_mm():
        with torch.inference_mode():
            torch.mm(ta, ta)
        if on_gpu:
            torch.cuda.synchronize()

    torch_mm()
    flops = 2.0 * n ** 3
    return {"jax_mm": Timer(lambda: mm(a).block_until_ready(), flops=flops), "torch_mm": Timer(torch_mm, flops=flops)}


def peak_flops(timers: Mapping[str, Timer]) -> tuple[float, float]:
    """This machine's matmul peak (in the timers' dtype) from `peak_timers`' rounds: (FLOP/s of the best call,
    FLOP per CPU-second of the best call), each the better framework of the two."""
    return (max(t.flops / t.wall for t in timers.values()), max(t.flops / t.cpu for t in timers.values()))


def peak_line(timers: Mapping[str, Timer], dtype: str = "fp32") -> str:
    """'matmul peak fp32 ...': the peak (of `peak_timers` in `dtype`) and each framework's best call."""
    peak, peak_cpu = peak_flops(timers)
    each = ", ".join(f"{k.removesuffix('_mm')} {t.flops / t.wall / 1e9:.1f}" for k, t in timers.items())
    return f"matmul peak {dtype} {peak / 1e9:.1f} GFLOP/s ({each}); {peak_cpu / 1e9:.1f} GFLOP per CPU-second"


def stream_timers(mb: int = STREAM_MB) -> dict[str, Timer]:
    """Timers of a jitted JAX and a PyTorch sum over one float32 array of `mb` MiB, warmed up (see
    `stream_bandwidth`). A sum reads each byte once and its arithmetic is far below the machine's, so its rate is
    the rate at which one pass streams memory (measured here on 1 thread: XLA 16.1, torch 15.1, numpy's pairwise
    sum 9.1 GB/s)."""
    import jax  # after pin()
    import jax.numpy as jnp
    import torch

    n = mb * 2**20 // 4
    host = np.ones(n, np.float32)
    a = jnp.asarray(host)
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    ta = torch.from_numpy(host)
    ta.sum()
    nbytes = 4.0 * n
    return {"jax_read": Timer(lambda: total(a).block_until_ready(), nbytes=nbytes),
            "torch_read": Timer(lambda: ta.sum(), nbytes=nbytes)}


def stream_bandwidth(timers: Mapping[str, Timer]) -> float:
    """This machine's streaming read bandwidth (bytes/s) from `stream_timers`' rounds: the best call of the
    better framework."""
    return max(t.nbytes / t.wall for t in timers.values())


def stream_line(timers: Mapping[str, Timer]) -> str:
    """'streaming read ... GB/s (jax ..., torch ...)': the bandwidth and each framework's best call."""
    each = ", ".join(f"{k.removesuffix('_read')} {t.nbytes / t.wall / 1e9:.1f}" for k, t in timers.items())
    mib = next(iter(timers.values())).nbytes / 2**20
    return f"streaming read {stream_bandwidth(timers) / 1e9:.1f} GB/s ({each}; sums over {mib:.0f} MiB of float32)"


# ------------------------------------------------------------------------------------------------ results


def ratios(ours: Timer, ref: Timer, key: str = "ratio") -> dict:
    """Reference time / our time (> 1: ours is faster) as JSON fields named from `key`:

    key            the median of the per-round ratios (round i of ref over round i of ours);
    key_best       best round of ref over best round of ours, each taken separately;
    key_cpu        median CPU seconds of ref over median CPU seconds of ours (medians, not bests: CPU time
                   leaves out waiting for a busy core, and the median keeps one-off stalls out of either side);
    key_rounds     the per-round ratios.
    """
    if not ours.walls or len(ours.walls) != len(ref.walls):
        raise ValueError(f"{key}: ours and the reference need the same number (> 0) of rounds, got "
                         f"{len(ours.walls)} and {len(ref.walls)}")
    rounds = [r / o for r, o in zip(ref.walls, ours.walls)]
    return {key: round(statistics.median(rounds), 3), f"{key}_best": round(ref.wall / ours.wall, 3),
            f"{key}_cpu": round(ref.median_cpu / ours.median_cpu, 3), f"{key}_rounds": [round(x, 3) for x in rounds]}


def ratio_line(label: str, r: dict, key: str = "ratio") -> str:
    """'label: 1.23x (median of rounds 1.20, 1.25, 1.31), best/best 1.25x, 1.10x CPU time'."""
    return (f"{label}: {r[key]:.2f}x (median of rounds {', '.join(f'{x:.2f}' for x in r[f'{key}_rounds'])}), "
            f"best/best {r[f'{key}_best']:.2f}x, {r[f'{key}_cpu']:.2f}x CPU time")


def wakeup_round_trip_us(cpu_a: int, cpu_b: int, n: int = 2000) -> float:
    """Microseconds for a thread on ``cpu_a`` to wake a thread blocked on ``cpu_b`` and be woken back by it (a
    one-byte ping-pong over two pipes, mean of ``n`` round trips): the cost XLA:CPU pays each time it hands work
    to a sleeping thread of its pool and waits for the result. The calling thread's CPU affinity is restored."""
    to_echo, from_echo = os.pipe(), os.pipe()

    def echo() -> None:
        try:
            os.sched_setaffinity(0, {cpu_b})
        except OSError:
            os.read(to_echo[0], 1)
            os.write(from_echo[1], b"!")  # answers the first ping: the caller raises instead of waiting forever
            return
        for _ in range(n + 1):
            os.read(to_echo[0], 1)
            os.write(from_echo[1], b"x")

    saved = os.sched_getaffinity(0)
    thread = threading.Thread(target=echo, daemon=True)
    try:
        os.sched_setaffinity(0, {cpu_a})
        thread.start()
        os.write(to_echo[1], b"x")  # one untimed round trip: the echo thread is running and pinned
        if os.read(from_echo[0], 1) != b"x":
            thread.join()
            raise OSError(f"wakeup_round_trip_us: cannot pin a thread to CPU {cpu_b}")
        start = time.perf_counter()
        for _ in range(n):
            os.write(to_echo[1], b"x")
            os.read(from_echo[0], 1)
        elapsed = time.perf_counter() - start
        thread.join()
    finally:
        os.sched_setaffinity(0, saved)
        for fd in (*to_echo, *from_echo):
            os.close(fd)
    return elapsed / n * 1e6


def load_report(threads: int | None) -> dict:
    """Print the load average (with a WARNING line when the 1-minute load per core exceeds
    LOAD_WARNING_PER_CORE) and, for more than one thread on two or more CPUs, the thread wake-up round trip on one
    CPU and across two (``wakeup_round_trip_us``); returns the JSON fields load_avg (1-minute), load_warning and
    then wakeup_us_one_cpu, wakeup_us_across_cpus. ``threads`` None: a run not pinned to CPUs (an accelerator's
    host), the load alone."""
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    per_core = load[0] / cores
    warning = per_core > LOAD_WARNING_PER_CORE
    print(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) on {cores} cores "
          f"({per_core:.2f} per core)" + ("" if threads is None else f"; this run used {threads} thread(s)"))
    if warning:
        print(f"WARNING: 1-minute load {per_core:.2f} per core > {LOAD_WARNING_PER_CORE}: the machine is busy, "
              f"timings are not comparable with a quiet machine's (the per-round ratios are the robust figure)")
    result = {"load_avg": round(load[0], 2), "load_warning": warning}
    cpus = sorted(os.sched_getaffinity(0))
    if threads is not None and threads > 1 and len(cpus) > 1:
        one, across = wakeup_round_trip_us(cpus[0], cpus[0]), wakeup_round_trip_us(cpus[0], cpus[1])
        print(f"thread wake-up round trip: {one:.1f} us on CPU {cpus[0]}, {across:.1f} us across CPUs {cpus[0]} and "
              f"{cpus[1]} (XLA:CPU pays a wake-up each time it hands work to another thread of its pool)")
        result.update(wakeup_us_one_cpu=round(one, 1), wakeup_us_across_cpus=round(across, 1))
    return result
