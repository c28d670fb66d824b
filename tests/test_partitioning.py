"""Mesh construction, shardings, and multi-device training equal to the single-device run.

conftest.py gives 8 simulated CPU devices. One compiled 3-step run per mesh (module-scoped fixtures).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from st_moe_jax.config import MoeConfig
from st_moe_jax import losses, optim, partitioning
from st_moe_jax.layers import Dense
from st_moe_jax.moe import MoeLayer

NUM_STEPS = 3
MESHES = {  # (data, expert, model): (NUM_EXPERT_PARTITIONS, NUM_MODEL_PARTITIONS)
    (8, 1, 1): (1, 1),
    (2, 4, 1): (4, 1),
    (1, 8, 1): (8, 1),
    (1, 4, 2): (4, 2),
}


@pytest.mark.parametrize('devices,expert,model,want', [
    (8, 1, 1, (8, 1, 1)), (8, 4, 1, (2, 4, 1)), (8, 8, 1, (1, 8, 1)), (8, 4, 2, (1, 4, 2)),
    (8, 6, 1, (2, 4, 1)),    # NUM_EXPERT_PARTITIONS is an upper bound: largest divisor of 8 that is <= 6
    (8, 64, 2, (1, 4, 2)),   # capped by devices / model partitions
    (6, 4, 1, (2, 3, 1)),
])
def test_mesh_shape(devices, expert, model, want):
  assert partitioning.mesh_shape(devices, expert, model) == want


def test_create_mesh_on_8_devices():
  assert jax.device_count() == 8, 'tests/conftest.py should simulate 8 CPU devices'
  for (data, expert, model), (e, m) in MESHES.items():
    mesh = partitioning.create_mesh(num_expert_partitions=e, num_model_partitions=m)
    assert mesh.axis_names == ('data', 'expert', 'model')
    assert tuple(mesh.shape.values()) == (data, expert, model)
    assert partitioning.num_expert_replicas(mesh) == data
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_bad_configurations_say_what_to_change():
  mesh = partitioning.create_mesh(num_expert_partitions=4)
  with pytest.raises(ValueError, match=r'BATCH_SIZE=12 .*data=2 x expert=4 = 8'):
    partitioning.check_batch_size(12, mesh)
  partitioning.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match=r'BATCH_SIZE=4'):
    partitioning.batch_shardings({'targets': np.zeros((4, 3))}, mesh)
  with pytest.raises(ValueError, match=r'NUM_EXPERTS=6 is not divisible by NUM_EXPERT_PARTITIONS=4'):
    partitioning.check_num_experts(6, 4)
  with pytest.raises(ValueError, match=r'NUM_EXPERTS=6 .*mesh expert axis \(4'):
    partitioning.check_num_experts(6, 6, partitioning.create_mesh(num_expert_partitions=6))
  partitioning.check_num_experts(8, 4, mesh)
  with pytest.raises(ValueError, match=r'NUM_MODEL_PARTITIONS=3 .*\[1, 2, 4, 8\]'):
    partitioning.mesh_shape(8, 1, 3)


def test_logical_rules_map_moe_axes():
  rules = partitioning.standard_logical_axis_rules()
  to_mesh = lambda *names: nn.logical_to_mesh_axes(names, rules)
  assert to_mesh('batch', 'length', 'embed') == P(('expert', 'data'), None, None)
  assert to_mesh('expert', 'mlp_embed', 'expert_mlp') == P('expert', None, 'model')
  assert to_mesh('expert', 'expert_replicas', 'mlp_embed') == P('expert', 'data', None)
  assert to_mesh('embed', 'vocab') == P(None, 'model')
  assert to_mesh('embed', 'unmodeled') == P(None, None)


# ---------------------------------------------------------------------------------------------------------
# A tiny MoE model trained for 3 steps, on one device and on each mesh.

NUM_EXPERTS, VOCAB = 8, 8


class TinyMoeModel(nn.Module):
  """Dense → residual MoE → Dense to logits. 32 tokens in 8 groups of 4, capacity 2."""

  @nn.compact
  def __call__(self, x):
    h = Dense(8, ('unmodeled', 'embed'), name='dense_in')(x)
    h = h + MoeLayer(MoeConfig(
        num_experts=NUM_EXPERTS, expert_mlp_dim=8, expert_activations=('gelu', 'linear'), num_selected_experts=2,
        group_size=4, group_multiple=8, train_capacity_factor=4.0, min_expert_capacity=1), name='moe')(h, enable_dropout=True)
    return Dense(VOCAB, ('embed', 'vocab'), name='dense_out')(h)


def _batch():
  rng = np.random.default_rng(0)
  targets = rng.integers(1, VOCAB, size=(8, 4)).astype(np.int32)
  targets[-1, -2:] = 0  # some padding
  return {'inputs': rng.normal(size=(8, 4, 4)).astype(np.float32), 'targets': targets}


MODEL = TinyMoeModel()
BOXED = jax.jit(MODEL.init)(jax.random.key(0), _batch()['inputs'])  # jit: one compile, not op by op
RULES = optim.factor_rules(BOXED)['params']
TX = optim.adafactor(0.1, RULES, min_dim_size_to_factor=4)  # factor the tiny kernels too


def train_step(params, opt_state, batch):
  def loss_fn(p):
    logits, state = MODEL.apply({'params': p}, batch['inputs'], mutable=['intermediates'])
    return losses.compute_loss(logits, batch['targets'], intermediates=state['intermediates'],
                               router_z_loss_factor=1e-2)

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _train(step_fn, params, opt_state, batch):
  step_losses = []
  for _ in range(NUM_STEPS):
    params, opt_state, loss = step_fn(params, opt_state, batch)
    step_losses.append(float(loss))
  return params, opt_state, np.array(step_losses)


@pytest.fixture(scope='module')
def single_device_run():
  params = nn.meta.unbox(BOXED)['params']
  params, _, step_losses = _train(jax.jit(train_step), params, TX.init(params), _batch())
  return jax.device_get(params), step_losses


@pytest.fixture(scope='module', params=list(MESHES), ids=lambda s: 'x'.join(map(str, s)))
def mesh_run(request):
  num_expert_partitions, num_model_partitions = MESHES[request.param]
  mesh = partitioning.create_mesh(num_expert_partitions=num_expert_partitions,
                                  num_model_partitions=num_model_partitions)
  partitioning.check_num_experts(NUM_EXPERTS, num_expert_partitions, mesh)
  rules = partitioning.standard_logical_axis_rules()
  params = nn.meta.unbox(BOXED)['params']
  param_sh = partitioning.param_shardings(BOXED, mesh, rules)['params']
  opt_state = TX.init(params)
  opt_sh = partitioning.opt_state_shardings(opt_state, params, param_sh)
  batch = _batch()
  batch_sh = partitioning.batch_shardings(batch, mesh)
  params, opt_state, batch = jax.device_put((params, opt_state, batch), (param_sh, opt_sh, batch_sh))
  with partitioning.activate(mesh, rules):
    step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_sh),
                   out_shardings=(param_sh, opt_sh, partitioning.replicated(mesh)))
    compiled = step.lower(params, opt_state, batch).compile()
  params, opt_state, step_losses = _train(compiled, params, opt_state, batch)
  return {'mesh': mesh, 'params': params, 'opt_state': opt_state, 'losses': step_losses,
          'hlo': compiled.as_text()}


def test_mesh_training_matches_single_device(mesh_run, single_device_run):
  want_params, want_losses = single_device_run
  np.testing.assert_allclose(mesh_run['losses'], want_losses, rtol=1e-5)
  assert want_losses[-1] < want_losses[0]  # it trains
  got = jax.device_get(mesh_run['params'])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_expert_params_and_their_optimizer_state_are_sharded_over_experts(mesh_run):
  mesh = mesh_run['mesh']
  expert, model = mesh.shape['expert'], mesh.shape['model']
  wi = mesh_run['params']['moe']['expert']['wi_0']['kernel']  # [E, H, F]
  assert wi.sharding.spec == P('expert', None, 'model')
  assert wi.addressable_shards[0].data.shape == (NUM_EXPERTS // expert, 8, 8 // model)
  out = mesh_run['params']['dense_out']['kernel']  # [H, V]
  assert out.sharding.spec == P(None, 'model')
  # Factored statistics keep the expert axis (and the model axis where it survives the reduction).
  stats = mesh_run['opt_state'][0]
  v_row = stats.v_row['moe']['expert']['wi_0']['kernel']
  v_col = stats.v_col['moe']['expert']['wi_0']['kernel']
  assert v_row.shape == (NUM_EXPERTS, 8, 1) and v_col.shape == (NUM_EXPERTS, 1, 8)
  assert v_row.sharding.spec == P('expert', None, None)
  assert v_col.sharding.spec == P('expert', None, 'model')
  assert v_col.addressable_shards[0].data.shape == (NUM_EXPERTS // expert, 1, 8 // model)
  assert stats.count.sharding.spec == P()


def test_hlo_moves_tokens_to_experts_with_all_to_all(mesh_run):
  hlo = mesh_run['hlo']
  if mesh_run['mesh'].shape['expert'] > 1:
    assert 'all-to-all' in hlo
  else:
    assert 'all-to-all' not in hlo  # pure data parallelism: experts replicated, no token exchange


def test_opt_state_shardings_follow_params_through_freeze_and_momentum():
  # Abstract state only: no compile. Frozen params have no state; momentum mirrors the kept params.
  mesh = partitioning.create_mesh(num_expert_partitions=4, num_model_partitions=2)
  params = jax.eval_shape(lambda: nn.meta.unbox(BOXED)['params'])
  param_sh = partitioning.param_shardings(BOXED, mesh)['params']
  tx = optim.freeze(optim.adafactor(0.1, RULES, min_dim_size_to_factor=4, momentum=0.9), [r'^dense_in/'])
  shardings = partitioning.opt_state_shardings(jax.eval_shape(tx.init, params), params, param_sh)
  trained = shardings.inner_states['trained'].inner_state
  # wo [E, F, H] ('expert', 'expert_mlp', 'mlp_embed'): row statistics keep H (t5x's row), column
  # statistics keep F (model-sharded).
  assert trained[0].v_row['moe']['expert']['wo']['kernel'].spec == P('expert', None, None)
  assert trained[0].v_col['moe']['expert']['wo']['kernel'].spec == P('expert', 'model', None)
  assert trained[0].count.spec == P()
  assert trained[-1].ema['moe']['expert']['wo']['kernel'].spec == P('expert', 'model', None)
  assert trained[-1].ema['dense_out']['kernel'].spec == P(None, 'model')
  assert isinstance(trained[-1].ema['dense_in']['kernel'], optax.MaskedNode)
