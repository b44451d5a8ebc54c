"""The jitted KV-cache sampler (sampler.py) and its token selection (ops.py)."""

from medkr_jax.sampling.ops import first_argmax, sample_next, token_logprob
from medkr_jax.sampling.sampler import DEFAULT_GEN_BUCKETS, DEFAULT_PROMPT_BUCKETS, SampleOutput, Sampler

__all__ = ["Sampler", "SampleOutput", "sample_next", "first_argmax", "token_logprob", "DEFAULT_PROMPT_BUCKETS",
           "DEFAULT_GEN_BUCKETS"]
