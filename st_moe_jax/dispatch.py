"""Moving tokens into expert buffers and back.

Two implementations of one operation, chosen by name, equal in outputs and gradients:
  'einsum':  the exact GShard / flaxformer reference, through one-hot [G, T, E, C] masks.
  'gather':  the fast path: a gather on (expert, slot) → token indices and a scatter-add back. Memory
             O(G·E·C·H + G·T·H); never builds a [G, T, E, C] array.

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
  num_groups, num_experts, capacity, hidden = expert_outputs.shape
  weighted = expert_outputs * routing.buffer_weight[..., None].astype(dtype)
  weighted = weighted.reshape(num_groups, num_experts * capacity, hidden)
  index = routing.buffer_token.reshape(num_groups, num_experts * capacity)

  def scatter(rows, idx):  # index T collects the empty slots and is dropped below
    return jnp.zeros((routing.num_tokens + 1, hidden), dtype).at[idx].add(rows)

  return jax.vmap(scatter)(weighted, index)[:, :routing.num_tokens]
