"""Flax router modules: token representations in, float32 router logits out.

LinearRouter is ST-MoE's per-layer router; RecurrentRouter + RecurrentRouterCell are RMoE's layerwise
recurrent router (a GRU over depth shared by a stack's MoE layers).

The routing decision itself (top-k with capacity, experts-choose, ...) is pure math in `routing.py`;
a router only scores experts.
"""

from typing import Optional

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


# ---------------------------------------------------------------------------------------------------------
# RMoE: the layerwise recurrent router (docs/seed_methods.md §2). Depth is the "time" axis: one cell, shared by
# every MoE layer of a stack, carries a per-token state from layer to layer. It never recurs over sequence
# positions, so it is causal and parallel over tokens.

RECURRENT_CELLS = ('gru', 'rnn')
RECURRENT_STATE_MODES = ('pass', 'detach', 'none')


# Fan-in init (truncated normal, variance 1/fan_in) for P_l, the cell and G_l, not the paper's N(0, 0.02):
# through three products of 0.02-scale weights the logits start at std ~0.008 (p = 128, H = 256) where the
# linear router's are ~0.3. A router that flat ranks experts by the part of the logits every token shares, so
# most tokens pick the same few; and with probabilities near 1/E the load-balancing loss E·Σ f_i·P_i ≈ Σ f_i
# cannot see the imbalance. Measured (the router study's model, 300 steps): with N(0, 0.02) the tokens dropped
# rose to 56% by step 175 (expert usage 0.25); with fan-in init they peaked at 18% and were 0 by step 275
# (usage 0.77). Fan-in logits start at std ~0.35, as the linear router's.
_FAN_IN = nn.initializers.lecun_normal()


class RecurrentRouterCell(nn.Module):
  """The shared cell of RMoE, float32: torch.nn.GRUCell's "reset-after" form (gate order r, z, n).

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)
    u  = σ(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − u) ⊙ n + u ⊙ h

  Parameters: `input_kernel` / `hidden_kernel` <float32>[p, 3p] and `input_bias` / `hidden_bias` [3p], i.e.
  six p×p matrices and six p-vectors (6p² + 6p). cell='rnn' (the paper's ablation) keeps only the n-row:
  h' = tanh(W_in x + b_in + W_hn h + b_hn), 2p² + 2p parameters.

  Weights start from the fan-in init (_FAN_IN, above), biases from zero (our choice).

  Attributes:
    features: p, the input and state size.
    cell: 'gru' or 'rnn'.
  """
  features: int
  cell: str = 'gru'

  @nn.compact
  def __call__(self, inputs: Array, state: Array) -> Array:
    """inputs, state: <float32>[..., p] -> new state <float32>[..., p]."""
    p = self.features
    rows = 3 if self.cell == 'gru' else 1
    kernel = lambda name: self.param(name, nn.with_logical_partitioning(_FAN_IN, ('unmodeled', None)),
                                     (p, rows * p), jnp.float32)
    bias = lambda name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ('unmodeled',)),
                                   (rows * p,), jnp.float32)
    # Biases [rows·p] broadcast over the leading axes explicitly (no implicit rank promotion).
    gi = inputs.astype(jnp.float32) @ kernel('input_kernel')  # [..., rows·p]
    gi = gi + jax.lax.broadcast_to_rank(bias('input_bias'), gi.ndim)
    gh = state.astype(jnp.float32) @ kernel('hidden_kernel')
    gh = gh + jax.lax.broadcast_to_rank(bias('hidden_bias'), gh.ndim)
    if self.cell == 'rnn':
      return jnp.tanh(gi + gh)
    i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(i_r + h_r)
    u = jax.nn.sigmoid(i_z + h_z)
    n = jnp.tanh(i_n + r * h_n)
    return (1.0 - u) * n + u * state


class RecurrentRouter(nn.Module):
  """One MoE layer's part of RMoE: x' = P_l x,  h_l = cell(x', h_{l−1}),  logits = G_l h_l.

  P_l `input_projection/kernel` <float32>[H, p] and G_l `output_projection/kernel` <float32>[p, E] belong to
  the layer, no bias, fan-in init (_FAN_IN); the cell is shared (created by the stack, passed in). Per layer
  that is p·(H + E) parameters, so a stack with S MoE layers has S·p·(H + E) + 6p² + 6p router parameters
  (GRU), against S·H·E for linear routers (RMoE paper, Table 1: 0.47M vs 0.04M).

  Attributes:
    num_experts: E.
    cell: the stack's shared RecurrentRouterCell (p = cell.features).
    jitter_noise: ε of the multiplicative input jitter (training only, 'dropout' RNG), as LinearRouter.
    state_mode: 'pass' (RMoE: the state is not detached, gradient flows down through depth), or the
      paper's ablations 'detach' (stop-gradient on h_{l−1}) and 'none' (h_{l−1} := 0, "NP").
  """
  num_experts: int
  cell: nn.Module
  jitter_noise: float = 0.0
  state_mode: str = 'pass'

  @nn.compact
  def __call__(self, token_inputs: Array, state: Optional[Array] = None, *,
               apply_jitter: bool = False) -> tuple[Array, Array]:
    """Scores experts and advances the routing state.

    Args:
      token_inputs: <float>[..., H], the MoE-block input (the tensor the experts see).
      state: <float32>[..., p] from the previous MoE layer; None at a stack's first MoE layer (h_0 = 0).
      apply_jitter: training mode.

    Returns:
      (logits <float32>[..., E], new state <float32>[..., p]).
    """
    if not jnp.issubdtype(token_inputs.dtype, jnp.floating):
      raise TypeError(f'Router inputs must be floating point, got dtype {token_inputs.dtype}.')
    p = self.cell.features
    x = token_inputs.astype(jnp.float32)  # selective precision, as the linear router
    if apply_jitter and self.jitter_noise > 0:
      x = x * jax.random.uniform(self.make_rng('dropout'), x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    if state is None or self.state_mode == 'none':
      state = jnp.zeros(x.shape[:-1] + (p,), jnp.float32)
    elif self.state_mode == 'detach':
      state = jax.lax.stop_gradient(state)
    projected = Dense(p, ('embed', 'unmodeled'), jnp.float32, _FAN_IN, name='input_projection')(x)  # [..., p]
    state = self.cell(projected, state)
    logits = Dense(self.num_experts, ('unmodeled', None), jnp.float32, _FAN_IN,
                   name='output_projection')(state)
    return logits, state
