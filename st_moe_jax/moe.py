"""The sparse MoE feed-forward layer: group tokens → route → dispatch → experts → combine.

The layer is thin glue around pure functions: grouping (`group_tokens` / `ungroup`), logits → routing
(`route`, math in `routing.py`), buffer movement (`dispatch.py`) and the expert FFN (`layers.gated_ffn`
over `layers.Experts` kernels). Its settings are one `config.MoeConfig`, validated when it is made.
Semantics: docs/routing.md.
"""

import functools
import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from st_moe_jax import dispatch as dispatch_lib
from st_moe_jax import routing
from st_moe_jax.config import MoeConfig
from st_moe_jax.layers import Experts, batched_matmul, expert_kernel_axes, gated_ffn
from st_moe_jax.losses import MOE_METRIC_NAMES
from st_moe_jax.routers import LinearRouter

Array = jax.Array


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
  """How to cut batch × length tokens into groups (docs/routing.md §5).

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
          f'group_size={max_group_size} tokens with the number of groups a multiple of {multiple} '
          f'(experts x expert replicas). Change the batch size or sequence length, change GROUP_SIZE, '
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


class Groups(NamedTuple):
  """How a [B, L] batch was cut into G groups of T tokens (padding added at the end of B and L)."""
  batch: int
  length: int
  padded_batch: int
  padded_length: int
  num_groups: int

  def pad(self, x: Array) -> Array:
    """[B, L, ...] -> [G, T, ...]: zero padding appended, then cut into groups."""
    pads = ((0, self.padded_batch - self.batch), (0, self.padded_length - self.length))
    x = jnp.pad(x, pads + ((0, 0),) * (x.ndim - 2))
    return x.reshape(self.num_groups, -1, *x.shape[2:])


def group_tokens(inputs: Array, padding_mask: Optional[Array], *, group_size: int, multiple: int,
                 strict: bool = False) -> tuple[Array, Array, Groups]:
  """Cuts a batch into routing groups (docs/routing.md §5).

  Args:
    inputs: <float>[B, L, H].
    padding_mask: optional [B, L], 1 for real tokens.
    group_size: tokens per group at most.
    multiple: the number of groups G is a multiple of this (E × expert replicas, or 1).
    strict: raise instead of choosing a smaller group or padding.

  Returns:
    x <float>[G, T, H], real <float32>[G, T] (0 for padding, given or added), and the Groups to undo it.
  """
  batch, length, _ = inputs.shape
  real = (jnp.ones((batch, length), jnp.float32) if padding_mask is None
          else padding_mask.astype(jnp.float32))
  num_groups, padded_batch, padded_length = plan_groups(batch, length, group_size, multiple, strict)
  groups = Groups(batch, length, padded_batch, padded_length, num_groups)
  return groups.pad(inputs), groups.pad(real), groups


def ungroup(y: Array, groups: Groups) -> Array:
  """<float>[G, T, H] -> [B, L, H]: the inverse of group_tokens, padding removed."""
  y = y.reshape(groups.padded_batch, groups.padded_length, y.shape[-1])
  return y[:groups.batch, :groups.length]


def _ungroup_tokens(values: Array, groups: Groups) -> Array:
  """[G, T] per-token values -> [B, L], padding removed."""
  values = values.reshape(groups.padded_batch, groups.padded_length)
  return values[:groups.batch, :groups.length]


# Names of the per-token routing values MoeLayer sows in 'intermediates' (the losses never read them).
TOP1_EXPERT = 'router_top1_expert'
TOP1_PROBABILITY = 'router_top1_probability'


class Route(NamedTuple):
  """What routing decided for a [G, T] group of tokens.

  expert_index / weights: <int32>[G, T, k] / <float32>[G, T, k] each token's experts and combine weights
    (tokens-choose and SparseMixer; None for experts-choose).
  slots: the capacity-bounded buffer assignment (None for dropless routing).
  auxiliary_loss: the load-balancing loss (0 for experts-choose).
  """
  expert_index: Optional[Array]
  weights: Optional[Array]
  slots: Optional[routing.Routing]
  auxiliary_loss: Array


def per_group_shard(fn, *args):
  """fn(*args) run separately on each batch shard's groups: routing stays local to its group shard.

  args and fn's outputs are arrays (or pytrees of them) whose leading axis is G, the routing groups. Under
  an active mesh and logical axis rules (partitioning.activate) with G split evenly over the mesh axes of
  the logical 'batch' axis, fn runs in a shard_map over those axes, so each device routes only its own
  groups and no routing tensor crosses devices: left to the logical axis rules, XLA's CPU / GPU partitioner
  all-gathers the [G, T, E] router probabilities for lax.top_k and runs top-k on every group on every device
  (TPU lowers top_k to a sort and keeps it local). Otherwise (one device, no rules, G not a multiple of the
  shards) fn(*args) as is; the results are the same.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = nn.logical_to_mesh_axes(('batch',))[0]  # ('expert', 'data') under the standard rules
  if mesh.empty or axes is None:
    return fn(*args)
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  num_groups = jax.tree.leaves(args)[0].shape[0]
  if shards == 1 or num_groups % shards:
    return fn(*args)
  return jax.shard_map(fn, mesh=mesh, in_specs=P(axes), out_specs=P(axes))(*args)


def _top_k(x: Array, k: int) -> tuple[Array, Array]:
  """lax.top_k over the last axis of <float>[G, ...], per group shard: (values, int32 indices)."""
  values, index = per_group_shard(lambda v: jax.lax.top_k(v, k), x)
  return values, index.astype(jnp.int32)


def route(logits: Array, real: Array, config: MoeConfig, *, capacity: int,
          rng: Optional[Array] = None) -> Route:
  """Router logits → routing decisions, with the auxiliary loss.

  Args:
    logits: <float32>[G, T, E].
    real: <float32>[G, T], 1 for real tokens (padding is never routed and not in the loss).
    config: routing_method, num_selected_experts, batch_prioritized_routing, renormalize_combine_weights,
      sparsemixer_eps, dropless.
    capacity: C per expert and group (unused when dropless).
    rng: SparseMixer's sampling key in training; None evaluates (argmax).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  if config.routing_method == 'experts_choose':
    slots = per_group_shard(
        lambda p, r: routing.experts_choose(p, expert_capacity=capacity, padding_mask=r), probs, real)
    return Route(None, None, slots, jnp.zeros((), jnp.float32))
  k, num_experts = config.num_selected_experts, config.num_experts
  if config.routing_method == 'tokens_choose':
    top_probs, expert_index = _top_k(probs, k)  # ties -> lower expert index
    aux_loss = routing.load_balancing_loss(probs, expert_index, real)
    weights = (routing.renormalize(top_probs) if config.renormalize_combine_weights else top_probs)
    confidence = top_probs[..., 0]  # BPR's order: the raw top-1 probability
  else:  # sparsemixer
    expert_index, weights = routing.sparsemixer(logits, num_selected_experts=k,
                                                jitter_eps=config.sparsemixer_eps, rng=rng)
    # GRIN's balance loss counts the deterministic top-k of the full softmax, not the samples, and over
    # the whole batch ("global"), not per group: one group of G·T tokens.
    top_index = _top_k(probs, k)[1]
    confidence = weights[..., 0]
    aux_loss = routing.load_balancing_loss(probs.reshape(1, -1, num_experts), top_index.reshape(1, -1, k),
                                           real.reshape(1, -1))
  slots = None
  if not config.dropless:  # for top-k this is exactly routing.tokens_choose
    # Not in a shard_map: XLA keeps the capacity walk's sorts and scatters on the groups' own shards (their
    # inputs are sharded over 'batch'), while the manual version costs 5x the bytes accessed on TPU.
    slots = routing.assign_slots(
        expert_index, weights, num_experts=num_experts, expert_capacity=capacity,
        priority=confidence if config.batch_prioritized_routing else None, padding_mask=real)
  return Route(expert_index, weights, slots, aux_loss)


class MoeLayer(nn.Module):
  """Sparse mixture-of-experts FFN, ST-MoE / Switch style.

  Parameters: `router/router_weights/w/kernel` [H, E] (unless the logits come from outside) and the
  experts' `expert/wi_0/kernel` [E, H, F], ..., `expert/wo/kernel` [E, F, H], whichever path runs.

  Attributes:
    config: the stack's MoeConfig, with expert_mlp_dim and expert_activations set
      (`MoeConfig.with_model_defaults`).
    dtype: expert computation dtype; the router always runs in float32.
  """
  config: MoeConfig
  dtype: jnp.dtype = jnp.float32

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
    cfg = self.config
    if cfg.expert_mlp_dim is None or cfg.expert_activations is None:
      raise ValueError('MoeLayer needs config.expert_mlp_dim and config.expert_activations; build the '
                       'config with MoeConfig.with_model_defaults(mlp_dim, activations).')
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise TypeError(f'MoeLayer inputs must be floating point, got dtype {inputs.dtype}.')
    if inputs.ndim != 3:
      raise ValueError(f'MoeLayer inputs must be [batch, length, hidden], got shape {inputs.shape}.')
    batch, length, hidden = inputs.shape
    if padding_mask is not None and tuple(padding_mask.shape) != (batch, length):
      raise ValueError(f'padding_mask has shape {tuple(padding_mask.shape)} but inputs are '
                       f'[batch, length] = {(batch, length)}; pass one entry per token.')
    if router_logits is not None and router_logits.shape != (batch, length, cfg.num_experts):
      raise ValueError(f'router_logits has shape {router_logits.shape}; expected [batch, length, '
                       f'num_experts] = {(batch, length, cfg.num_experts)}.')

    if cfg.group_by_sequence:  # G = B groups of T = L tokens
      group_size, multiple = length, 1
    else:
      group_size, multiple = cfg.group_size, cfg.group_multiple or cfg.num_experts * cfg.num_expert_replicas
    x, real, groups = group_tokens(inputs, padding_mask, group_size=group_size, multiple=multiple,
                                   strict=cfg.strict_group_size)  # [G, T, H], [G, T]
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if router_logits is None:
      logits = LinearRouter(cfg.num_experts, cfg.jitter_noise, name='router')(
          x, apply_jitter=enable_dropout)  # [G, T, E] float32
    else:
      logits = groups.pad(router_logits.astype(jnp.float32))

    tokens_per_group = x.shape[1]
    if cfg.expert_capacity is not None:
      capacity = cfg.expert_capacity
    else:
      capacity_factor = cfg.train_capacity_factor if enable_dropout else cfg.eval_capacity_factor
      capacity = routing.expert_capacity(tokens_per_group, cfg.num_experts, capacity_factor,
                                         cfg.min_expert_capacity)
    if decode:
      capacity = max(capacity, tokens_per_group)
    sample = enable_dropout and cfg.routing_method == 'sparsemixer'
    decision = route(logits, real, cfg, capacity=capacity, rng=self.make_rng('dropout') if sample else None)

    kernels = Experts(cfg.num_experts, cfg.expert_mlp_dim, len(cfg.expert_activations), name='expert')(hidden)
    dropout = nn.Dropout(rate=cfg.expert_dropout_rate)
    drop = lambda h: dropout(h, deterministic=not enable_dropout)
    if cfg.dropless:
      kernels = {n: k.astype(self.dtype) for n, k in kernels.items()}
      route_metrics = routing.dropless_metrics(decision.weights, real)
      if dispatch_lib.mesh_axis_size('expert') > 1:
        y, left_behind = self._dropless_expert_parallel(x, decision, real, kernels, enable_dropout)
        route_metrics['fraction_tokens_left_behind'] = left_behind
      else:
        y = self._dropless_experts(x, decision, real, kernels, drop)
    else:
      expert_inputs = dispatch_lib.dispatch(x, decision.slots, cfg.dispatch_method)  # [G, E, C, H]
      # float32 kernels: batched_matmul casts them, keeping their gradients float32 (layers.cast_matmul).
      expert_outputs = self._capacity_experts(expert_inputs, kernels, drop)
      y = dispatch_lib.combine(expert_outputs, decision.slots, cfg.dispatch_method)  # [G, T, H]
      route_metrics = routing.routing_metrics(decision.slots, real)

    metrics = {'auxiliary_loss': decision.auxiliary_loss,
               'router_z_loss': routing.router_z_loss(logits, real), **route_metrics}
    for name in MOE_METRIC_NAMES:
      self.sow('intermediates', name, metrics[name])
    # Per token, for analysis (scripts/expert_analysis.py), not read by the losses: the top-1 expert of the
    # router's softmax (ties: lower index) and its probability, [B, L] (padding included; before capacity).
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow('intermediates', TOP1_EXPERT, _ungroup_tokens(jnp.argmax(probs, axis=-1).astype(jnp.int32),
                                                           groups))
    self.sow('intermediates', TOP1_PROBABILITY, _ungroup_tokens(jnp.max(probs, axis=-1), groups))
    return ungroup(y, groups).astype(inputs.dtype)

  def _capacity_experts(self, expert_inputs: Array, kernels: dict[str, Array], drop) -> Array:
    """[G, E, C, H] → [G, E, C, H]: each expert's FFN on its G·C buffer rows.

    The transpose to expert-major order under sharding constraints is where XLA places the all-to-all
    between token groups (sharded over 'batch') and experts (sharded over 'expert').
    """
    num_groups, num_experts, capacity, hidden = expert_inputs.shape
    x = nn.with_logical_constraint(expert_inputs, ('batch', 'unmodeled', 'length', 'embed'))
    x = jnp.swapaxes(x, 0, 1).reshape(num_experts, num_groups * capacity, hidden)
    x = nn.with_logical_constraint(x, ('expert', 'expert_replicas', 'mlp_embed'))
    y = gated_ffn(x.astype(self.dtype), kernels, self.config.expert_activations, matmul=batched_matmul,
                  dropout=drop)  # [E, G·C, H]
    y = nn.with_logical_constraint(y, ('expert', 'expert_replicas', 'mlp_embed'))
    y = jnp.swapaxes(y.reshape(num_experts, num_groups, capacity, hidden), 0, 1)
    return nn.with_logical_constraint(y, ('batch', 'unmodeled', 'length', 'embed'))

  def _dropless_experts(self, x: Array, decision: Route, real: Array, kernels: dict[str, Array],
                        drop) -> Array:
    """Every (token, choice) through its expert: x [G, T, H] -> [G, T, H].

    The choices are sorted by expert into R rows (dispatch.dropless_layout), the FFN runs as grouped
    matmuls over the rows, and the rows are combined back with the weights. Padding tokens get no row.
    """
    cfg = self.config
    layout = dispatch_lib.dropless_layout(decision.expert_index, cfg.num_experts, real,
                                          cfg.dropless_tile_size)
    rows = dispatch_lib.dropless_dispatch(x.astype(self.dtype), layout)  # [R, H]
    grouped = lambda r, ks: list(dispatch_lib.grouped_matmuls(r, ks, layout, cfg.grouped_matmul_method))
    out = gated_ffn(rows, kernels, cfg.expert_activations, matmul=grouped, dropout=drop)  # [R, H]
    return dispatch_lib.dropless_combine(out, decision.weights, layout)

  def _dropless_expert_parallel(self, x: Array, decision: Route, real: Array, kernels: dict[str, Array],
                                enable_dropout: bool) -> tuple[Array, Array]:
    """_dropless_experts with the experts split over the mesh's 'expert' axis (docs/routing.md §6): each
    device sorts its own tokens' choices, exchanges them with all-to-alls and runs its E/ep experts
    (dispatch.dropless_expert_parallel). Kernels and tokens keep the layout of the logical axis rules.

    Returns y [G, T, H] and fraction_tokens_left_behind (0 unless the CPU fallback's buffers overflowed).
    """
    cfg = self.config
    rate = cfg.expert_dropout_rate if enable_dropout else 0.0
    rng = self.make_rng('dropout') if rate > 0 else None

    def ffn(rows, local_kernels, layout, key):
      grouped = lambda r, ks: list(dispatch_lib.grouped_matmuls(r, ks, layout, cfg.grouped_matmul_method))
      drop = (lambda h: h) if key is None else functools.partial(_dropout, rate=rate, key=key)
      return gated_ffn(rows, local_kernels, cfg.expert_activations, matmul=grouped, dropout=drop)

    specs = {n: tuple(nn.logical_to_mesh_axes(expert_kernel_axes(n))) for n in kernels}
    batch_spec = nn.logical_to_mesh_axes(('batch',))
    token_axes = dispatch_lib.spec_axes(batch_spec[0] if batch_spec else None)
    return dispatch_lib.dropless_expert_parallel(
        x, decision.expert_index, decision.weights, real, kernels, ffn, num_experts=cfg.num_experts,
        tile=cfg.dropless_tile_size, kernel_specs=specs, token_axes=token_axes, rng=rng)


def _dropout(h: Array, *, rate: float, key: Array) -> Array:
  """flax's nn.Dropout on h with an explicit key (inside shard_map, where the module's rng is not used)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)
