"""Routing math against hand-computed cases and a loop-by-loop reference of docs/routing.md, each case both
under jax.jit and op by op (the `jit` fixture, tests/conftest.py)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import routing


def _buffers(route):
  return np.asarray(route.buffer_token), np.asarray(route.buffer_weight)


# ---------------------------------------------------------------------------------------------------------
# A plain-Python reference of docs/routing.md §3 and §4, written as the spec reads (loops, no sorting tricks).

def reference_tokens_choose(probs, k, capacity, bpr=False, mask=None):
  probs = np.asarray(probs, np.float32)
  num_groups, num_tokens, num_experts = probs.shape
  mask = np.ones((num_groups, num_tokens)) if mask is None else np.asarray(mask)
  buffer_token = np.full((num_groups, num_experts, capacity), num_tokens)
  buffer_weight = np.zeros((num_groups, num_experts, capacity), np.float32)
  for g in range(num_groups):
    # top-k with ties to the lower index: sort by (-prob, index)
    choices = [sorted(range(num_experts), key=lambda e: (-probs[g, t, e], e))[:k] for t in range(num_tokens)]
    order = list(range(num_tokens))
    if bpr:
      order = sorted(order, key=lambda t: (mask[g, t] == 0, -probs[g, t, choices[t][0]], t))
    used = [0] * num_experts
    for rank in range(k):
      for t in order:
        if mask[g, t] == 0:
          continue
        e = choices[t][rank]
        if used[e] < capacity:
          buffer_token[g, e, used[e]] = t
          buffer_weight[g, e, used[e]] = probs[g, t, e]
        used[e] += 1
  return buffer_token, buffer_weight


def reference_experts_choose(probs, capacity, mask=None):
  probs = np.asarray(probs, np.float32)
  num_groups, num_tokens, num_experts = probs.shape
  mask = np.ones((num_groups, num_tokens)) if mask is None else np.asarray(mask)
  buffer_token = np.full((num_groups, num_experts, capacity), num_tokens)
  buffer_weight = np.zeros((num_groups, num_experts, capacity), np.float32)
  for g in range(num_groups):
    for e in range(num_experts):
      real = [t for t in range(num_tokens) if mask[g, t]]
      ranked = sorted(real, key=lambda t: (-probs[g, t, e], t))[:capacity]
      for c, t in enumerate(ranked):
        buffer_token[g, e, c] = t
        buffer_weight[g, e, c] = probs[g, t, e]
  return buffer_token, buffer_weight


# ---------------------------------------------------------------------------------------------------------
# The test setup itself (tests/conftest.py)

def test_jit_fixture_traces_or_runs_op_by_op(jit, request):
  seen = []

  def probe(x, *, n):
    seen.append(isinstance(x, jax.core.Tracer))
    return x * n

  np.testing.assert_allclose(jit(probe, jnp.ones(2), n=3), [3.0, 3.0])
  assert seen == [request.node.callspec.params['jit']]


def test_rank_promotion_raises_in_the_suite():
  with pytest.raises(ValueError, match="jax_numpy_rank_promotion='raise'"):
    jnp.ones((2, 3)) + jnp.ones(3)  # pylint: disable=expression-not-assigned
  np.testing.assert_array_equal(jnp.ones((2, 3)) + jnp.ones(3)[None], 2.0)
  assert os.environ['JAX_NUMPY_RANK_PROMOTION'] == 'raise'  # inherited by the subprocesses tests start


# ---------------------------------------------------------------------------------------------------------
# Capacity and losses

def test_expert_capacity_rounds_like_python_and_respects_minimum():
  assert routing.expert_capacity(12, 4, 1.25, min_capacity=1) == 4  # round(3.75)
  assert routing.expert_capacity(10, 4, 1.0, min_capacity=1) == 2  # round(2.5) = 2 (banker's)
  assert routing.expert_capacity(14, 4, 1.0, min_capacity=1) == 4  # round(3.5) = 4
  assert routing.expert_capacity(8, 4, 1.0) == 4  # min_capacity default 4 wins over 2
  assert routing.expert_capacity(4096, 8, 1.25) == 640


@pytest.mark.parametrize('kwargs, match', [
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(capacity_factor=-1.0), 'capacity_factor'),
    (dict(num_experts=0), 'num_experts'),
    (dict(min_capacity=0), 'min_capacity'),
])
def test_expert_capacity_rejects_bad_input(kwargs, match):
  args = dict(tokens_per_group=16, num_experts=4, capacity_factor=1.0) | kwargs
  with pytest.raises(ValueError, match=match):
    routing.expert_capacity(**args)


def test_router_z_loss_hand_computed_and_padding_excluded(jit):
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # logsumexp: log 2, log 4
  expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
  np.testing.assert_allclose(jit(routing.router_z_loss, logits), expected, rtol=1e-6)
  mask = jnp.array([[1, 0]])
  np.testing.assert_allclose(jit(routing.router_z_loss, logits, mask), math.log(2) ** 2, rtol=1e-6)


def test_load_balancing_loss_hand_computed(jit):
  probs = jnp.array([[[0.8, 0.2], [0.6, 0.4]]])
  top1 = jnp.array([[[0], [0]]])
  # f = [1, 0], P = [0.7, 0.3]: E^2 * mean_e(f*P) = 4 * 0.35 = 1.4
  np.testing.assert_allclose(jit(routing.load_balancing_loss, probs, top1), 1.4, rtol=1e-6)
  # A padding token that would have changed both f and P is left out of numerator and denominator.
  probs_pad = jnp.array([[[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]]])
  top1_pad = jnp.array([[[0], [0], [1]]])
  mask = jnp.array([[1, 1, 0]])
  np.testing.assert_allclose(jit(routing.load_balancing_loss, probs_pad, top1_pad, mask), 1.4, rtol=1e-6)
  assert not np.isclose(jit(routing.load_balancing_loss, probs_pad, top1_pad), 1.4)


def test_load_balancing_loss_is_one_at_balance_and_k_for_top_k(jit):
  probs = jnp.full((2, 4, 4), 0.25)
  top1 = jnp.array([[[0], [1], [2], [3]]] * 2)
  np.testing.assert_allclose(jit(routing.load_balancing_loss, probs, top1), 1.0, rtol=1e-6)
  top2 = jnp.array([[[0, 1], [1, 2], [2, 3], [3, 0]]] * 2)
  np.testing.assert_allclose(jit(routing.load_balancing_loss, probs, top2), 2.0, rtol=1e-6)


def test_load_balancing_loss_skips_empty_groups(jit):
  probs = jnp.array([[[0.8, 0.2], [0.6, 0.4]], [[0.5, 0.5], [0.5, 0.5]]])
  top1 = jnp.array([[[0], [0]], [[1], [1]]])
  mask = jnp.array([[1, 1], [0, 0]])
  np.testing.assert_allclose(jit(routing.load_balancing_loss, probs, top1, mask), 1.4, rtol=1e-6)


def test_losses_reject_integer_inputs_and_bad_masks(jit):
  with pytest.raises(TypeError, match='router_logits'):
    jit(routing.router_z_loss, jnp.zeros((1, 2, 2), jnp.int32))
  with pytest.raises(ValueError, match='padding_mask'):
    jit(routing.router_z_loss, jnp.zeros((1, 2, 2)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match='padding_mask'):
    jit(routing.load_balancing_loss, jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 1), jnp.int32), jnp.ones((2, 2)))


# ---------------------------------------------------------------------------------------------------------
# Tokens choose

def test_ties_go_to_lower_expert_index(jit):
  probs = jnp.array([[[0.4, 0.4, 0.2]]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=1)
  assert route.expert_index.tolist() == [[[0]]]
  tokens, _ = _buffers(route)
  assert tokens[0, :, 0].tolist() == [0, 1, 1]  # token 0 in expert 0; experts 1, 2 empty (T = 1)


def test_capacity_overflow_keeps_earliest_tokens(jit):
  probs = jnp.array([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]])  # every token prefers expert 0
  route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=1)
  tokens, weights = _buffers(route)
  assert tokens.tolist() == [[[0], [3]]]  # token 0 wins; tokens 1 and 2 dropped; expert 1 empty
  np.testing.assert_allclose(weights, [[[0.6], [0.0]]])


def test_batch_prioritized_routing_changes_winner(jit):
  probs = jnp.array([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=2, batch_prioritized=True)
  tokens, weights = _buffers(route)
  assert tokens.tolist() == [[[1, 2], [3, 3]]]  # most confident tokens 1 then 2 take the slots
  np.testing.assert_allclose(weights, [[[0.9, 0.7], [0.0, 0.0]]])


def test_batch_prioritized_routing_keeps_token_order_on_equal_confidence(jit):
  probs = jnp.array([[[0.7, 0.3], [0.9, 0.1], [0.7, 0.3]]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=2, batch_prioritized=True)
  assert _buffers(route)[0].tolist() == [[[1, 0], [3, 3]]]


def test_second_choices_lose_slots_to_first_choices(jit):
  # token 0: first choice e1, second e0; token 1: first e0, second e1.
  probs = jnp.array([[[0.4, 0.6], [0.7, 0.3]]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=2, expert_capacity=1)
  tokens, weights = _buffers(route)
  # Walked token-major, token 0's second choice would have taken expert 0 before token 1's first choice.
  assert tokens.tolist() == [[[1], [0]]]
  np.testing.assert_allclose(weights, [[[0.7], [0.6]]])
  route2 = jit(routing.tokens_choose, probs, num_selected_experts=2, expert_capacity=2)
  tokens2, weights2 = _buffers(route2)
  assert tokens2.tolist() == [[[1, 0], [0, 1]]]  # second choices take slot 1
  np.testing.assert_allclose(weights2, [[[0.7, 0.4], [0.6, 0.3]]])


def test_padding_tokens_take_no_slot(jit):
  probs = jnp.array([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]])
  mask = jnp.array([[0, 1, 1]])
  for bpr in (False, True):
    route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=1, padding_mask=mask,
                batch_prioritized=bpr)
    assert _buffers(route)[0].tolist() == [[[1], [3]]]


def test_combine_weights_are_not_renormalised(jit):
  probs = jnp.array([[[0.5, 0.3, 0.2]]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=2, expert_capacity=1)
  _, weights = _buffers(route)
  np.testing.assert_allclose(weights[0, :, 0], [0.5, 0.3, 0.0])


@pytest.mark.parametrize('seed', range(6))
def test_tokens_choose_matches_loop_reference(seed, jit):
  rng = np.random.default_rng(seed)
  num_groups, num_tokens, num_experts = 2, int(rng.integers(3, 12)), int(rng.integers(2, 6))
  k = int(rng.integers(1, num_experts + 1))
  capacity = int(rng.integers(1, 5))
  # Coarse values make ties common, in probabilities and in confidence.
  logits = rng.integers(0, 4, size=(num_groups, num_tokens, num_experts)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
  mask = (rng.random((num_groups, num_tokens)) > 0.25).astype(np.int32)
  for bpr in (False, True):
    route = jit(routing.tokens_choose, jnp.asarray(probs), num_selected_experts=k, expert_capacity=capacity,
                batch_prioritized=bpr, padding_mask=jnp.asarray(mask))
    expected_tokens, expected_weights = reference_tokens_choose(probs, k, capacity, bpr, mask)
    tokens, weights = _buffers(route)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(weights, expected_weights, rtol=0, atol=0)


def test_tokens_choose_rejects_bad_input(jit):
  probs = jnp.full((1, 2, 2), 0.5)
  with pytest.raises(ValueError, match='num_selected_experts'):
    jit(routing.tokens_choose, probs, num_selected_experts=3, expert_capacity=1)
  with pytest.raises(ValueError, match='expert_capacity'):
    jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=0)
  with pytest.raises(TypeError, match='floating'):
    jit(routing.tokens_choose, jnp.ones((1, 2, 2), jnp.int32), num_selected_experts=1, expert_capacity=1)
  with pytest.raises(ValueError, match='padding_mask'):
    jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=1,
        padding_mask=jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r'\[G, T, E\]'):
    jit(routing.tokens_choose, jnp.full((2, 2), 0.5), num_selected_experts=1, expert_capacity=1)


# ---------------------------------------------------------------------------------------------------------
# Experts choose

def test_experts_choose_hand_computed(jit):
  probs = jnp.array([[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]])
  route = jit(routing.experts_choose, probs, expert_capacity=2)
  tokens, weights = _buffers(route)
  assert tokens.tolist() == [[[0, 1], [2, 1]]]  # token 1 goes to both experts
  np.testing.assert_allclose(weights, [[[0.9, 0.5], [0.8, 0.5]]])
  assert route.expert_index is None


def test_experts_choose_ties_lower_token_first_and_skips_padding(jit):
  probs = jnp.array([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
  assert _buffers(jit(routing.experts_choose, probs, expert_capacity=1))[0].tolist() == [[[0], [0]]]
  route = jit(routing.experts_choose, probs, expert_capacity=1, padding_mask=jnp.array([[0, 1, 1]]))
  assert _buffers(route)[0].tolist() == [[[1], [1]]]


def test_experts_choose_capacity_larger_than_group_leaves_slots_empty(jit):
  probs = jnp.array([[[0.9, 0.1], [0.3, 0.7]]])
  route = jit(routing.experts_choose, probs, expert_capacity=4, padding_mask=jnp.array([[1, 0]]))
  tokens, weights = _buffers(route)
  assert tokens.tolist() == [[[0, 2, 2, 2], [0, 2, 2, 2]]]
  np.testing.assert_allclose(weights, [[[0.9, 0, 0, 0], [0.1, 0, 0, 0]]])


@pytest.mark.parametrize('seed', range(3))
def test_experts_choose_matches_loop_reference(seed, jit):
  rng = np.random.default_rng(100 + seed)
  logits = rng.integers(0, 3, size=(2, 7, 3)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
  mask = (rng.random((2, 7)) > 0.3).astype(np.int32)
  route = jit(routing.experts_choose, jnp.asarray(probs), expert_capacity=3, padding_mask=jnp.asarray(mask))
  expected_tokens, expected_weights = reference_experts_choose(probs, 3, mask)
  tokens, weights = _buffers(route)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(weights, expected_weights, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Dense form and metrics

def test_to_dense_matches_buffers(jit):
  probs = jnp.array([[[0.4, 0.6], [0.7, 0.3], [0.2, 0.8]]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=2, expert_capacity=2)
  dispatch_mask, combine_array = jit(routing.Routing.to_dense, route)
  assert dispatch_mask.shape == (1, 3, 2, 2) and dispatch_mask.dtype == jnp.bool_
  tokens, weights = _buffers(route)
  expected_mask = np.zeros((1, 3, 2, 2), bool)
  expected_combine = np.zeros((1, 3, 2, 2), np.float32)
  for e in range(2):
    for c in range(2):
      if tokens[0, e, c] < 3:
        expected_mask[0, tokens[0, e, c], e, c] = True
        expected_combine[0, tokens[0, e, c], e, c] = weights[0, e, c]
  np.testing.assert_array_equal(dispatch_mask, expected_mask)
  np.testing.assert_allclose(combine_array, expected_combine)
  # Each token appears at most once per expert, at most k times in all.
  assert dispatch_mask.sum(axis=(2, 3)).max() <= 2


def test_routing_metrics_hand_computed(jit):
  probs = jnp.array([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]]])
  mask = jnp.array([[1, 1, 1, 0]])
  route = jit(routing.tokens_choose, probs, num_selected_experts=1, expert_capacity=1, padding_mask=mask)
  metrics = jit(routing.routing_metrics, route, mask)
  # Token 0 takes expert 0's only slot; tokens 1, 2 are dropped; padding token 3 is not counted.
  np.testing.assert_allclose(metrics['fraction_tokens_left_behind'], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['expert_usage'], 1 / 2, rtol=1e-6)  # 1 pair / (E·C·G = 2)
  np.testing.assert_allclose(metrics['router_confidence'], 0.6, rtol=1e-6)
