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
from typing import Sequence

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
    group_sizes: <int32>[E] rows of each expert, padding included (a multiple of tile).
    tile: rows per tile (static).
  """
  row_token: Array
  row_choice: Array
  token_row: Array
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
  return DroplessLayout(
      row_token=(row_choice // k).reshape(1, 1, num_rows), row_choice=row_choice,
      token_row=row.reshape(1, n, k).astype(jnp.int32),
      group_sizes=padded, tile=tile)


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


CHUNK_TILES = 16  # the largest chunk of one expert's rows, in tiles


def _chunk_schedules(group_sizes, tile, num_rows):
  """Covers each expert's rows with chunks: as many of B = CHUNK_TILES·tile rows as fit, then one chunk
  of exactly the remainder (a multiple of tile). An expert of at most B rows is a single matmul: each
  chunk costs a copy of its expert's kernel and, in the backward pass, an update of its weight gradient,
  so fewer chunks mean less memory traffic. No row runs twice and none is wasted.

  Returns [(rows, offsets <int32>[n], experts <int32>[n], count <int32>[])] for each chunk size, n a
  static bound and count the chunks in use. Chunks of one size run in one flat loop, so the loop carry
  (the output) is updated in place.
  """
  sizes = group_sizes.astype(jnp.int32)
  num_experts = sizes.shape[0]
  starts = jnp.cumsum(sizes) - sizes
  num_chunk_tiles = max(1, min(CHUNK_TILES, num_rows // tile))
  big = num_chunk_tiles * tile
  num_big = sizes // big
  cum = jnp.cumsum(num_big)
  index = jnp.arange(num_rows // big, dtype=jnp.int32)
  expert = jnp.minimum(jnp.searchsorted(cum, index, side='right'), num_experts - 1).astype(jnp.int32)
  offset = starts[expert] + (index - (cum[expert] - num_big[expert])) * big
  schedules = [(big, offset, expert, cum[-1])]
  rest = sizes % big
  for rows in range(tile, big, tile):
    present = rest == rows
    expert = jnp.nonzero(present, size=num_experts, fill_value=0)[0].astype(jnp.int32)
    offset = starts + num_big * big
    schedules.append((rows, offset[expert], expert, present.sum(dtype=jnp.int32)))
  return schedules


def _run_chunks(schedules, body, carry):
  """carry = body(offset, expert, rows, carry) for every chunk of every schedule."""
  for rows, offsets, experts, count in schedules:
    carry = jax.lax.fori_loop(
        0, count, lambda i, c, r=rows, o=offsets, e=experts: body(o[i], e[i], r, c), carry)
  return carry


def _grouped_products(x, kernels, schedules):
  """outs[i][rows of e] = x[rows of e] · kernels[i][e]; rows past the experts' rows are 0.

  x: [R, K]; kernels: tuple of [E, K, M_i]. Returns a tuple of [R, M_i]. Kernels that share an input
  share its loop: each chunk of x is read once for all of them.
  """
  def chunk(offset, expert, rows, outs):
    x_chunk = jax.lax.dynamic_slice_in_dim(x, offset, rows, 0)
    new = []
    for w, out in zip(kernels, outs):
      w_e = jax.lax.dynamic_index_in_dim(w, expert, 0, keepdims=False)
      y = jnp.dot(x_chunk, w_e, preferred_element_type=jnp.float32)
      new.append(jax.lax.dynamic_update_slice_in_dim(out, y.astype(x.dtype), offset, 0))
    return tuple(new)

  outs = tuple(jnp.zeros((x.shape[0], w.shape[2]), x.dtype) for w in kernels)
  return _run_chunks(schedules, chunk, outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_grouped_matmul(x, kernels, group_sizes, tile):
  return _grouped_products(x, kernels, _chunk_schedules(group_sizes, tile, x.shape[0]))


def _tiled_grouped_matmul_fwd(x, kernels, group_sizes, tile):
  return _tiled_grouped_matmul(x, kernels, group_sizes, tile), (x, kernels, group_sizes)


def _tiled_grouped_matmul_bwd(tile, residuals, d_outs):
  """One loop for every gradient: a chunk's d_x is Σ_i d_out_i · kernels[i][e]ᵀ, and x_chunkᵀ · d_out_i
  is added to expert e's slice of the [E, K, M_i] weight gradient (autodiff of the loop would stack one
  [K, M] gradient per chunk instead)."""
  x, kernels, group_sizes = residuals
  schedules = _chunk_schedules(group_sizes, tile, x.shape[0])

  def chunk(offset, expert, rows, carry):
    d_x, d_ws = carry
    x_chunk = jax.lax.dynamic_slice_in_dim(x, offset, rows, 0)
    d_x_chunk = 0.0
    new_d_ws = []
    for w, d_out, d_w in zip(kernels, d_outs, d_ws):
      d_chunk = jax.lax.dynamic_slice_in_dim(d_out, offset, rows, 0)
      w_e = jax.lax.dynamic_index_in_dim(w, expert, 0, keepdims=False)
      d_x_chunk = d_x_chunk + jax.lax.dot_general(d_chunk, w_e, (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.float32)
      grad = jax.lax.dot_general(x_chunk, d_chunk, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
      acc = jax.lax.dynamic_index_in_dim(d_w, expert, 0, keepdims=True)
      new_d_ws.append(jax.lax.dynamic_update_index_in_dim(d_w, acc + grad[None], expert, 0))
    d_x = jax.lax.dynamic_update_slice_in_dim(d_x, d_x_chunk.astype(x.dtype), offset, 0)
    return d_x, tuple(new_d_ws)

  carry = (jnp.zeros_like(x), tuple(jnp.zeros(w.shape, jnp.float32) for w in kernels))
  d_x, d_ws = _run_chunks(schedules, chunk, carry)
  return d_x, tuple(d_w.astype(w.dtype) for d_w, w in zip(d_ws, kernels)), None


_tiled_grouped_matmul.defvjp(_tiled_grouped_matmul_fwd, _tiled_grouped_matmul_bwd)


def target_platform() -> str:
  """The platform the traced code is compiled for: that of the mesh set by jax.set_mesh (partitioning.
  activate) when there is one, else the default backend. A TPU compile from a CPU host (compile_tpu.py)
  has a mesh of TPU devices while jax.default_backend() is 'cpu'."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  platform = getattr(device, 'platform', None)
  return platform or jax.default_backend()


def grouped_matmuls(rows: Array, kernels: Sequence[Array], layout: DroplessLayout, method: str = 'auto'
                    ) -> tuple:
  """Each expert's rows times its kernels: <float>[R, K], E-stacked kernels [E, K, M_i] -> ([R, M_i], ...).

  'tiled': loops of chunk · kernel[e] matmuls (one per expert, or chunks of CHUNK_TILES tiles for larger experts;
  all kernels in one loop) with a hand-written backward; the fastest approach found on CPU. 'ragged_dot':
  jax.lax.ragged_dot, XLA's grouped matmul (GPU/TPU; on CPU it lowers to a dense masked product, 8–60×
  slower). 'auto' picks ragged_dot on accelerators and tiled on CPU, by the compile target
  (`target_platform`, not the host's backend). Rows past the experts' rows are 0.
  """
  if method not in GROUPED_MATMUL_METHODS:
    raise ValueError(f'Unknown grouped matmul method {method!r}; choose one of {GROUPED_MATMUL_METHODS}.')
  if method == 'auto':
    method = 'ragged_dot' if target_platform() in ('gpu', 'cuda', 'rocm', 'tpu') else 'tiled'
  if method == 'ragged_dot':
    return tuple(jax.lax.ragged_dot(rows, kernel, layout.group_sizes) for kernel in kernels)
  return _tiled_grouped_matmul(rows, tuple(kernels), layout.group_sizes, layout.tile)


def grouped_matmul(rows: Array, kernel: Array, layout: DroplessLayout, method: str = 'auto') -> Array:
  """<float>[R, K], <float>[E, K, M] -> <float>[R, M]: grouped_matmuls with one kernel."""
  return grouped_matmuls(rows, (kernel,), layout, method)[0]
