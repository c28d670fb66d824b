"""The fast gather path against the exact one-hot einsum reference: outputs and gradients, under jax.jit
and op by op (the `jit` fixture, tests/conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import dispatch, routing

G, T, E, H = 2, 10, 4, 6


def _route(probs, method_name, capacity):
  if method_name == 'experts_choose':
    return routing.experts_choose(probs, expert_capacity=capacity)
  return routing.tokens_choose(probs, num_selected_experts=2, expert_capacity=capacity,
                               batch_prioritized=method_name == 'bpr')


def _moe_like(x, logits, w, *, method, routing_name, capacity):
  """A tiny MoE: route, dispatch, a per-expert linear map, combine."""
  probs = jax.nn.softmax(logits, -1)
  route = _route(probs, routing_name, capacity)
  buffers = dispatch.dispatch(x, route, method)  # [G, E, C, H]
  outputs = jnp.tanh(jnp.einsum('gech,ehf->gecf', buffers, w))
  return dispatch.combine(outputs, route, method)


@pytest.mark.parametrize('routing_name', ['tokens_choose', 'bpr', 'experts_choose'])
@pytest.mark.parametrize('capacity', [2, 6])  # 2 drops many tokens; 6 drops few
def test_gather_equals_einsum_outputs_and_gradients(routing_name, capacity, jit):
  keys = jax.random.split(jax.random.PRNGKey(capacity), 4)
  x = jax.random.normal(keys[0], (G, T, H))
  logits = jax.random.normal(keys[1], (G, T, E))
  w = jax.random.normal(keys[2], (E, H, H))
  upstream = jax.random.normal(keys[3], (G, T, H))

  def loss(method, x, logits, w):
    y = _moe_like(x, logits, w, method=method, routing_name=routing_name, capacity=capacity)
    return jnp.sum(y * upstream), y

  results = {}
  for method in dispatch.DISPATCH_METHODS:
    fn = jax.value_and_grad(functools.partial(loss, method), argnums=(0, 1, 2), has_aux=True)
    results[method] = jit(fn, x, logits, w)
  (_, y_fast), grads_fast = results['gather']
  (_, y_ref), grads_ref = results['einsum']
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-6)
  for g_fast, g_ref in zip(grads_fast, grads_ref):
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-5, atol=1e-6)
  # The router really gets gradient through the combine weights.
  assert np.abs(np.asarray(grads_ref[1])).max() > 0


@pytest.mark.parametrize('method', dispatch.DISPATCH_METHODS)
@pytest.mark.parametrize('routing_name', ['tokens_choose', 'experts_choose'])
def test_dropped_tokens_come_back_as_zero(method, routing_name, jit):
  probs = jnp.array([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]])  # all prefer expert 0, capacity 1
  x = jnp.arange(1.0, 4.0)[None, :, None] * jnp.ones((1, 3, 2))
  if routing_name == 'tokens_choose':
    route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=1)
    buffers_0, y_0 = [[1.0, 1.0], [0.0, 0.0]], [[0.6, 0.6], [0.0, 0.0], [0.0, 0.0]]
  else:  # expert 0 takes token 1 (0.9), expert 1 token 0 (0.4); token 2 is nobody's pick
    route = jit(routing.experts_choose, probs, expert_capacity=1)
    buffers_0, y_0 = [[2.0, 2.0], [1.0, 1.0]], [[0.4, 0.4], [1.8, 1.8], [0.0, 0.0]]
  buffers = jit(dispatch.dispatch, x, route, method)
  np.testing.assert_allclose(buffers[0, :, 0], buffers_0)  # slot 0 of each expert
  y = jit(dispatch.combine, buffers, route, method)
  np.testing.assert_allclose(y[0], y_0, rtol=1e-6)


def test_gather_path_never_builds_a_dense_mask():
  """No intermediate of the fast path is as large as G·T·E·C."""
  g, t, e, h = 1, 256, 8, 4
  capacity = routing.expert_capacity(t, e, 2.0)
  x = jnp.ones((g, t, h))
  logits = jax.random.normal(jax.random.PRNGKey(0), (g, t, e))
  w = jnp.ones((e, h, h))
  fn = functools.partial(_moe_like, method='gather', routing_name='tokens_choose', capacity=capacity)
  jaxpr = jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)))(x, logits, w)
  dense_size = g * t * e * capacity
  largest = max(np.prod(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars)
  assert largest < dense_size / 4, (largest, dense_size)
  # ... while the einsum reference does build one (so this test can tell them apart).
  fn_ref = functools.partial(fn, method='einsum')
  jaxpr_ref = jax.make_jaxpr(jax.grad(lambda *a: fn_ref(*a).sum(), argnums=(0, 1, 2)))(x, logits, w)
  assert max(np.prod(v.aval.shape) for eqn in jaxpr_ref.jaxpr.eqns for v in eqn.outvars) >= dense_size


def test_unknown_method_is_rejected(jit):
  route = routing.tokens_choose(jnp.full((1, 2, 2), 0.5), num_selected_experts=1, expert_capacity=1)
  with pytest.raises(ValueError, match="'gather', 'einsum'"):
    jit(dispatch.dispatch, jnp.ones((1, 2, 3)), route, 'scatter')
  with pytest.raises(ValueError, match="'gather', 'einsum'"):
    jit(dispatch.combine, jnp.ones((1, 2, 1, 3)), route, 'scatter')
