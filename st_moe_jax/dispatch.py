"""Moving tokens into expert buffers and back.

Two implementations of one operation, chosen by name, equal in outputs and gradients:
  'einsum':  the exact GShard / flaxformer reference, through one-hot [G, T, E, C] masks.
  'gather':  the fast path. For tokens-choose every direction (forward and backward, dispatch and
             combine) is a gather, on the slot → token map or on the token → slot map; for experts-choose
             the combine is a scatter-add. Memory O(G·E·C·H + G·T·k·H); never a [G, T, E, C] array.

Dropped tokens (in no buffer slot) come back as zeros: the residual connection carries them.

Dropless routing has no buffers: `dropless_layout` sorts every (token, choice) by expert into rows,
`dropless_dispatch` / `dropless_combine` move tokens to rows and back (gathers both ways), and
`grouped_matmul` multiplies each expert's rows by its kernel.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp

from st_moe_jax import routing as routing_lib
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


# ---------------------------------------------------------------------------------------------------------
# Dropless routing (GRIN, MegaBlocks): every (token, choice) gets a row; rows are sorted by expert and each
# expert's rows are padded to a whole number of tiles, so a grouped matmul is a loop of dense tile matmuls.

GROUPED_MATMUL_METHODS = ('auto', 'tiled', 'ragged_dot')


@flax.struct.dataclass
class DroplessLayout:
  """Where every (token, choice) sits among the expert-sorted rows.

  R = round_up(N·k + E·(tile − 1), tile) rows is a static bound on the rows used; N = G·T tokens.

  Attributes:
    row_token: <int32>[1, 1, R] the flat token (in [0, N)) of each row; N for padding rows.
    row_choice: <int32>[R] the flat (token, choice) index t·k + j of each row; N·k for padding rows.
    token_row: <int32>[1, N, k] the row of each choice; R for padding tokens (never dispatched).
    tile_expert: <int32>[R / tile] the expert of each tile (tiles past num_tiles: E − 1, unused).
    num_tiles: <int32>[] tiles in use.
    group_sizes: <int32>[E] rows of each expert, padding included (for ragged_dot).
    tile: rows per tile (static).
  """
  row_token: Array
  row_choice: Array
  token_row: Array
  tile_expert: Array
  num_tiles: Array
  group_sizes: Array
  tile: int = flax.struct.field(pytree_node=False)

  @property
  def num_rows(self) -> int:
    return self.row_choice.shape[0]


def dropless_layout(expert_index: Array, num_experts: int, padding_mask=None, tile: int = 64
                    ) -> DroplessLayout:
  """Sorts the choices by expert (stable: token order within an expert) and pads each expert to tiles.

  Args:
    expert_index: <int32>[G, T, k].
    num_experts: E.
    padding_mask: optional [G, T], 1 for real tokens; padding tokens get no row.
    tile: rows per tile; each expert wastes fewer than `tile` rows.
  """
  num_groups, num_tokens, k = expert_index.shape
  n = num_groups * num_tokens
  num_choices = n * k
  num_rows = -(-(num_choices + num_experts * (tile - 1)) // tile) * tile
  real = (jnp.ones((n,), bool) if padding_mask is None else padding_mask.reshape(n) > 0)
  key = jnp.where(jnp.repeat(real, k), expert_index.reshape(num_choices), num_experts)  # padding: key E
  counts = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  padded = -(-counts // tile) * tile
  start = jnp.cumsum(padded) - padded
  rank = routing_lib.rank_within_key(key, num_experts)
  row = jnp.where(key < num_experts, start[jnp.minimum(key, num_experts - 1)] + rank, num_rows)
  choice = jnp.arange(num_choices, dtype=jnp.int32)
  row_choice = jnp.full((num_rows,), num_choices, jnp.int32).at[row].set(choice, mode='drop')
  tile_end = jnp.cumsum(padded) // tile  # [E] first tile past each expert
  tile_expert = jnp.searchsorted(tile_end, jnp.arange(num_rows // tile), side='right')
  return DroplessLayout(
      row_token=(row_choice // k).reshape(1, 1, num_rows), row_choice=row_choice,
      token_row=row.reshape(1, n, k).astype(jnp.int32),
      tile_expert=jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32),
      num_tiles=tile_end[-1].astype(jnp.int32), group_sizes=padded, tile=tile)


def dropless_dispatch(token_inputs: Array, layout: DroplessLayout) -> Array:
  """<float>[G, T, H] -> <float>[R, H] expert-sorted rows; zeros in padding rows. Gather both ways."""
  num_groups, num_tokens, hidden = token_inputs.shape
  flat = token_inputs.reshape(1, num_groups * num_tokens, hidden)
  # The rows are one "expert buffer" of R slots: the tokens-choose gather path does the rest.
  rows = _dispatch_tokens(flat, layout.row_token, layout.token_row)
  return rows.reshape(layout.num_rows, hidden)


def dropless_combine(rows: Array, weights: Array, layout: DroplessLayout) -> Array:
  """y_t = Σ_j weights[t, j] · rows[row of (t, j)]: <float>[R, H], <float32>[G, T, k] -> [G, T, H]."""
  num_groups, num_tokens, k = weights.shape
  hidden = rows.shape[-1]
  token_weight = weights.reshape(1, num_groups * num_tokens, k)
  token_weight = jnp.where(layout.token_row < layout.num_rows, token_weight, 0.0)  # padding tokens
  row_weight = jnp.take(jax.lax.stop_gradient(token_weight).reshape(-1), layout.row_choice, mode='fill',
                        fill_value=0.0)
  y = _combine_tokens(rows.reshape(1, 1, layout.num_rows, hidden), token_weight,
                      row_weight.reshape(1, 1, -1), layout.row_token, layout.token_row)
  return y.reshape(num_groups, num_tokens, hidden)


def _tile_matmuls(x, w, tile_expert, num_tiles, tile, transpose_w):
  """out[tile i] = x[tile i] · w[e_i] (or · w[e_i]ᵀ), for the tiles in use; other rows 0.

  x: [R, K]; w: [E, K, M] (or [E, M, K] when transpose_w). Returns [R, M].
  """
  out_dim = w.shape[1] if transpose_w else w.shape[2]
  contract = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))

  def body(i, out):
    x_tile = jax.lax.dynamic_slice_in_dim(x, i * tile, tile, 0)
    w_e = jax.lax.dynamic_index_in_dim(w, tile_expert[i], 0, keepdims=False)
    y = jax.lax.dot_general(x_tile, w_e, contract, preferred_element_type=jnp.float32).astype(x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, y, i * tile, 0)

  return jax.lax.fori_loop(0, num_tiles, body, jnp.zeros((x.shape[0], out_dim), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_grouped_matmul(x, w, tile_expert, num_tiles, tile):
  return _tile_matmuls(x, w, tile_expert, num_tiles, tile, transpose_w=False)


def _tiled_grouped_matmul_fwd(x, w, tile_expert, num_tiles, tile):
  return _tiled_grouped_matmul(x, w, tile_expert, num_tiles, tile), (x, w, tile_expert, num_tiles)


def _tiled_grouped_matmul_bwd(tile, residuals, d_out):
  x, w, tile_expert, num_tiles = residuals
  d_x = _tile_matmuls(d_out, w, tile_expert, num_tiles, tile, transpose_w=True)

  # Autodiff of the loop would stack one [K, M] weight gradient per tile. Instead, for each expert, sum
  # xᵀ · d_out over its (contiguous) tiles in a [K, M] loop carry; the map stacks the E sums.
  tile_end = jnp.searchsorted(tile_expert, jnp.arange(w.shape[0]), side='right').astype(jnp.int32)
  tile_end = jnp.minimum(tile_end, num_tiles)
  tile_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), tile_end[:-1]])

  def expert_grad(bounds):
    def body(i, acc):
      x_tile = jax.lax.dynamic_slice_in_dim(x, i * tile, tile, 0)
      d_tile = jax.lax.dynamic_slice_in_dim(d_out, i * tile, tile, 0)
      return acc + jax.lax.dot_general(x_tile, d_tile, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    return jax.lax.fori_loop(bounds[0], bounds[1], body, jnp.zeros(w.shape[1:], jnp.float32))

  d_w = jax.lax.map(expert_grad, jnp.stack([tile_start, tile_end], axis=1))
  return d_x, d_w.astype(w.dtype), None, None


_tiled_grouped_matmul.defvjp(_tiled_grouped_matmul_fwd, _tiled_grouped_matmul_bwd)


def grouped_matmul(rows: Array, kernel: Array, layout: DroplessLayout, method: str = 'auto') -> Array:
  """Each expert's rows times its kernel: <float>[R, K], <float>[E, K, M] -> <float>[R, M].

  'tiled': a loop of tile · kernel[e] matmuls with a hand-written backward (fast on CPU). 'ragged_dot':
  jax.lax.ragged_dot, XLA's grouped matmul (GPU/TPU; on CPU it lowers to a dense masked product, 8–60×
  slower). 'auto' picks ragged_dot on accelerators and tiled on CPU. Rows past the tiles in use are 0.
  """
  if method not in GROUPED_MATMUL_METHODS:
    raise ValueError(f'Unknown grouped matmul method {method!r}; choose one of {GROUPED_MATMUL_METHODS}.')
  if method == 'auto':
    method = 'ragged_dot' if jax.default_backend() in ('gpu', 'tpu') else 'tiled'
  if method == 'ragged_dot':
    return jax.lax.ragged_dot(rows, kernel, layout.group_sizes)
  return _tiled_grouped_matmul(rows, kernel, layout.tile_expert, layout.num_tiles, layout.tile)
