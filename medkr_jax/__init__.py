"""medkr_jax: reasoning vs knowledge in medical LLMs, in JAX/Flax NNX."""
