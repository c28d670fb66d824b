"""Dropless routing: the expert-sorted layout, the grouped matmul, and MoeLayer(dropless=True) against a
direct dense computation (every token, its k experts, its weights); no token dropped; causality."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import dispatch, routing
from st_moe_jax.config import MoeConfig
from st_moe_jax.moe import MoeLayer

B, L, H, F, E = 2, 8, 8, 16, 4
RNGS = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}


# ---------------------------------------------------------------------------------------------------------
# Layout and grouped matmul

def test_layout_sorts_choices_by_expert_and_pads_each_expert_to_tiles():
  # 1 group × 4 tokens × k=2, E=3, tile 2. Token 2 is padding.
  expert_index = jnp.array([[[2, 0], [0, 1], [1, 2], [0, 2]]], jnp.int32)
  mask = jnp.array([[1, 1, 0, 1]])
  layout = dispatch.dropless_layout(expert_index, 3, mask, tile=2)
  # Real choices: expert 0 <- (0,1), (1,0), (3,0); expert 1 <- (1,1); expert 2 <- (0,0), (3,1).
  # Expert 0 takes 3 rows, padded to 4; expert 1 takes 1, padded to 2; expert 2 takes 2.
  np.testing.assert_array_equal(layout.group_sizes, [4, 2, 2])
  empty = 4 * 2  # N·k marks a padding row
  np.testing.assert_array_equal(layout.row_choice[:8], [1, 2, 6, empty, 3, empty, 0, 7])
  assert (np.asarray(layout.row_choice[8:]) == empty).all()
  # Each choice points at its row; the padding token points past the end.
  np.testing.assert_array_equal(layout.token_row[0], [[6, 0], [1, 4], [layout.num_rows] * 2, [2, 7]])


def test_chunk_schedule_covers_every_row_of_every_expert_once():
  # tile 2, chunks of at most CHUNK_TILES·2 = 32 rows: expert 1 (70 rows) needs two full chunks and a
  # 6-row remainder, expert 3 has no rows, the others are one chunk of exactly their size.
  group_sizes = jnp.array([4, 70, 32, 0, 10], jnp.int32)
  num_rows = 128
  covered = np.zeros(num_rows, int)
  owner = np.full(num_rows, -1)
  for rows, offsets, experts, count in dispatch._chunk_schedules(group_sizes, 2, num_rows):
    assert rows <= dispatch.CHUNK_TILES * 2 and rows % 2 == 0
    for offset, expert in zip(np.asarray(offsets)[:int(count)], np.asarray(experts)[:int(count)]):
      covered[offset:offset + rows] += 1
      owner[offset:offset + rows] = expert
  np.testing.assert_array_equal(covered, np.r_[np.ones(116, int), np.zeros(12, int)])
  np.testing.assert_array_equal(owner[:116], np.repeat([0, 1, 2, 4], [4, 70, 32, 10]))


@pytest.mark.parametrize('tile', [1, 3, 8])
def test_grouped_matmul_methods_equal_a_per_row_product_with_gradients(tile):
  keys = jax.random.split(jax.random.PRNGKey(tile), 4)
  expert_index = jax.random.randint(keys[0], (2, 7, 2), 0, E).astype(jnp.int32)
  expert_index = expert_index.at[..., 1].set((expert_index[..., 0] + 1) % E)  # distinct per token
  layout = dispatch.dropless_layout(expert_index, E, tile=tile)
  rows = dispatch.dropless_dispatch(jax.random.normal(keys[1], (2, 7, H)), layout)
  kernel = jax.random.normal(keys[2], (E, H, F))
  upstream = jax.random.normal(keys[3], (layout.num_rows, F))
  # Padding rows hold zeros, any expert will do; rows past the experts' rows are 0.
  row_expert = jnp.repeat(jnp.arange(E), layout.group_sizes, total_repeat_length=layout.num_rows)
  in_use = (jnp.arange(layout.num_rows) < layout.group_sizes.sum())[:, None]

  def loss(method, rows, kernel):
    if method == 'reference':
      out = jnp.einsum('rh,rhf->rf', rows, kernel[row_expert]) * in_use
    else:
      out = dispatch.grouped_matmul(rows, kernel, layout, method)
    return jnp.sum(out * upstream), out

  results = {m: jax.value_and_grad(functools.partial(loss, m), argnums=(0, 1), has_aux=True)(rows, kernel)
             for m in ('reference', 'tiled', 'ragged_dot')}
  (_, out_ref), grads_ref = results['reference']
  for method in ('tiled', 'ragged_dot'):
    (_, out), grads = results[method]
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5, err_msg=method)
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=method)


def test_weight_gradient_is_not_materialised_per_tile():
  n, tile = 256, 2  # per-tile gradients ([R / 2, H, F]) would dwarf every [R, F] activation
  expert_index = (jnp.arange(n * 2).reshape(1, n, 2) % E).astype(jnp.int32)
  layout = dispatch.dropless_layout(expert_index, E, tile=tile)
  rows = jnp.ones((layout.num_rows, H))
  kernel = jnp.ones((E, H, F))
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: dispatch.grouped_matmul(rows, w, layout, 'tiled').sum()))(kernel)
  per_tile = (layout.num_rows // tile) * H * F
  largest = max(np.prod(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars)
  assert largest <= per_tile / 4, (largest, per_tile)


# ---------------------------------------------------------------------------------------------------------
# The layer against a direct dense computation

def _layer(**overrides):
  config = dict(num_experts=E, expert_mlp_dim=F, expert_activations=('gelu', 'linear'), group_multiple=1,
                dropless=True, dropless_tile_size=4)
  return MoeLayer(MoeConfig(**(config | overrides)))


@pytest.fixture(scope='module')
def inputs():
  return jax.random.normal(jax.random.PRNGKey(42), (B, L, H))


@pytest.fixture(scope='module')
def variables(inputs):
  variables = _layer().init(RNGS, inputs, enable_dropout=False)
  # Spread the router so that SparseMixer keeps more than one expert now and then.
  params = nn.unbox(variables)['params']
  w = params['router']['router_weights']['w']['kernel']
  params['router']['router_weights']['w']['kernel'] = w * 30.0
  return {'params': params}


def _dense_reference(params, x, routing_method, eps=0.01):
  """Every expert on every token, combined with a [B, L, E] weight matrix that is zero off the k choices."""
  logits = jnp.einsum('blh,he->ble', x, params['router']['router_weights']['w']['kernel'])
  if routing_method == 'tokens_choose':
    weights, expert_index = jax.lax.top_k(jax.nn.softmax(logits), 2)
  else:
    expert_index, weights = routing.sparsemixer(logits, num_selected_experts=2, jitter_eps=eps)
  combine = jnp.sum(jax.nn.one_hot(expert_index, E) * weights[..., None], axis=-2)  # [B, L, E]
  p = params['expert']
  hidden = nn.gelu(jnp.einsum('blh,ehf->blef', x, p['wi_0']['kernel']))
  hidden = hidden * jnp.einsum('blh,ehf->blef', x, p['wi_1']['kernel'])
  out = jnp.einsum('blef,efh->bleh', hidden, p['wo']['kernel'])
  return jnp.einsum('bleh,ble->blh', out, combine)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(layer, params, x, padding_mask=None, enable_dropout=False):
  return layer.apply({'params': params}, x, padding_mask, enable_dropout=enable_dropout,
                     rngs={'dropout': jax.random.PRNGKey(5)}, mutable=['intermediates'])


@pytest.mark.parametrize('routing_method', ['tokens_choose', 'sparsemixer'])
def test_dropless_layer_equals_dense_reference_in_outputs_and_gradients(variables, inputs, routing_method):
  upstream = jax.random.normal(jax.random.PRNGKey(7), inputs.shape)
  eps = 0.5  # soft SparseMixer gates, so that the router gets gradient
  layer = _layer(routing_method=routing_method, sparsemixer_eps=eps)

  def loss_layer(params, x):
    y, state = _apply(layer, params, x)
    return jnp.sum(y * upstream), state

  def loss_ref(params, x):
    return jnp.sum(_dense_reference(params, x, routing_method, eps) * upstream)

  (value, state), grads = jax.value_and_grad(loss_layer, argnums=(0, 1), has_aux=True)(
      variables['params'], inputs)
  value_ref, grads_ref = jax.value_and_grad(loss_ref, argnums=(0, 1))(variables['params'], inputs)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  router_grad = grads[0]['router']['router_weights']['w']['kernel']
  assert np.abs(np.asarray(router_grad)).max() > 0
  assert float(state['intermediates']['fraction_tokens_left_behind'][0]) == 0.0


@pytest.mark.parametrize('routing_method', ['tokens_choose', 'sparsemixer'])
def test_training_mode_equals_the_capacity_path_when_nothing_drops(variables, inputs, routing_method):
  """Same sampled choices (same 'dropout' stream) and jitter: dropless = capacity path with C = T."""
  upstream = jax.random.normal(jax.random.PRNGKey(8), inputs.shape)
  config = dict(routing_method=routing_method, jitter_noise=0.1, sparsemixer_eps=0.3,
                train_capacity_factor=float(E))

  def loss(dropless, params, x):
    y, state = _apply(_layer(dropless=dropless, **config), params, x, enable_dropout=True)
    return jnp.sum(y * upstream), state

  out = {d: jax.value_and_grad(functools.partial(loss, d), argnums=(0, 1), has_aux=True)(
      variables['params'], inputs) for d in (False, True)}
  (v_cap, s_cap), g_cap = out[False]
  (v_drop, s_drop), g_drop = out[True]
  assert float(s_cap['intermediates']['fraction_tokens_left_behind'][0]) == 0.0
  np.testing.assert_allclose(v_drop, v_cap, rtol=1e-5)
  for g, g_ref in zip(jax.tree_util.tree_leaves(g_drop), jax.tree_util.tree_leaves(g_cap)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  for name in ('auxiliary_loss', 'router_z_loss', 'router_confidence'):
    np.testing.assert_allclose(s_drop['intermediates'][name][0], s_cap['intermediates'][name][0],
                               rtol=1e-5)


def test_no_token_is_dropped_even_when_the_router_is_skewed(variables, inputs):
  params = jax.tree_util.tree_map(lambda a: a, variables['params'])
  w = params['router']['router_weights']['w']['kernel']
  params['router']['router_weights']['w']['kernel'] = w.at[:, 0].add(50.0)  # everything wants expert 0
  x = jnp.abs(inputs)
  _, capped = _apply(_layer(dropless=False, eval_capacity_factor=1.0, min_expert_capacity=1), params, x)
  assert float(capped['intermediates']['fraction_tokens_left_behind'][0]) > 0.3
  y, state = _apply(_layer(), params, x)
  assert float(state['intermediates']['fraction_tokens_left_behind'][0]) == 0.0
  np.testing.assert_allclose(y, _dense_reference(params, x, 'tokens_choose'), rtol=1e-4, atol=1e-5)


def test_padding_tokens_get_no_row_and_no_influence(variables, inputs):
  mask = jnp.ones((B, L)).at[0, 5:].set(0).at[1, 0].set(0)
  y, _ = _apply(_layer(), variables['params'], inputs, mask)
  y_noisy, _ = _apply(_layer(), variables['params'], jnp.where(mask[..., None] > 0, inputs, 100.0), mask)
  np.testing.assert_array_equal(np.asarray(y)[np.asarray(mask) == 0], 0.0)
  np.testing.assert_allclose(y, y_noisy, rtol=1e-6, atol=1e-6)
  ref = _dense_reference(variables['params'], inputs, 'tokens_choose') * mask[..., None]
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_dropless_rejects_experts_choose():
  with pytest.raises(ValueError, match='dropless'):
    _layer(routing_method='experts_choose').init(RNGS, jnp.ones((B, L, H)), enable_dropout=False)


# ---------------------------------------------------------------------------------------------------------
# Causality: with nothing dropped, a token's output depends on that token alone

@pytest.mark.parametrize('routing_method', ['tokens_choose', 'sparsemixer'])
@pytest.mark.parametrize('dropless', [True, False])
def test_future_tokens_never_change_past_outputs(variables, inputs, routing_method, dropless):
  # The capacity path qualifies only when nothing can drop (C = T) and without BPR.
  layer = _layer(routing_method=routing_method, dropless=dropless, eval_capacity_factor=float(E),
                 batch_prioritized_routing=False)
  y, _ = _apply(layer, variables['params'], inputs)
  for p in (1, 4, L - 1):
    changed = inputs.at[:, p:].set(jax.random.normal(jax.random.PRNGKey(p), (B, L - p, H)) * 3.0)
    y_changed, _ = _apply(layer, variables['params'], changed)
    # Dropless chunk boundaries follow the group sizes, which future tokens change, so a past row may be
    # summed in another order (float32 rounding, ~1e-7); a leak of information would be orders larger.
    np.testing.assert_allclose(y_changed[:, :p], y[:, :p], rtol=0, atol=1e-6)
    assert not np.allclose(y_changed[:, p:], y[:, p:])
