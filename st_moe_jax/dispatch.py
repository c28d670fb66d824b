"""Moving tokens into expert buffers and back.

Two implementations of one operation, chosen by name, equal in outputs and gradients:
  'einsum':  the exact GShard / flaxformer reference, through one-hot [G, T, E, C] masks.
  'gather':  the fast path. For tokens-choose every direction (forward and backward, dispatch and
             combine) is a gather, on the slot → token map or on the token → slot map; for experts-choose
             the combine is a scatter-add. Memory O(G·E·C·H + G·T·k·H); never a [G, T, E, C] array.

Dropped tokens (in no buffer slot) come back as zeros: the residual connection carries them.
"""

import jax
import jax.numpy as jnp

from st_moe_jax.routing import Routing

Array = jax.Array

DISPATCH_METHODS = ('gather', 'einsum')


def _check_method(method: str) -> None:
  if method not in DISPATCH_METHODS:
    raise ValueError(f'Unknown dispatch method {method!r}; choose one of {DISPATCH_METHODS}.')


def _take_rows(rows: Array, index: Array) -> Array:
  """rows [G, N, H], index <int>[G, ...] -> [G, ..., H]. Out-of-range indices clamp (callers mask them)."""
  flat = index.reshape(index.shape[0], -1)
  taken = jax.vmap(lambda r, i: jnp.take(r, i, axis=0, mode='clip'))(rows, flat)
  return taken.reshape(*index.shape, rows.shape[-1])


# Tokens-choose: every direction is a gather. dispatch's transpose gathers each token's k buffer rows;
# combine's transpose gathers each slot's token row. XLA:CPU gathers are much faster than scatter-adds.

@jax.custom_vjp
def _dispatch_tokens(token_inputs, buffer_token, token_slot):
  occupied = (buffer_token < token_inputs.shape[1])[..., None]
  return jnp.where(occupied, _take_rows(token_inputs, buffer_token), 0).astype(token_inputs.dtype)


def _dispatch_tokens_fwd(token_inputs, buffer_token, token_slot):
  return _dispatch_tokens(token_inputs, buffer_token, token_slot), (buffer_token, token_slot)


def _dispatch_tokens_bwd(residuals, d_buffers):
  buffer_token, token_slot = residuals
  num_groups, num_experts, capacity, hidden = d_buffers.shape
  rows = d_buffers.reshape(num_groups, num_experts * capacity, hidden)
  kept = (token_slot < num_experts * capacity)[..., None]  # [G, T, k, 1]
  d_inputs = jnp.sum(jnp.where(kept, _take_rows(rows, token_slot), 0), axis=2)
  return d_inputs.astype(d_buffers.dtype), None, None


_dispatch_tokens.defvjp(_dispatch_tokens_fwd, _dispatch_tokens_bwd)


@jax.custom_vjp
def _combine_tokens(expert_outputs, token_weight, buffer_weight, buffer_token, token_slot):
  num_groups, num_experts, capacity, hidden = expert_outputs.shape
  rows = expert_outputs.reshape(num_groups, num_experts * capacity, hidden)
  # Dropped choices have weight 0, so the clamped row they read contributes nothing.
  picked = _take_rows(rows, token_slot)  # [G, T, k, H]
  return jnp.einsum('gtkh,gtk->gth', picked, token_weight.astype(picked.dtype))


def _combine_tokens_fwd(expert_outputs, token_weight, buffer_weight, buffer_token, token_slot):
  out = _combine_tokens(expert_outputs, token_weight, buffer_weight, buffer_token, token_slot)
  return out, (expert_outputs, buffer_weight, buffer_token, token_slot)


def _combine_tokens_bwd(residuals, d_out):
  expert_outputs, buffer_weight, buffer_token, token_slot = residuals
  num_groups, num_experts, capacity, hidden = expert_outputs.shape
  d_rows = _take_rows(d_out, buffer_token) * buffer_weight[..., None].astype(d_out.dtype)  # [G, E, C, H]
  rows = expert_outputs.reshape(num_groups, num_experts * capacity, hidden)
  d_weight = jnp.einsum('gtkh,gth->gtk', _take_rows(rows, token_slot), d_out).astype(jnp.float32)
  return d_rows.astype(expert_outputs.dtype), d_weight, None, None, None


_combine_tokens.defvjp(_combine_tokens_fwd, _combine_tokens_bwd)


def dispatch(token_inputs: Array, routing: Routing, method: str = 'gather') -> Array:
  """Fills the expert buffers.

  Args:
    token_inputs: <float>[G, T, H].
    routing: which token fills each slot.
    method: 'gather' or 'einsum'.

  Returns:
    <float>[G, E, C, H] expert inputs, in the dtype of token_inputs; zeros in empty slots.
  """
  _check_method(method)
  if method == 'einsum':
    dispatch_mask, _ = routing.to_dense()
    return jnp.einsum('gth,gtec->gech', token_inputs, dispatch_mask.astype(token_inputs.dtype))
  if routing.token_slot is not None:
    return _dispatch_tokens(token_inputs, routing.buffer_token, routing.token_slot)
  num_groups, num_experts, capacity = routing.buffer_token.shape
  index = routing.buffer_token.reshape(num_groups, num_experts * capacity, 1)
  # An empty slot points at token T, one past the end: 'fill' mode makes it a zero row.
  gathered = jnp.take_along_axis(token_inputs, index, axis=1, mode='fill', fill_value=0)
  return gathered.reshape(num_groups, num_experts, capacity, token_inputs.shape[-1])


def combine(expert_outputs: Array, routing: Routing, method: str = 'gather') -> Array:
  """Weighted sum of each token's expert outputs.

  Args:
    expert_outputs: <float>[G, E, C, H].
    routing: which token fills each slot, with combine weights (float32).
    method: 'gather' or 'einsum'.

  Returns:
    <float>[G, T, H] in the dtype of expert_outputs; zeros for tokens in no slot.
  """
  _check_method(method)
  dtype = expert_outputs.dtype
  if method == 'einsum':
    _, combine_array = routing.to_dense()
    return jnp.einsum('gech,gtec->gth', expert_outputs, combine_array.astype(dtype))
  if routing.token_slot is not None:
    return _combine_tokens(expert_outputs, routing.token_weight, jax.lax.stop_gradient(routing.buffer_weight),
                           routing.buffer_token, routing.token_slot)
  # Experts-choose: a token can fill up to E slots, so combine by scatter-adding the slots.
  num_groups, num_experts, capacity, hidden = expert_outputs.shape
  weighted = expert_outputs * routing.buffer_weight[..., None].astype(dtype)
  weighted = weighted.reshape(num_groups, num_experts * capacity, hidden)
  index = routing.buffer_token.reshape(num_groups, num_experts * capacity)

  def scatter(rows, idx):  # index T collects the empty slots and is dropped below
    return jnp.zeros((routing.num_tokens + 1, hidden), dtype).at[idx].add(rows)

  return jax.vmap(scatter)(weighted, index)[:, :routing.num_tokens]
