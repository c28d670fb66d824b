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
import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


def _varying(x) -> set:
  """The manual mesh axes (inside shard_map) over which x varies; empty outside shard_map."""
  return set(getattr(getattr(jax.typeof(x), 'manual_axis_type', None), 'varying', ()) or ())


def _zeros_varying_like(shape, dtype, *refs) -> Array:
  """Zeros that vary over the same manual mesh axes as `refs` (inside shard_map a loop carry must have the
  manual-axis type of the loop's output); plain zeros outside shard_map."""
  axes = set().union(*(_varying(r) for r in refs))
  z = jnp.zeros(shape, dtype)
  return jax.lax.pcast(z, tuple(sorted(axes)), to='varying') if axes else z


def _cotangent_like(ct: Array, primal: Array) -> Array:
  """A custom_vjp cotangent with its primal's manual-axis type (inside shard_map): summed over the axes the
  primal does not vary over (the transpose of its implicit broadcast), made varying over those it does."""
  extra = _varying(ct) - _varying(primal)
  if extra:
    ct = jax.lax.psum(ct, tuple(sorted(extra)))
  missing = _varying(primal) - _varying(ct)
  if missing:
    ct = jax.lax.pcast(ct, tuple(sorted(missing)), to='varying')
  return ct


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

  outs = tuple(_zeros_varying_like((x.shape[0], w.shape[2]), x.dtype, x, w, *schedules[0][1:]) for w in kernels)
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

  refs = (x, *kernels, *d_outs, *schedules[0][1:])
  carry = (_zeros_varying_like(x.shape, x.dtype, *refs),
           tuple(_zeros_varying_like(w.shape, jnp.float32, *refs) for w in kernels))
  d_x, d_ws = _run_chunks(schedules, chunk, carry)
  return (_cotangent_like(d_x, x),
          tuple(_cotangent_like(d_w.astype(w.dtype), w) for d_w, w in zip(d_ws, kernels)), None)


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


# ---------------------------------------------------------------------------------------------------------
# Dropless expert parallelism (docs/routing.md §6, "Dropless expert parallelism"). Under a mesh whose
# 'expert' axis has ep > 1 devices, each device sorts its own tokens' choices by expert, sends each expert's
# rows to the device that holds the expert (all-to-all over 'expert'), runs its E/ep experts as grouped
# matmuls, and sends the results back with the inverse exchange; the combine is local again.

EP_EXCHANGES = ('auto', 'ragged', 'capacity')


def mesh_axis_size(name: str) -> int:
  """The size of mesh axis `name` of the mesh set by jax.set_mesh (partitioning.activate); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(name, 1)


def spec_axes(entry) -> tuple:
  """One PartitionSpec entry (None, 'a' or ('a', 'b')) as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _exclusive_cumsum(x: Array, axis: int = 0) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def _segment_of(ends: Array, positions: Array) -> Array:
  """For sorted segment ends (inclusive cumsum of sizes), the segment of each position; len(ends) past the end."""
  return jnp.searchsorted(ends, positions, side='right').astype(jnp.int32)


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
  """jax.lax.ragged_all_to_all (an indirection, so that a test can run the ragged path on CPU, where XLA has
  no ragged-all-to-all, with an emulation)."""
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                   axis_name=axis_name)


def _local_expert_parallel(x, expert_index, weights, real, kernels, rng, *, ffn, num_experts, tile, exchange,
                           capacity, model_axes, key_axes):
  """One device's share (inside shard_map): x [n, H], expert_index / weights [n, k], real [n], kernels
  [E/ep, ...] (F split over model_axes). Returns (y [n, H], [left-behind real tokens, real tokens] <f32>[1, 2])."""
  axis = 'expert'
  n, k = expert_index.shape
  ep = jax.lax.axis_size(axis)
  local = num_experts // ep
  me = jax.lax.axis_index(axis)

  # 1. My choices sorted by (global) expert, so each destination's rows are contiguous: n·k rows, no tiles.
  send_layout = dropless_layout(expert_index[None], num_experts, real[None], tile=1)
  rows = dropless_dispatch(x[None], send_layout)  # [n·k, H]
  counts = send_layout.group_sizes.reshape(ep, local)  # my rows per (destination, its local expert)
  table = jax.lax.all_gather(counts, axis)  # [source, destination, local expert], the same on every device
  to_dst = table.sum(-1)  # [source, destination]
  send_sizes, recv_sizes = to_dst[me], to_dst[:, me]
  send_offsets = _exclusive_cumsum(send_sizes)  # where each destination's rows start among mine
  recv_per_expert = table[:, me]  # [source, local expert]: what each source sends me
  num_send = n * k

  # 2. Exchange: a received buffer of M rows, each with its local expert (`local` for an empty row).
  if exchange == 'ragged':
    # Every source's rows, back to back in source order: at most ep·n·k rows, so nothing is ever dropped.
    num_recv = ep * num_send
    recv_offsets = _exclusive_cumsum(recv_sizes)
    landing = _exclusive_cumsum(to_dst, 0)[me]  # where my rows for destination j start on j
    received = _ragged_all_to_all(rows, _zeros_varying_like((num_recv, rows.shape[1]), rows.dtype, rows),
                                  send_offsets,
                                  send_sizes, landing, recv_sizes, axis)
    segment = _segment_of(jnp.cumsum(recv_per_expert.reshape(-1)), jnp.arange(num_recv, dtype=jnp.int32))
    recv_expert = jnp.where(segment < ep * local, segment % local, local)
    sent = jnp.ones((num_send,), bool)
  else:
    # Fixed buffers of `capacity` rows per (source, destination); a destination's rows past the capacity
    # (the last in expert-then-token order) are not sent and get no expert output.
    slot = jnp.arange(capacity, dtype=jnp.int32)
    index = send_offsets[:, None] + slot[None]  # [destination, slot]
    filled = slot[None] < jnp.minimum(send_sizes, capacity)[:, None]
    send = jnp.where(filled[..., None], jnp.take(rows, jnp.where(filled, index, 0), axis=0), 0)
    received = jax.lax.all_to_all(send, axis, 0, 0, tiled=False).reshape(ep * capacity, rows.shape[1])
    ends = jnp.cumsum(recv_per_expert, axis=1)  # [source, local expert]
    recv_expert = jax.vmap(lambda e: _segment_of(e, slot))(ends).reshape(-1)  # `local` past a source's rows
    row = jnp.arange(num_send, dtype=jnp.int32)
    row_dst = _segment_of(jnp.cumsum(send_sizes), row)  # ep for rows past my real rows
    sent = (row_dst < ep) & (row - send_offsets[jnp.minimum(row_dst, ep - 1)] < capacity)

  # 3. My experts on the received rows, sorted by local expert and padded to tiles (dropless_layout again).
  num_recv = received.shape[0]
  in_use = recv_expert < local
  recv_layout = dropless_layout(jnp.minimum(recv_expert, local - 1).reshape(1, num_recv, 1), local,
                                in_use.reshape(1, num_recv), tile)
  expert_rows = dropless_dispatch(received[None], recv_layout)
  if rng is not None:
    for name in key_axes:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(name))
  out = ffn(expert_rows, kernels, recv_layout, rng)
  if model_axes:  # wo contracted F, which is split over the model axes: partial sums
    out = jax.lax.psum(out, model_axes)
  done = dropless_combine(out, in_use.astype(jnp.float32).reshape(1, num_recv, 1), recv_layout)
  done = done.reshape(num_recv, -1)  # the results in the received order; 0 in empty rows

  # 4. The inverse exchange: each result back to the row it came from.
  if exchange == 'ragged':
    returned_at = _exclusive_cumsum(to_dst, 1)[:, me]  # where source s took its rows for me from
    back = _ragged_all_to_all(done, _zeros_varying_like(rows.shape, rows.dtype, done, rows),
                              _exclusive_cumsum(recv_sizes), recv_sizes,
                              returned_at, send_sizes, axis)
  else:
    back = jax.lax.all_to_all(done.reshape(ep, capacity, -1), axis, 0, 0, tiled=False)
    back = back.reshape(ep * capacity, -1)
    row = jnp.arange(num_send, dtype=jnp.int32)
    row_dst = jnp.minimum(_segment_of(jnp.cumsum(send_sizes), row), ep - 1)
    where = row_dst * capacity + jnp.minimum(row - send_offsets[row_dst], capacity - 1)
    back = jnp.where(sent[:, None], jnp.take(back, where, axis=0), 0)

  # 5. The local combine, with the combine weights.
  y = dropless_combine(back, weights[None], send_layout).reshape(n, -1)
  choice_sent = jnp.take(sent, send_layout.token_row[0], mode='fill', fill_value=False)  # [n, k]
  is_real = real > 0
  left_behind = jnp.sum(is_real & ~jnp.any(choice_sent, axis=-1), dtype=jnp.float32)
  return y, jnp.stack([left_behind, jnp.sum(is_real, dtype=jnp.float32)])[None]


def dropless_expert_parallel(x: Array, expert_index: Array, weights: Array, real: Array,
                             kernels: dict[str, Array], ffn, *, num_experts: int, tile: int,
                             kernel_specs: dict, token_axes: Sequence[str], exchange: str = 'auto',
                             capacity: Optional[int] = None, rng: Optional[Array] = None
                             ) -> tuple[Array, Array]:
  """The dropless expert layer with the experts split over the mesh's 'expert' axis (jax.shard_map).

  Each device takes its share of the N = G·T tokens (split over `token_axes`), sorts its n·k choices by
  expert, sends each device the rows of the experts it holds, runs them (`ffn`, grouped matmuls over its
  E/ep local experts) and sends the results back, then combines its tokens' k results with the weights.

  Args:
    x: <float>[G, T, H]; expert_index <int32>[G, T, k]; weights <float32>[G, T, k]; real <float>[G, T].
    kernels: {name: [E, ...]} in the mesh layout of `kernel_specs` (PartitionSpecs: the expert dim over
      'expert', an 'expert_mlp' dim over the model axes, which are then summed over after `ffn`).
    ffn: (rows [R, H], local kernels, DroplessLayout of the rows, rng or None) -> [R, H].
    token_axes: the mesh axes the flat token dimension is split over (those of logical axis 'batch'); they
      must include 'expert'.
    exchange: 'ragged' (jax.lax.ragged_all_to_all: every row sent, buffers of ep·n·k rows, never drops;
      TPU / GPU), 'capacity' (jax.lax.all_to_all of fixed buffers of `capacity` rows per source and
      destination; the CPU fallback, XLA:CPU having no ragged-all-to-all) or 'auto' (ragged on TPU / GPU
      by `target_platform`, else capacity).
    capacity: rows per (source, destination) buffer of the 'capacity' exchange; None = n·k, a device's
      whole share, so nothing can be dropped. With a smaller one, a destination's rows past it (the last in
      (expert, token) order) are not sent: that choice's output is 0, as a choice dropped for capacity.
    rng: the expert dropout key, folded with each device's mesh coordinates; None without dropout.

  Returns:
    y <float>[G, T, H] and the fraction of real tokens none of whose choices was sent (0 unless the
    capacity exchange overflowed).
  """
  if exchange not in EP_EXCHANGES:
    raise ValueError(f'Unknown expert-parallel exchange {exchange!r}; choose one of {EP_EXCHANGES}.')
  if exchange == 'auto':
    exchange = 'ragged' if target_platform() in ('gpu', 'cuda', 'rocm', 'tpu') else 'capacity'
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(mesh.shape)
  ep = sizes.get('expert', 1)
  token_axes = tuple(token_axes)
  if 'expert' not in token_axes or num_experts % ep:
    raise ValueError(f'Dropless expert parallelism needs the tokens split over the expert axis (got '
                     f'{token_axes}; partitioning.activate sets the logical axis rules) and '
                     f'NUM_EXPERTS={num_experts} divisible by it ({ep}).')
  for name, spec in kernel_specs.items():
    if spec_axes(spec[0]) != ('expert',):
      raise ValueError(f'Expert kernel {name!r} has sharding {spec}; dropless expert parallelism needs its '
                       f'expert dimension over the mesh axis "expert" (partitioning.activate sets the rules).')
  model_axes = spec_axes(kernel_specs['wo'][1])
  num_groups, num_tokens, hidden = x.shape
  k = expert_index.shape[-1]
  shards = math.prod(sizes[a] for a in token_axes)
  n_total = num_groups * num_tokens
  n_pad = -(-n_total // shards) * shards
  pad = lambda a: jnp.pad(a.reshape(n_total, *a.shape[2:]), ((0, n_pad - n_total),) + ((0, 0),) * (a.ndim - 2))
  n_local = n_pad // shards
  if capacity is None:
    capacity = n_local * k
  if capacity < 1:
    raise ValueError(f'capacity must be >= 1, got {capacity}.')
  tokens = P(token_axes)
  body = functools.partial(_local_expert_parallel, ffn=ffn, num_experts=num_experts, tile=tile,
                           exchange=exchange, capacity=min(capacity, n_local * k), model_axes=model_axes,
                           key_axes=tuple(mesh.axis_names))
  specs = {name: P(*spec) for name, spec in kernel_specs.items()}
  y, counts = jax.shard_map(
      body, in_specs=(tokens, tokens, tokens, tokens, specs, P()), out_specs=(tokens, tokens))(
          pad(x), pad(expert_index), pad(weights), pad(real.astype(jnp.float32)), kernels, rng)
  y = y[:n_total].reshape(num_groups, num_tokens, hidden)
  counts = counts.sum(0)
  return y, counts[0] / jnp.maximum(counts[1], 1.0)
