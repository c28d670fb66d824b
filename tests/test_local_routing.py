"""Routing stays local to its group shard (issue 12, part 2): under a (data 2, expert 4, model 1) mesh of the 8
simulated CPU devices (conftest.py), the MoE layer's compiled training step gathers no [G, T, E] router tensor
across devices, and its loss and gradients equal the single-device ones.

Before moe.per_group_shard, XLA's CPU partitioner all-gathered the router probabilities ([G, T, E], or
[G, E, T] for experts-choose) for lax.top_k and routed every group on every device. One small compile per
routing method (a module fixture), its HLO read and the compiled step run.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import partitioning
from st_moe_jax.config import MoeConfig
from st_moe_jax.moe import MoeLayer

BATCH, LENGTH, HIDDEN, NUM_EXPERTS = 16, 64, 32, 4
GROUP_SIZE = 64  # 1024 tokens -> G = 16 groups of T = 64: two groups on each of the 8 batch shards
NUM_GROUPS, TOKENS = BATCH * LENGTH // GROUP_SIZE, GROUP_SIZE
METHODS = {
    'tokens_choose': dict(routing_method='tokens_choose', num_selected_experts=2),
    'batch_prioritized': dict(routing_method='tokens_choose', num_selected_experts=2,
                              batch_prioritized_routing=True),
    'experts_choose': dict(routing_method='experts_choose', num_selected_experts=1),
    'sparsemixer': dict(routing_method='sparsemixer', num_selected_experts=2),
}


def _layer(method):
  # Capacity factor 1: C = 16 slots per expert and group for 2 x 64 choices, so tokens are dropped and the
  # order of the capacity walk (token order, or by priority) matters.
  return MoeLayer(MoeConfig(num_experts=NUM_EXPERTS, expert_mlp_dim=32, expert_activations=('gelu', 'linear'),
                            group_size=GROUP_SIZE, num_expert_replicas=2, train_capacity_factor=1.0,
                            min_expert_capacity=1, **METHODS[method]))


def _loss_fn(layer):
  def loss(params, x):
    y, state = layer.apply({'params': params}, x, mutable=['intermediates'],
                           rngs={'dropout': jax.random.key(2)})
    metrics = [jnp.sum(v) for v in jax.tree.leaves(state['intermediates'])
               if jnp.issubdtype(v.dtype, jnp.floating)]
    return jnp.mean(y ** 2) + sum(metrics)
  return jax.value_and_grad(loss)


@pytest.fixture(scope='module', params=list(METHODS))
def runs(request):
  """The step on one device and on the (2, 4, 1) mesh, and the mesh step's optimized HLO."""
  layer = _layer(request.param)
  x = np.random.default_rng(0).normal(size=(BATCH, LENGTH, HIDDEN)).astype(np.float32)
  boxed = jax.jit(layer.init)({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
  params = nn.meta.unbox(boxed)['params']
  single = jax.jit(_loss_fn(layer))(params, x)

  mesh = partitioning.create_mesh(num_expert_partitions=4)
  assert tuple(mesh.shape.values()) == (2, 4, 1)
  rules = partitioning.standard_logical_axis_rules()
  param_sh = partitioning.param_shardings(boxed, mesh, rules)['params']
  params, x = jax.device_put((params, x), (param_sh, partitioning.batch_sharding(mesh)))
  with partitioning.activate(mesh, rules):
    compiled = jax.jit(_loss_fn(layer)).lower(params, x).compile()
  return {'method': request.param, 'single': jax.device_get(single),
          'mesh': jax.device_get(compiled(params, x)), 'hlo': compiled.as_text()}


def gathered_router_tensors(hlo_text, num_tokens, num_experts):
  """All-gathers of the HLO whose result has a [T, E] or [E, T] trailing pair, or is [G·T, E]."""
  found = []
  for line in hlo_text.splitlines():
    m = re.search(r'=\s*(.*?)\s+all-gather(?:-start)?\(', line)
    if not m:
      continue
    for dims in re.findall(r'\b[a-z]+[0-9]*\[([0-9,]+)\]', m.group(1)):
      shape = tuple(int(d) for d in dims.split(','))
      if (shape[-2:] in {(num_tokens, num_experts), (num_experts, num_tokens)}
          or (len(shape) == 2 and shape[1] == num_experts and shape[0] % num_tokens == 0)):
        found.append(line.strip()[:200])
        break
  return found


def test_no_router_tensor_is_gathered(runs):
  assert ' all-to-all(' in runs['hlo']  # the tokens do move to their experts
  assert not gathered_router_tensors(runs['hlo'], TOKENS, NUM_EXPERTS)


def test_routing_runs_on_each_shards_groups(runs):
  """The routing top-k and sorts see one device's 2 groups ([2, T, E] elements at most), never all 16."""
  local_elements = NUM_GROUPS // 8 * TOKENS * NUM_EXPERTS
  sorts = [line for line in runs['hlo'].splitlines()
           if re.search(r'\s(sort|custom-call)\(', line) and re.search(r'top_k|argsort', line)]
  assert sorts
  for line in sorts:
    result = line.split('=', 1)[1].split(' sort(', 1)[0].split(' custom-call(', 1)[0]
    for dims in re.findall(r'\[([0-9,]+)\]', result):
      assert np.prod([int(d) for d in dims.split(',')]) <= local_elements, line[:200]


def test_mesh_step_equals_single_device(runs):
  (want_loss, want_grads), (loss, grads) = runs['single'], runs['mesh']
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_the_check_finds_a_gathered_router_tensor():
  hlo = ('  %all-gather = f32[16,64,4]{2,1,0} all-gather(%p), channel_id=1, dimensions={0}\n'
         '  %ag = (f32[2,4,64], f32[16,4,64]) all-gather-start(%q), dimensions={0}\n'
         '  %ok = f32[16,64,32]{2,1,0} all-gather(%r), dimensions={0}\n')
  assert len(gathered_router_tensors(hlo, 64, 4)) == 2
