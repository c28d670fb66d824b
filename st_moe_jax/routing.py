"""Routing math for mixture-of-experts layers: pure functions, float32 throughout.

Semantics are those of `docs/routing.md` (the flaxformer / t5x ST-MoE routers), except
that padding tokens are never dispatched and never counted in the router losses.

Notation: G groups, T tokens per group, E experts, C expert capacity, k experts selected per token.
A `Routing` says, for every expert buffer slot (g, e, c), which token of group g fills it and with what
combine weight. Both dispatch implementations in `dispatch.py` consume it.
"""

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Routing:
  """Which token fills each expert buffer slot, and its combine weight.

  Attributes:
    buffer_token: <int32>[G, E, C] index in [0, T) of the token in slot (g, e, c); T where empty.
    buffer_weight: <float32>[G, E, C] combine weight of that token (its router probability for e);
      0 where empty. Differentiable with respect to the router probabilities.
    num_tokens: T, the group size (static).
    expert_index: <int32>[G, T, k] each token's top-k experts before capacity is applied
      (tokens-choose only; None for experts-choose). The load-balancing loss uses it.
    token_slot: <int32>[G, T, k] the same assignment seen from the tokens: the flat slot e·C + c of each
      choice, E·C where the choice was dropped (tokens-choose only). Lets the fast dispatch run every
      direction, forward and backward, as a gather.
    token_weight: <float32>[G, T, k] combine weight of each choice, 0 where dropped (tokens-choose only).
  """
  buffer_token: Array
  buffer_weight: Array
  num_tokens: int = flax.struct.field(pytree_node=False)
  expert_index: Optional[Array] = None
  token_slot: Optional[Array] = None
  token_weight: Optional[Array] = None

  @property
  def occupied(self) -> Array:
    """<bool>[G, E, C]: slot holds a token."""
    return self.buffer_token < self.num_tokens

  def to_dense(self) -> tuple[Array, Array]:
    """The GShard / flaxformer one-hot form.

    Returns:
      dispatch_mask: <bool>[G, T, E, C], True where token t fills slot (e, c).
      combine_array: <float32>[G, T, E, C], the combine weight at those positions, 0 elsewhere.
    """
    tokens = jnp.arange(self.num_tokens, dtype=jnp.int32)
    dispatch_mask = self.buffer_token[:, None, :, :] == tokens[None, :, None, None]
    combine_array = jnp.where(dispatch_mask, self.buffer_weight[:, None, :, :], 0.0)
    return dispatch_mask, combine_array


def _real_mask(shape, padding_mask: Optional[Array]) -> Array:
  """<float32>[..., T]: 1 for real tokens. Checks the padding mask's shape."""
  if padding_mask is None:
    return jnp.ones(shape, jnp.float32)
  if tuple(padding_mask.shape) != tuple(shape):
    raise ValueError(f'padding_mask has shape {tuple(padding_mask.shape)} but the routed tokens have '
                     f'shape {tuple(shape)}; pass a mask with one entry per token (1 = real, 0 = padding).')
  return padding_mask.astype(jnp.float32)


def _check_router_array(name: str, array: Array) -> None:
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating-point array, got dtype {array.dtype}.')


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float,
                    min_capacity: int = 4) -> int:
  """C = max(round(capacity_factor · T / E), min_capacity), Python (banker's) rounding.

  C counts tokens, not (token, expert) assignments: with top-2 at capacity factor 1.25 only 1.25·T slots
  exist for 2·T choices, as in ST-MoE.
  """
  if num_experts < 1:
    raise ValueError(f'num_experts must be >= 1, got {num_experts}.')
  if capacity_factor <= 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor}; use e.g. 1.25 for training '
                     'and 2.0 for evaluation.')
  if min_capacity < 1:
    raise ValueError(f'min_capacity must be >= 1, got {min_capacity}.')
  return max(int(round(capacity_factor * tokens_per_group / num_experts)), min_capacity)


def router_z_loss(router_logits: Array, padding_mask: Optional[Array] = None) -> Array:
  """Mean over real tokens of logsumexp(logits)², in float32 (ST-MoE eq. 5).

  Args:
    router_logits: <float>[..., T, E].
    padding_mask: optional [..., T], 1 for real tokens, 0 for padding.

  Returns:
    <float32> scalar.
  """
  _check_router_array('router_logits', router_logits)
  log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)  # [..., T]
  real = _real_mask(log_z.shape, padding_mask)
  return jnp.sum(real * log_z**2) / jnp.maximum(jnp.sum(real), 1.0)


def load_balancing_loss(router_probs: Array, expert_indices: Array,
                        padding_mask: Optional[Array] = None) -> Array:
  """Switch / GShard auxiliary loss: E² · mean over (group, expert) of f · P.

  f[g, e] is the fraction of the group's real tokens whose top-k choices (before capacity) include e, and
  P[g, e] the mean router probability for e over the group's real tokens. It is 1 at perfect balance for
  k = 1 and about k for top-k. Groups holding no real token are left out of the mean.

  Args:
    router_probs: <float>[..., T, E].
    expert_indices: <int>[..., T, k] the top-k experts of each token.
    padding_mask: optional [..., T], 1 for real tokens, 0 for padding.

  Returns:
    <float32> scalar.
  """
  _check_router_array('router_probs', router_probs)
  num_experts = router_probs.shape[-1]
  probs = router_probs.astype(jnp.float32)
  real = _real_mask(probs.shape[:-1], padding_mask)  # [..., T]
  chosen = jnp.max(jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32), axis=-2)  # [..., T, E]
  count = jnp.sum(real, axis=-1, keepdims=True)  # [..., 1]
  denom = jnp.maximum(count, 1.0)
  f = jnp.sum(chosen * real[..., None], axis=-2) / denom  # [..., E]
  p = jnp.sum(probs * real[..., None], axis=-2) / denom  # [..., E]
  per_group = num_experts * jnp.sum(f * p, axis=-1)  # E² · mean_e  ==  E · sum_e
  has_tokens = (count[..., 0] > 0).astype(jnp.float32)
  return jnp.sum(per_group * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def _check_group_probs(router_probs: Array, expert_capacity: int) -> None:
  _check_router_array('router_probs', router_probs)
  if router_probs.ndim != 3:
    raise ValueError(f'router_probs must be [G, T, E], got shape {router_probs.shape}.')
  if expert_capacity < 1:
    raise ValueError(f'expert_capacity must be >= 1, got {expert_capacity}.')


def rank_within_key(key: Array, num_keys: int) -> Array:
  """<int32>[N]: for each entry of key <int>[N] (values in [0, num_keys]), how many earlier entries have
  the same value. O(N log N) by a stable sort, never an [N, E] one-hot."""
  order = jnp.argsort(key, stable=True)
  counts = jnp.bincount(key, length=num_keys + 1)
  first = jnp.cumsum(counts) - counts  # first position of each key in the sorted order
  rank = jnp.arange(key.shape[0], dtype=jnp.int32) - first[key[order]].astype(jnp.int32)
  return jnp.zeros(key.shape, jnp.int32).at[order].set(rank, unique_indices=True)


def _slot_within_expert(keys: Array, num_keys: int) -> Array:
  """rank_within_key for each group: keys <int32>[G, N] -> <int32>[G, N]."""
  return jax.vmap(lambda k: rank_within_key(k, num_keys))(keys)


def renormalize(top_probs: Array) -> Array:
  """<float32>[..., k]: each token's top-k probabilities divided by their sum, GShard's top-2 gating
  (arXiv:2006.16668, Alg. 1: g1 / (g1 + g2 + ε), ε = 1e-9), for any k."""
  return top_probs / (jnp.sum(top_probs, axis=-1, keepdims=True) + 1e-9)


def tokens_choose(router_probs: Array, *, num_selected_experts: int, expert_capacity: int,
                  batch_prioritized: bool = False, padding_mask: Optional[Array] = None) -> Routing:
  """Each token picks its top-k experts; each expert keeps at most C of the choices sent to it.

  Choices are walked k-major (every token's first choice, then every second choice, ...), in token order
  or, with batch-prioritized routing, in order of descending top-1 probability (stable; padding last). A
  choice keeps its slot iff fewer than C earlier choices went to the same expert, so first choices always
  win slots before second choices. Ties between experts go to the lower index. Combine weights are the
  raw router probabilities (no renormalisation over the k choices).

  Args:
    router_probs: <float32>[G, T, E].
    num_selected_experts: k.
    expert_capacity: C.
    batch_prioritized: order by router confidence (looks at the whole group: never in a causal decoder).
    padding_mask: optional [G, T], 1 for real tokens; padding tokens are never dispatched.

  Returns:
    Routing with expert_index, token_slot and token_weight [G, T, k].
  """
  _check_group_probs(router_probs, expert_capacity)
  num_experts = router_probs.shape[-1]
  k = num_selected_experts
  if not 1 <= k <= num_experts:
    raise ValueError(f'num_selected_experts must be in [1, num_experts={num_experts}], got {k}.')
  top_probs, expert_index = jax.lax.top_k(router_probs.astype(jnp.float32), k)  # ties -> lower index
  return assign_slots(expert_index.astype(jnp.int32), top_probs, num_experts=num_experts,
                      expert_capacity=expert_capacity,
                      priority=top_probs[..., 0] if batch_prioritized else None, padding_mask=padding_mask)


def assign_slots(expert_index: Array, weights: Array, *, num_experts: int, expert_capacity: int,
                 priority: Optional[Array] = None, padding_mask: Optional[Array] = None) -> Routing:
  """Gives each (token, choice) a buffer slot of its expert, or drops it: tokens-choose capacity.

  Choices are walked k-major (every token's first choice, then every second choice, ...), in token order
  or, when `priority` is given, in order of descending priority (stable; padding last). A choice keeps
  its slot iff fewer than C earlier choices went to the same expert. Shared by top-k tokens-choose and
  SparseMixer, whose choices come from sampling rather than top-k.

  Args:
    expert_index: <int32>[G, T, k] each token's experts, distinct within a token.
    weights: <float32>[G, T, k] their combine weights (differentiable).
    num_experts: E.
    expert_capacity: C.
    priority: optional <float>[G, T] batch-prioritized routing order (looks at the whole group).
    padding_mask: optional [G, T], 1 for real tokens; padding tokens are never dispatched.

  Returns:
    Routing with expert_index, token_slot and token_weight [G, T, k].
  """
  if expert_capacity < 1:
    raise ValueError(f'expert_capacity must be >= 1, got {expert_capacity}.')
  if expert_index.ndim != 3 or expert_index.shape != weights.shape:
    raise ValueError(f'expert_index and weights must both be [G, T, k], got {expert_index.shape} and '
                     f'{weights.shape}.')
  num_groups, num_tokens, k = expert_index.shape
  top_probs = weights.astype(jnp.float32)
  real = _real_mask((num_groups, num_tokens), padding_mask) > 0

  if priority is not None:
    priority = jnp.where(real, -priority, jnp.inf)
    order = jnp.argsort(priority, axis=-1, stable=True).astype(jnp.int32)  # [G, T]
  else:
    order = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (num_groups, num_tokens))

  # The walk: [G, k, T] choices in (rank, priority) order, flattened k-major. Padding goes to key E.
  walk_token = jnp.broadcast_to(order[:, None, :], (num_groups, k, num_tokens))
  walk_expert = jnp.take_along_axis(jnp.swapaxes(expert_index, 1, 2), walk_token, axis=-1)
  walk_real = jnp.take_along_axis(real, order, axis=-1)[:, None, :]
  walk_expert = jnp.where(walk_real, walk_expert, num_experts)
  walk_expert = walk_expert.reshape(num_groups, k * num_tokens)
  slot = _slot_within_expert(walk_expert, num_experts)
  kept = (walk_expert < num_experts) & (slot < expert_capacity)

  walk_token = walk_token.reshape(num_groups, k * num_tokens)
  walk_prob = jnp.take_along_axis(
      jnp.swapaxes(top_probs, 1, 2), walk_token.reshape(num_groups, k, num_tokens), axis=-1
  ).reshape(num_groups, k * num_tokens)

  # Scatter kept choices into their buffer slots; dropped ones aim past the end and are discarded.
  num_slots = num_experts * expert_capacity
  position = jnp.where(kept, walk_expert * expert_capacity + slot, num_slots)

  def fill(pos, tok, prob):
    buffer_token = jnp.full((num_slots,), num_tokens, jnp.int32).at[pos].set(tok, mode='drop')
    buffer_weight = jnp.zeros((num_slots,), jnp.float32).at[pos].set(prob, mode='drop')
    return buffer_token, buffer_weight

  buffer_token, buffer_weight = jax.vmap(fill)(position, walk_token, walk_prob)
  shape = (num_groups, num_experts, expert_capacity)

  # Back from walk order to token order: [G, k, T] -> [G, T, k].
  unorder = jnp.argsort(order, axis=-1)[:, None, :]
  token_slot = jnp.take_along_axis(position.reshape(num_groups, k, num_tokens), unorder, axis=-1)
  token_kept = jnp.take_along_axis(kept.reshape(num_groups, k, num_tokens), unorder, axis=-1)
  token_weight = top_probs * jnp.swapaxes(token_kept, 1, 2)
  return Routing(buffer_token=buffer_token.reshape(shape), buffer_weight=buffer_weight.reshape(shape),
                 expert_index=expert_index, token_slot=jnp.swapaxes(token_slot, 1, 2),
                 token_weight=token_weight, num_tokens=num_tokens)


def experts_choose(router_probs: Array, *, expert_capacity: int,
                   padding_mask: Optional[Array] = None) -> Routing:
  """Each expert takes the C tokens of the group with the highest probability for it.

  Ties go to the lower token index; slot = rank. A token may go to several experts or none. Padding tokens
  are never chosen. Looks at the whole group: encoder only.

  Args:
    router_probs: <float32>[G, T, E].
    expert_capacity: C.
    padding_mask: optional [G, T], 1 for real tokens.

  Returns:
    Routing without the token-major fields (a token may fill up to E slots).
  """
  _check_group_probs(router_probs, expert_capacity)
  num_groups, num_tokens, num_experts = router_probs.shape
  probs = router_probs.astype(jnp.float32)
  real = _real_mask((num_groups, num_tokens), padding_mask) > 0
  by_expert = jnp.swapaxes(probs, 1, 2)  # [G, E, T]
  # -1 sorts padding below every probability; such picks are marked empty below.
  scores = jnp.where(real[:, None, :], by_expert, -1.0)
  take = min(expert_capacity, num_tokens)
  top_scores, top_tokens = jax.lax.top_k(scores, take)  # [G, E, take]; ties -> lower token index
  chosen = top_scores >= 0
  buffer_token = jnp.where(chosen, top_tokens.astype(jnp.int32), num_tokens)
  weight = jnp.take_along_axis(by_expert, top_tokens, axis=-1)
  buffer_weight = jnp.where(chosen, weight, 0.0)
  if take < expert_capacity:  # more slots than tokens: the rest stay empty
    pad = [(0, 0), (0, 0), (0, expert_capacity - take)]
    buffer_token = jnp.pad(buffer_token, pad, constant_values=num_tokens)
    buffer_weight = jnp.pad(buffer_weight, pad)
  return Routing(buffer_token=buffer_token, buffer_weight=buffer_weight, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------------------
# SparseMixer-v2 (GRIN): sampled routing with a Heun-style gradient estimator, docs/seed_methods.md §1.

@jax.custom_vjp
def _grin_gate(logits: Array, probs: Array, chosen: Array, factor: Array) -> Array:
  """factor · p_D, whose gradient w.r.t. the raw logits is that of p_D alone (GRIN's `mp`).

  logits, probs: <float32>[..., E] raw logits and the round's masked softmax; chosen: <float32>[..., E]
  one-hot of D; factor: <float32>[...] the 1 or 1/3 Heun factor. Returns <float32>[...].
  """
  return factor * jnp.sum(probs * chosen, axis=-1)


def _grin_gate_fwd(logits, probs, chosen, factor):
  return _grin_gate(logits, probs, chosen, factor), (probs, chosen, factor)


def _grin_gate_bwd(residuals, d_gate):
  probs, chosen, factor = residuals
  p_d = jnp.sum(probs * chosen, axis=-1, keepdims=True)
  # d/dz_j = g · p_D · ([j == D] − p_j). The factor c is deliberately absent (it is Heun's sampling
  # point, not part of the gate's derivative), and nothing flows through the mask or p as a path.
  d_logits = d_gate[..., None] * p_d * (chosen - probs)
  return d_logits, jnp.zeros_like(probs), jnp.zeros_like(chosen), jnp.zeros_like(factor)


_grin_gate.defvjp(_grin_gate_fwd, _grin_gate_bwd)


def sparsemixer_given_noise(router_logits: Array, exponential: Optional[Array], uniform: Optional[Array],
                            *, num_selected_experts: int = 2, jitter_eps: float = 0.01
                            ) -> tuple[Array, Array]:
  """SparseMixer-v2 with its random draws passed in (training) or absent (evaluation).

  Round r (r = 1..k) hides the experts chosen in earlier rounds, masks every expert whose logit is more
  than a relative 2·eps below the round's maximum, and picks D_r: the argmax in evaluation, a Gumbel-max
  sample of the masked softmax p in training. The gate is p_{D_r}, times 1/3 in training when D_r is not
  the argmax of p and U_r <= 0.75 (Heun's third-order point, 3 times in 4). Gates are not renormalised.

  Args:
    router_logits: <float>[..., E] raw router logits (computed in float32).
    exponential: <float32>[..., k, E] Exp(1) draws (Gumbel noise is −log of them), or None for evaluation.
    uniform: <float32>[..., k] U(0, 1) draws for the Heun factor, or None for evaluation.
    num_selected_experts: k, in [1, E].
    jitter_eps: eps of the mask (GRIN's `router_jitter_noise`).

  Returns:
    expert_index <int32>[..., k] and multiplier <float32>[..., k].
  """
  _check_router_array('router_logits', router_logits)
  num_experts = router_logits.shape[-1]
  k = num_selected_experts
  if not 1 <= k <= num_experts:
    raise ValueError(f'num_selected_experts must be in [1, num_experts={num_experts}], got {k}.')
  if (exponential is None) != (uniform is None):
    raise ValueError('Pass both exponential and uniform draws (training) or neither (evaluation).')
  z = router_logits.astype(jnp.float32)
  z_const = jax.lax.stop_gradient(z)  # the mask and the sampling carry no gradient
  hidden = jnp.zeros(z.shape, bool)  # experts chosen in earlier rounds
  indices, gates = [], []
  for r in range(k):
    z_round = jnp.where(hidden, -jnp.inf, z_const)
    top = jnp.max(z_round, axis=-1, keepdims=True)
    # Written as "masked iff ratio > 2 eps" so that a NaN ratio (0/0 when the maximum and z_i are 0)
    # keeps the expert, as the reference does; the other way round can mask every expert.
    ratio = (top - z_const) / jnp.maximum(jnp.abs(z_const), top)  # original logits, not z_round
    masked_logits = jnp.where(ratio > 2 * jitter_eps, -jnp.inf, z_round)
    probs = jax.nn.softmax(masked_logits, axis=-1)  # exactly 0 on masked and hidden experts
    if exponential is None:
      choice = jnp.argmax(z_round, axis=-1)
      factor = jnp.ones(z.shape[:-1], jnp.float32)
    else:
      choice = jnp.argmax(masked_logits - jnp.log(exponential[..., r, :]), axis=-1)  # Gumbel-max
      heun_full = (choice == jnp.argmax(probs, axis=-1)) | (uniform[..., r] > 0.75)
      factor = 0.3333 + 0.6667 * heun_full.astype(jnp.float32)  # exactly 1.0 in float32
    chosen = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)
    gates.append(_grin_gate(z, probs, chosen, factor))
    indices.append(choice.astype(jnp.int32))
    hidden = hidden | (chosen > 0)
  return jnp.stack(indices, axis=-1), jnp.stack(gates, axis=-1)


def sparsemixer(router_logits: Array, *, num_selected_experts: int = 2, jitter_eps: float = 0.01,
                rng: Optional[Array] = None) -> tuple[Array, Array]:
  """GRIN's SparseMixer-v2 routing (docs/seed_methods.md §1.2–1.3).

  Args:
    router_logits: <float>[..., E].
    num_selected_experts: k (GRIN: 2; any k in [1, E] repeats the round).
    jitter_eps: eps of the relative mask "logit within 2·eps of the maximum" (GRIN: 0.01).
    rng: PRNG key for training-mode sampling; None is evaluation mode (argmax, no Heun factor).

  Returns:
    expert_index <int32>[..., k] and multiplier <float32>[..., k], the combine weights (not
    renormalised). Gradients w.r.t. the logits follow GRIN: g · p_D · ([j == D] − p_j) per round.
  """
  if rng is None:
    return sparsemixer_given_noise(router_logits, None, None, num_selected_experts=num_selected_experts,
                                   jitter_eps=jitter_eps)
  k = num_selected_experts
  batch_shape = router_logits.shape[:-1]
  rng_exp, rng_uniform = jax.random.split(rng)
  exponential = jax.random.exponential(rng_exp, (*batch_shape, k, router_logits.shape[-1]), jnp.float32)
  uniform = jax.random.uniform(rng_uniform, (*batch_shape, k), jnp.float32)
  return sparsemixer_given_noise(router_logits, exponential, uniform, num_selected_experts=k,
                                 jitter_eps=jitter_eps)


def dropless_metrics(weights: Array, padding_mask: Optional[Array] = None) -> dict[str, Array]:
  """routing_metrics for dropless routing: no capacity, so nothing is left behind and no slot is empty.

  Args:
    weights: <float32>[G, T, k] combine weights of every (token, choice).
    padding_mask: optional [G, T].
  """
  real = _real_mask(weights.shape[:-1], padding_mask)
  num_pairs = jnp.sum(real) * weights.shape[-1]
  return {
      'fraction_tokens_left_behind': jnp.zeros((), jnp.float32),
      'expert_usage': jnp.ones((), jnp.float32),
      'router_confidence': jnp.sum(weights * real[..., None]) / jnp.maximum(num_pairs, 1.0),
  }


def routing_metrics(routing: Routing, padding_mask: Optional[Array] = None) -> dict[str, Array]:
  """The t5x MoE metrics of one layer (docs/routing.md §6), padding excluded.

  Returns float32 scalars: fraction_tokens_left_behind, expert_usage, router_confidence.
  """
  num_groups, num_experts, capacity = routing.buffer_token.shape
  num_tokens = routing.num_tokens
  real = _real_mask((num_groups, num_tokens), padding_mask)
  occupied = routing.occupied
  hits = jax.vmap(lambda tok: jnp.zeros((num_tokens + 1,), jnp.float32).at[tok.reshape(-1)].add(1.0))(
      routing.buffer_token)[:, :num_tokens]  # [G, T] experts reached by each token
  dispatched = jnp.sum((hits > 0) * real)
  num_pairs = jnp.sum(occupied)
  return {
      'fraction_tokens_left_behind': 1.0 - dispatched / jnp.maximum(jnp.sum(real), 1.0),
      'expert_usage': num_pairs / float(num_groups * num_experts * capacity),
      'router_confidence': jnp.sum(routing.buffer_weight) / jnp.maximum(num_pairs, 1).astype(jnp.float32),
  }


__all__ = ['Routing', 'expert_capacity', 'router_z_loss', 'load_balancing_loss', 'tokens_choose',
           'assign_slots', 'experts_choose', 'sparsemixer', 'sparsemixer_given_noise', 'routing_metrics',
           'dropless_metrics']
