"""The sparse MoE feed-forward layer: group tokens → route → dispatch → experts → combine.

Routing math lives in `routing.py`, buffer movement in `dispatch.py`, the router in `routers.py`.
"""

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from st_moe_jax import dispatch as dispatch_lib
from st_moe_jax import routing
from st_moe_jax.layers import MlpBlock
from st_moe_jax.routers import LinearRouter

Array = jax.Array

ROUTING_METHODS = ('tokens_choose', 'experts_choose')
METRIC_NAMES = ('auxiliary_loss', 'router_z_loss', 'fraction_tokens_left_behind', 'expert_usage',
                'router_confidence')


def num_groups_for(num_tokens: int, max_group_size: int, multiple: int) -> Optional[int]:
  """Smallest G ≥ num_tokens / max_group_size that divides num_tokens and is a multiple of `multiple`.

  None if there is none (num_tokens not a multiple of `multiple`).
  """
  first = max(math.ceil(num_tokens / max_group_size), 1)
  first = math.ceil(first / multiple) * multiple
  for g in range(first, num_tokens + 1, multiple):
    if num_tokens % g == 0:
      return g
  return None


def plan_groups(batch: int, length: int, max_group_size: int, multiple: int,
                strict: bool = False) -> tuple[int, int, int]:
  """How to cut batch × length tokens into groups (routing.md §5).

  Returns:
    (num_groups, padded_batch, padded_length). When no grouping fits, the batch or the length is padded,
    whichever needs fewer padding tokens (ties: length).

  Raises:
    ValueError in strict mode when the tokens cannot be cut into groups of exactly max_group_size.
  """
  if max_group_size < 1:
    raise ValueError(f'max_group_size must be >= 1, got {max_group_size}.')
  num_tokens = batch * length
  if strict:
    g = num_tokens // max_group_size
    if num_tokens % max_group_size or g % multiple:
      raise ValueError(
          f'strict_group_size: {batch}x{length} = {num_tokens} tokens cannot be cut into groups of exactly '
          f'max_group_size={max_group_size} tokens with the number of groups a multiple of {multiple} '
          f'(experts x expert replicas). Change the batch size or sequence length, change max_group_size, '
          f'or set strict_group_size=False to let the layer pick a group size.')
    return g, batch, length
  g = num_groups_for(num_tokens, max_group_size, multiple)
  if g is not None:
    return g, batch, length
  step_length = multiple // math.gcd(multiple, batch)  # length multiple making batch·length divisible
  step_batch = multiple // math.gcd(multiple, length)
  padded_length = math.ceil(length / step_length) * step_length
  padded_batch = math.ceil(batch / step_batch) * step_batch
  if batch * (padded_length - length) <= (padded_batch - batch) * length:
    padded_batch = batch
  else:
    padded_length = length
  g = num_groups_for(padded_batch * padded_length, max_group_size, multiple)
  return g, padded_batch, padded_length


class MoeLayer(nn.Module):
  """Sparse mixture-of-experts FFN, ST-MoE / Switch style.

  Attributes:
    num_experts: E.
    intermediate_dim: F of each expert.
    num_selected_experts: k (tokens-choose): 1 for Switch, 2 for ST-MoE.
    routing_method: 'tokens_choose' or 'experts_choose' (encoder only).
    batch_prioritized_routing: BPR for tokens-choose (encoder only).
    train_capacity_factor / eval_capacity_factor: cf used when enable_dropout is True / False.
    min_expert_capacity: lower bound on C.
    expert_capacity: a fixed C per group, replacing the capacity factors (HF Switch's `expert_capacity`).
    max_group_size: tokens per routing group at most (GROUP_SIZE).
    strict_group_size: raise instead of choosing a smaller group size or padding.
    num_expert_replicas: devices ÷ (expert partitions × model partitions), at least 1.
    group_multiple: the number of groups is a multiple of this. None means E × num_expert_replicas
      (flaxformer's rule, routing.md §5); 1 lets all tokens of a small batch form one group.
    jitter_noise: router input jitter ε in training.
    activations: expert MLP activations, ('gelu', 'linear') = GEGLU, ('relu',) = ReLU.
    expert_dropout_rate: dropout on the experts' hidden activations.
    dispatch_method: 'gather' (fast) or 'einsum' (exact one-hot reference).
    dtype: expert computation dtype; the router always runs in float32.
  """
  num_experts: int
  intermediate_dim: int
  num_selected_experts: int = 2
  routing_method: str = 'tokens_choose'
  batch_prioritized_routing: bool = False
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  expert_capacity: Optional[int] = None
  max_group_size: int = 4096
  strict_group_size: bool = False
  num_expert_replicas: int = 1
  group_multiple: Optional[int] = None
  jitter_noise: float = 0.0
  activations: Sequence[str] = ('gelu', 'linear')
  expert_dropout_rate: float = 0.0
  dispatch_method: str = 'gather'
  dtype: jnp.dtype = jnp.float32

  def _check_config(self) -> None:
    if self.num_experts < 1:
      raise ValueError(f'MoeLayer.num_experts must be >= 1, got {self.num_experts}.')
    if not 1 <= self.num_selected_experts <= self.num_experts:
      raise ValueError(f'MoeLayer.num_selected_experts must be in [1, num_experts={self.num_experts}], '
                       f'got {self.num_selected_experts}.')
    if self.routing_method not in ROUTING_METHODS:
      raise ValueError(f'MoeLayer.routing_method must be one of {ROUTING_METHODS}, '
                       f'got {self.routing_method!r}.')
    for name in ('train_capacity_factor', 'eval_capacity_factor'):
      if getattr(self, name) <= 0:
        raise ValueError(f'MoeLayer.{name} must be > 0, got {getattr(self, name)}.')
    if self.expert_capacity is not None and self.expert_capacity < 1:
      raise ValueError(f'MoeLayer.expert_capacity must be >= 1 (or None), got {self.expert_capacity}.')
    if self.num_expert_replicas < 1:
      raise ValueError(f'MoeLayer.num_expert_replicas must be >= 1, got {self.num_expert_replicas}.')

  @nn.compact
  def __call__(self, inputs: Array, padding_mask: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False,
               router_logits: Optional[Array] = None) -> Array:
    """Applies the layer.

    Args:
      inputs: <float>[B, L, H] token representations.
      padding_mask: optional [B, L], 1 for real tokens, 0 for padding (never routed, not in losses).
      enable_dropout: training mode: train capacity factor, jitter and expert dropout.
      decode: an incremental decoding step. Its tokens are never dropped: C is raised to at least T
        (an expert receives at most one choice per token), whatever the other sequences route to.
      router_logits: optional <float>[B, L, E] scores from a router outside the layer (e.g. a recurrent
        router shared across layers); the layer's own linear router is then not created.

    Returns:
      <float>[B, L, H] in the inputs' dtype; zeros for dropped and padding tokens.
    """
    self._check_config()
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise TypeError(f'MoeLayer inputs must be floating point, got dtype {inputs.dtype}.')
    if inputs.ndim != 3:
      raise ValueError(f'MoeLayer inputs must be [batch, length, hidden], got shape {inputs.shape}.')
    batch, length, hidden = inputs.shape
    if padding_mask is not None and tuple(padding_mask.shape) != (batch, length):
      raise ValueError(f'padding_mask has shape {tuple(padding_mask.shape)} but inputs are '
                       f'[batch, length] = {(batch, length)}; pass one entry per token.')
    real = (jnp.ones((batch, length), jnp.float32) if padding_mask is None
            else padding_mask.astype(jnp.float32))

    multiple = self.group_multiple or self.num_experts * self.num_expert_replicas
    num_groups, padded_batch, padded_length = plan_groups(
        batch, length, self.max_group_size, multiple, self.strict_group_size)
    pads = ((0, padded_batch - batch), (0, padded_length - length))
    x = jnp.pad(inputs, pads + ((0, 0),))
    real = jnp.pad(real, pads)
    tokens_per_group = padded_batch * padded_length // num_groups
    x = x.reshape(num_groups, tokens_per_group, hidden)  # [G, T, H]
    real = real.reshape(num_groups, tokens_per_group)  # [G, T]
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    if router_logits is None:
      logits = LinearRouter(self.num_experts, self.jitter_noise, name='router')(
          x, apply_jitter=enable_dropout)  # [G, T, E] float32
    else:
      if router_logits.shape != (batch, length, self.num_experts):
        raise ValueError(f'router_logits has shape {router_logits.shape}; expected [batch, length, '
                         f'num_experts] = {(batch, length, self.num_experts)}.')
      logits = jnp.pad(router_logits.astype(jnp.float32), pads + ((0, 0),))
      logits = logits.reshape(num_groups, tokens_per_group, self.num_experts)
    probs = jax.nn.softmax(logits, axis=-1)
    capacity_factor = self.train_capacity_factor if enable_dropout else self.eval_capacity_factor
    if self.expert_capacity is not None:
      capacity = self.expert_capacity
    else:
      capacity = routing.expert_capacity(tokens_per_group, self.num_experts, capacity_factor,
                                         self.min_expert_capacity)
    if decode:
      capacity = max(capacity, tokens_per_group)
    if self.routing_method == 'tokens_choose':
      route = routing.tokens_choose(
          probs, num_selected_experts=self.num_selected_experts, expert_capacity=capacity,
          batch_prioritized=self.batch_prioritized_routing, padding_mask=real)
      aux_loss = routing.load_balancing_loss(probs, route.expert_index, real)
    else:
      route = routing.experts_choose(probs, expert_capacity=capacity, padding_mask=real)
      aux_loss = jnp.zeros((), jnp.float32)

    expert_inputs = dispatch_lib.dispatch(x, route, self.dispatch_method)  # [G, E, C, H]
    expert_outputs = self._run_experts(expert_inputs, enable_dropout)
    y = dispatch_lib.combine(expert_outputs, route, self.dispatch_method)  # [G, T, H]

    metrics = {'auxiliary_loss': aux_loss, 'router_z_loss': routing.router_z_loss(logits, real),
               **routing.routing_metrics(route, real)}
    for name in METRIC_NAMES:
      self.sow('intermediates', name, metrics[name])

    y = y.reshape(padded_batch, padded_length, hidden)[:batch, :length]
    return y.astype(inputs.dtype)

  def _run_experts(self, expert_inputs: Array, enable_dropout: bool) -> Array:
    """[G, E, C, H] → [G, E, C, H]: each expert's MLP on its G·C buffer rows.

    The transpose to expert-major order under sharding constraints is where XLA places the all-to-all
    between token groups (sharded over 'batch') and experts (sharded over 'expert').
    """
    num_groups, num_experts, capacity, hidden = expert_inputs.shape
    x = nn.with_logical_constraint(expert_inputs, ('batch', 'unmodeled', 'length', 'embed'))
    x = jnp.swapaxes(x, 0, 1).reshape(num_experts, num_groups * capacity, hidden)
    x = nn.with_logical_constraint(x, ('expert', 'expert_replicas', 'mlp_embed'))

    experts = nn.vmap(
        lambda mlp, h: mlp(h, enable_dropout=enable_dropout),
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=0, out_axes=0,
        metadata_params={nn.PARTITION_NAME: 'expert'})
    mlp = MlpBlock(self.intermediate_dim, self.activations, self.expert_dropout_rate, self.dtype,
                   input_axis_name='mlp_embed', intermediate_axis_name='expert_mlp', name='expert')
    y = experts(mlp, x)  # [E, G·C, H]

    y = nn.with_logical_constraint(y, ('expert', 'expert_replicas', 'mlp_embed'))
    y = jnp.swapaxes(y.reshape(num_experts, num_groups, capacity, hidden), 0, 1)
    return nn.with_logical_constraint(y, ('batch', 'unmodeled', 'length', 'embed'))
