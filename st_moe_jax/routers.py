"""Flax router modules: token representations in, float32 router logits out.

The routing decision itself (top-k with capacity, experts-choose, ...) is pure math in `routing.py`;
a router only scores experts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from st_moe_jax.layers import Dense

Array = jax.Array


class RouterWeights(nn.Module):
  """The router projection W [H, E], float32, no bias (flaxformer's init: Normal(0, 0.02))."""
  num_experts: int

  @nn.compact
  def __call__(self, token_inputs: Array) -> Array:
    return Dense(self.num_experts, ('embed', 'unmodeled'), jnp.float32,
                 nn.initializers.normal(stddev=2e-2), name='w')(token_inputs)


class LinearRouter(nn.Module):
  """logits = jitter(x) · W, computed in float32 whatever the activations' dtype ("selective precision").

  Attributes:
    num_experts: E.
    jitter_noise: ε of the multiplicative jitter x ⊙ U(1−ε, 1+ε), applied only when apply_jitter is
      True (training). Draws from the 'dropout' RNG stream.
  """
  num_experts: int
  jitter_noise: float = 0.0

  @nn.compact
  def __call__(self, token_inputs: Array, *, apply_jitter: bool = False) -> Array:
    """token_inputs: <float>[G, T, H] -> <float32>[G, T, E] logits."""
    if not jnp.issubdtype(token_inputs.dtype, jnp.floating):
      raise TypeError(f'Router inputs must be floating point, got dtype {token_inputs.dtype}.')
    x = token_inputs.astype(jnp.float32)
    if apply_jitter and self.jitter_noise > 0:
      x = x * jax.random.uniform(self.make_rng('dropout'), x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    return RouterWeights(self.num_experts, name='router_weights')(x)
