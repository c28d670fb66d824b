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
from st_moe_jax.layers import ACTIVATIONS, MlpBlock, input_projection_names
from st_moe_jax.routers import LinearRouter

Array = jax.Array

ROUTING_METHODS = ('tokens_choose', 'experts_choose', 'sparsemixer')
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
    routing_method: 'tokens_choose' (top-k), 'experts_choose' (encoder only) or 'sparsemixer' (GRIN's
      SparseMixer-v2: top-k sampled in training from the 'dropout' RNG stream, argmax in evaluation;
      its multipliers are the combine weights, not renormalised).
    batch_prioritized_routing: BPR for tokens-choose and sparsemixer (encoder only).
    sparsemixer_eps: SparseMixer's mask threshold eps (GRIN's router_jitter_noise, 0.01).
    dropless: every token reaches its k experts, no capacity (GRIN, MegaBlocks): choices are sorted by
      expert and run through grouped matmuls. tokens_choose and sparsemixer only. The capacity factors
      and expert_capacity are then unused. Sorts all tokens of the batch together (no expert parallelism).
    dropless_tile_size: rows per tile of the grouped matmul; each expert wastes fewer than this many rows.
    grouped_matmul_method: 'auto' (ragged_dot on GPU/TPU, tiled on CPU), 'tiled' or 'ragged_dot'.
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
  sparsemixer_eps: float = 0.01
  dropless: bool = False
  dropless_tile_size: int = 32
  grouped_matmul_method: str = 'auto'
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
    if self.dropless and self.routing_method == 'experts_choose':
      raise ValueError('MoeLayer.dropless needs routing_method="tokens_choose" or "sparsemixer": '
                       'experts-choose has no per-token choices to keep.')
    if self.dropless_tile_size < 1:
      raise ValueError(f'MoeLayer.dropless_tile_size must be >= 1, got {self.dropless_tile_size}.')
    if self.grouped_matmul_method not in dispatch_lib.GROUPED_MATMUL_METHODS:
      raise ValueError(f'MoeLayer.grouped_matmul_method must be one of '
                       f'{dispatch_lib.GROUPED_MATMUL_METHODS}, got {self.grouped_matmul_method!r}.')

  @nn.compact
  def __call__(self, inputs: Array, padding_mask: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False,
               router_logits: Optional[Array] = None) -> Array:
    """Applies the layer.

    Args:
      inputs: <float>[B, L, H] token representations.
      padding_mask: optional [B, L], 1 for real tokens, 0 for padding (never routed, not in losses).
      enable_dropout: training mode: train capacity factor, jitter, expert dropout, SparseMixer sampling.
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
    if self.routing_method == 'experts_choose':
      route = routing.experts_choose(probs, expert_capacity=capacity, padding_mask=real)
      aux_loss = jnp.zeros((), jnp.float32)
    else:
      expert_index, weights, aux_loss = self._token_choices(logits, probs, real, enable_dropout)
      if not self.dropless:  # for top-k this is exactly routing.tokens_choose
        route = routing.assign_slots(
            expert_index, weights, num_experts=self.num_experts, expert_capacity=capacity,
            priority=weights[..., 0] if self.batch_prioritized_routing else None, padding_mask=real)

    if self.dropless:
      y = self._run_dropless_experts(x, expert_index, weights, real, enable_dropout)  # [G, T, H]
      route_metrics = routing.dropless_metrics(weights, real)
    else:
      expert_inputs = dispatch_lib.dispatch(x, route, self.dispatch_method)  # [G, E, C, H]
      expert_outputs = self._run_experts(expert_inputs, enable_dropout)
      y = dispatch_lib.combine(expert_outputs, route, self.dispatch_method)  # [G, T, H]
      route_metrics = routing.routing_metrics(route, real)

    metrics = {'auxiliary_loss': aux_loss, 'router_z_loss': routing.router_z_loss(logits, real),
               **route_metrics}
    for name in METRIC_NAMES:
      self.sow('intermediates', name, metrics[name])

    y = y.reshape(padded_batch, padded_length, hidden)[:batch, :length]
    return y.astype(inputs.dtype)

  def _token_choices(self, logits: Array, probs: Array, real: Array, enable_dropout: bool
                     ) -> tuple[Array, Array, Array]:
    """Each token's k experts: <int32>[G, T, k], combine weights <float32>[G, T, k], aux loss."""
    k = self.num_selected_experts
    if self.routing_method == 'tokens_choose':
      weights, expert_index = jax.lax.top_k(probs, k)  # ties -> lower expert index
      expert_index = expert_index.astype(jnp.int32)
      return expert_index, weights, routing.load_balancing_loss(probs, expert_index, real)
    rng = self.make_rng('dropout') if enable_dropout else None  # sampling only in training
    expert_index, weights = routing.sparsemixer(logits, num_selected_experts=k,
                                                jitter_eps=self.sparsemixer_eps, rng=rng)
    # GRIN's balance loss counts the deterministic top-k of the full softmax, not the samples, and over
    # the whole batch ("global"), not per group: one group of G·T tokens.
    top_index = jax.lax.top_k(probs, k)[1]
    aux_loss = routing.load_balancing_loss(probs.reshape(1, -1, self.num_experts),
                                           top_index.reshape(1, -1, k), real.reshape(1, -1))
    return expert_index, weights, aux_loss

  def _expert_mlp(self, enable_dropout: bool) -> tuple:
    """The experts: one MlpBlock vmapped over the 'expert' axis (params [E, ...]), and its module."""
    experts = nn.vmap(
        lambda mlp, h: mlp(h, enable_dropout=enable_dropout),
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=0, out_axes=0,
        metadata_params={nn.PARTITION_NAME: 'expert'})
    mlp = MlpBlock(self.intermediate_dim, self.activations, self.expert_dropout_rate, self.dtype,
                   input_axis_name='mlp_embed', intermediate_axis_name='expert_mlp', name='expert')
    return experts, mlp

  def _run_dropless_experts(self, x: Array, expert_index: Array, weights: Array, real: Array,
                            enable_dropout: bool) -> Array:
    """Every (token, choice) through its expert: x [G, T, H], expert_index / weights [G, T, k] -> [G, T, H].

    The choices are sorted by expert into R rows (dispatch.dropless_layout), the expert MLP runs as grouped
    matmuls over the rows, and the rows are combined back with the weights. Padding tokens get no row.
    """
    num_groups, tokens_per_group, hidden = x.shape
    experts, mlp = self._expert_mlp(enable_dropout=False)
    # Run on no tokens: declares the expert parameters exactly as the capacity path does (names, init,
    # partitioning), so checkpoints and tests move freely between the two paths.
    experts(mlp, jnp.zeros((self.num_experts, 0, hidden), self.dtype))
    kernels = nn.unbox(mlp.variables['params'])
    layout = dispatch_lib.dropless_layout(expert_index, self.num_experts, real, self.dropless_tile_size)
    rows = dispatch_lib.dropless_dispatch(x.astype(self.dtype), layout)  # [R, H]
    names = input_projection_names(len(self.activations))
    projections = dispatch_lib.grouped_matmuls(
        rows, [kernels[name]['kernel'].astype(self.dtype) for name in names], layout,
        self.grouped_matmul_method)  # each [R, F]
    hidden_rows = None
    for h, act in zip(projections, self.activations):
      h = ACTIVATIONS[act](h)
      hidden_rows = h if hidden_rows is None else hidden_rows * h
    hidden_rows = nn.Dropout(rate=self.expert_dropout_rate)(hidden_rows, deterministic=not enable_dropout)
    out = dispatch_lib.grouped_matmul(hidden_rows, kernels['wo']['kernel'].astype(self.dtype), layout,
                                      self.grouped_matmul_method)  # [R, H]
    return dispatch_lib.dropless_combine(out, weights, layout)

  def _run_experts(self, expert_inputs: Array, enable_dropout: bool) -> Array:
    """[G, E, C, H] → [G, E, C, H]: each expert's MLP on its G·C buffer rows.

    The transpose to expert-major order under sharding constraints is where XLA places the all-to-all
    between token groups (sharded over 'batch') and experts (sharded over 'expert').
    """
    num_groups, num_experts, capacity, hidden = expert_inputs.shape
    x = nn.with_logical_constraint(expert_inputs, ('batch', 'unmodeled', 'length', 'embed'))
    x = jnp.swapaxes(x, 0, 1).reshape(num_experts, num_groups * capacity, hidden)
    x = nn.with_logical_constraint(x, ('expert', 'expert_replicas', 'mlp_embed'))

    experts, mlp = self._expert_mlp(enable_dropout)
    y = experts(mlp, x)  # [E, G·C, H]

    y = nn.with_logical_constraint(y, ('expert', 'expert_replicas', 'mlp_embed'))
    y = jnp.swapaxes(y.reshape(num_experts, num_groups, capacity, hidden), 0, 1)
    return nn.with_logical_constraint(y, ('batch', 'unmodeled', 'length', 'embed'))
