"""Generation: the continuous-batching engine (engine.py: ``Sampler``, with its programs, scheduler and thinking
budgets), the static-batch reference (static.py: ``StaticSampler``) and token selection (ops.py)."""

from medkr_jax.sampling.base import DEFAULT_GEN_BUCKETS, DEFAULT_PROMPT_BUCKETS, SampleOutput
from medkr_jax.sampling.engine import RunStats, Sampler
from medkr_jax.sampling.ops import first_argmax, sample_next, token_logprob
from medkr_jax.sampling.scheduler import Finished
from medkr_jax.sampling.static import StaticSampler
from medkr_jax.sampling.thinking import ThinkingBudget

__all__ = ["Sampler", "RunStats", "StaticSampler", "SampleOutput", "Finished", "ThinkingBudget", "sample_next",
           "first_argmax", "token_logprob", "DEFAULT_PROMPT_BUCKETS", "DEFAULT_GEN_BUCKETS"]
