"""Dropless routing with expert parallelism (dispatch.dropless_expert_parallel): on 8 simulated CPU devices
(tests/conftest.py) the layer under a mesh with an expert axis > 1 equals the single-device dropless layer in
outputs and gradients; the ragged exchange (TPU / GPU) checked on CPU with an emulated ragged_all_to_all;
the CPU fallback's capacity overflow; and the TPU compile of the path (ragged-all-to-all, ragged_dot)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from st_moe_jax import dispatch, partitioning
from st_moe_jax.config import MoeConfig
from st_moe_jax.layers import gated_ffn
from st_moe_jax.moe import MoeLayer

H, F, E = 8, 16, 8


def _layer(**overrides):
  config = dict(num_experts=E, expert_mlp_dim=F, expert_activations=('gelu', 'linear'), group_multiple=1,
                dropless=True, dropless_tile_size=4, sparsemixer_eps=0.5)
  return MoeLayer(MoeConfig(**(config | overrides)))


@pytest.fixture(scope='module')
def params():
  variables = _layer().init({'params': jax.random.PRNGKey(0)}, jnp.ones((2, 4, H)), enable_dropout=False)
  params = nn.unbox(variables)['params']
  w = params['router']['router_weights']['w']['kernel']  # spread the router: uneven expert loads
  params['router']['router_weights']['w']['kernel'] = w * 10.0
  return params


def _value_and_grads(layer, params, x, mask, train):
  """(y, fraction_tokens_left_behind, (d params, d x)) of sum(y · upstream), and the compiled HLO text."""
  upstream = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(params, x):
    y, state = layer.apply({'params': params}, x, mask, enable_dropout=train,
                           rngs={'dropout': jax.random.PRNGKey(3)}, mutable=['intermediates'])
    return jnp.sum(y * upstream), (y, state['intermediates']['fraction_tokens_left_behind'][0])

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(params, x).compile()
  (_, (y, left_behind)), grads = step(params, x)
  return y, left_behind, grads, step.as_text()


def _check_equal(params, batch, length, mesh_shape, routing_method='tokens_choose', train=False,
                 padding=False):
  x = jax.random.normal(jax.random.PRNGKey(batch * length), (batch, length, H))
  mask = jnp.ones((batch, length)).at[0, length // 2:].set(0) if padding else None
  layer = _layer(routing_method=routing_method)
  y_ref, _, grads_ref, hlo_ref = _value_and_grads(layer, params, x, mask, train)
  data, expert, model = mesh_shape
  mesh = partitioning.create_mesh(jax.devices()[:data * expert * model], expert, model)
  assert tuple(mesh.shape.values()) == mesh_shape
  with partitioning.activate(mesh):
    y, left_behind, grads, hlo = _value_and_grads(layer, params, x, mask, train)
  assert ' all-to-all(' in hlo and ' all-to-all(' not in hlo_ref  # the expert-parallel path ran
  assert float(left_behind) == 0.0
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  flat, flat_ref = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_ref)
  for (path, g), g_ref in zip(flat, flat_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert np.abs(np.asarray(grads[0]['expert']['wo']['kernel'])).max() > 0
  return y


@pytest.mark.parametrize('mesh_shape,batch,length,routing_method,train,padding', [
    ((1, 8, 1), 4, 8, 'tokens_choose', False, False),
    ((1, 8, 1), 3, 5, 'tokens_choose', False, True),  # 15 tokens: padded to 16 over the 8 shards
    ((2, 4, 1), 4, 8, 'tokens_choose', False, False),
    ((2, 4, 1), 4, 8, 'sparsemixer', True, True),  # sampled choices (the same 'dropout' stream)
    ((1, 4, 2), 2, 8, 'tokens_choose', False, False),  # expert_mlp over 'model': partial sums
])
def test_expert_parallel_layer_equals_single_device_in_outputs_and_gradients(
    params, mesh_shape, batch, length, routing_method, train, padding):
  _check_equal(params, batch, length, mesh_shape, routing_method, train, padding)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                axis_name):
  """jax.lax.ragged_all_to_all's documented semantics from all_gathers (XLA:CPU has no ragged-all-to-all):
  source s writes operand_s[input_offsets_s[me] : + send_sizes_s[me]] at output[output_offsets_s[me]:]."""
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)
  starts, sizes, lands = (jax.lax.all_gather(a, axis_name)[:, me]
                          for a in (input_offsets, send_sizes, output_offsets))
  row = jnp.arange(output.shape[0])
  for s in range(operands.shape[0]):
    inside = (row >= lands[s]) & (row < lands[s] + sizes[s])
    taken = jnp.take(operands[s], jnp.clip(starts[s] + row - lands[s], 0, operand.shape[0] - 1), axis=0)
    output = jnp.where(inside[:, None], taken, output)
  return output


def test_ragged_exchange_equals_single_device_with_an_emulated_ragged_all_to_all(params, monkeypatch):
  """The TPU / GPU path (ragged exchange, ragged_dot grouped matmuls) run on CPU: its offsets and sizes."""
  monkeypatch.setattr(dispatch, '_ragged_all_to_all', _emulated_ragged_all_to_all)
  real_platform = dispatch.target_platform
  inside = lambda: jax.sharding.get_abstract_mesh().shape.get('expert', 1) > 1
  monkeypatch.setattr(dispatch, 'target_platform', lambda: 'tpu' if inside() else real_platform())
  calls = []
  original = dispatch._local_expert_parallel
  monkeypatch.setattr(dispatch, '_local_expert_parallel',
                      lambda *a, **kw: calls.append(kw['exchange']) or original(*a, **kw))
  _check_equal(params, 4, 8, (2, 4, 1))
  assert set(calls) == {'ragged'}


def _ffn(rows, kernels, layout, rng):
  del rng
  grouped = lambda r, ks: list(dispatch.grouped_matmuls(r, ks, layout, 'tiled'))
  return gated_ffn(rows, kernels, ('relu',), matmul=grouped)


def test_capacity_overflow_drops_the_last_rows_of_a_destination():
  """The CPU fallback with capacity 3: every token wants expert 0 (device 0); each device's 4 tokens send
  only their first 3 rows, the 4th token's choice gets no expert output and is left behind."""
  mesh = partitioning.create_mesh(jax.devices()[:8], 8, 1)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (4, 8, H))  # 32 tokens, 4 per device
  expert_index = jnp.zeros((4, 8, 1), jnp.int32)
  weights = jax.random.uniform(keys[1], (4, 8, 1))
  kernels = {'wi': jax.random.normal(keys[2], (E, H, F)), 'wo': jax.random.normal(keys[3], (E, F, H))}
  specs = {'wi': ('expert', None, None), 'wo': ('expert', None, None)}
  run = functools.partial(dispatch.dropless_expert_parallel, num_experts=E, tile=2, kernel_specs=specs,
                          token_axes=('expert', 'data'), exchange='capacity')
  with partitioning.activate(mesh):
    y, left_behind = jax.jit(lambda *a: run(*a, _ffn, capacity=3))(x, expert_index, weights, jnp.ones((4, 8)),
                                                                    kernels)
    y_full, none_left = jax.jit(lambda *a: run(*a, _ffn))(x, expert_index, weights, jnp.ones((4, 8)), kernels)
  full = jnp.maximum(x @ kernels['wi'][0], 0) @ kernels['wo'][0] * weights
  kept = (jnp.arange(32) % 4 < 3).reshape(4, 8, 1)  # a device's tokens are 4 consecutive flat tokens
  np.testing.assert_allclose(y_full, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, jnp.where(kept, full, 0), rtol=1e-5, atol=1e-5)
  assert float(none_left) == 0.0 and float(left_behind) == pytest.approx(0.25)


def test_tpu_compile_of_the_expert_parallel_path_has_ragged_collectives():
  """The train-style gradient of the layer compiled for a v5p:2x2x1 slice (mesh 1×4×1): the exchange is a
  ragged-all-to-all in the optimized HLO, the grouped matmul a ragged_dot."""
  pytest.importorskip('libtpu', reason='libtpu (requirements-test.txt) compiles for TPU topologies')
  from st_moe_jax import compile_tpu  # pylint: disable=g-import-not-at-top
  layer = _layer(num_experts=4)
  mesh = Mesh(np.asarray(compile_tpu.topology_devices('v5p:2x2x1')).reshape(1, 4, 1), partitioning.MESH_AXES)
  x = jax.ShapeDtypeStruct((4, 8, H), jnp.float32)
  with partitioning.activate(mesh):
    abstract = jax.eval_shape(lambda: nn.unbox(layer.init({'params': jax.random.PRNGKey(0)}, jnp.ones(x.shape),
                                                           enable_dropout=False))['params'])
    loss = lambda p, x: jnp.sum(layer.apply({'params': p}, x, enable_dropout=False, mutable=['intermediates'])[0])
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abstract, x)
    hlo = lowered.compile().as_text()
  assert 'ragged_dot' in lowered.as_text()
  # Forward and backward: two exchanges each (there and back), counted by compile_tpu's report.
  assert len(re.findall(r'\sragged-all-to-all\(', hlo)) >= 4
  assert compile_tpu.hlo_collectives(hlo)['ragged-all-to-all']['count'] >= 4


def test_expert_dropout_runs_inside_the_expert_parallel_path(params):
  """Expert dropout under expert parallelism: a key folded with the mesh coordinates (masks differ from the
  single-device path's); with dropout the output changes, is finite, and is the same for the same key."""
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, H))
  mesh = partitioning.create_mesh(jax.devices()[:8], 8, 1)

  def apply(rate, seed):
    y, _ = _layer(expert_dropout_rate=rate).apply({'params': params}, x, enable_dropout=True,
                                                  rngs={'dropout': jax.random.PRNGKey(seed)},
                                                  mutable=['intermediates'])
    return y

  with partitioning.activate(mesh):
    run = jax.jit(apply, static_argnums=(0,))
    y0, y1, y1_again, y2 = run(0.0, 1), run(0.5, 1), run(0.5, 1), run(0.5, 2)
  assert np.isfinite(np.asarray(y1)).all()
  np.testing.assert_array_equal(y1, y1_again)
  assert not np.allclose(y1, y0) and not np.allclose(y1, y2)
