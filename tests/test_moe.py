"""MoeLayer: grouping, both dispatch paths, a direct reference computation, metrics, modes, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import moe
from st_moe_jax.config import MoeConfig
from st_moe_jax.losses import MOE_METRIC_NAMES
from st_moe_jax.moe import MoeLayer

B, L, H, F, E = 2, 6, 8, 16, 4
RNGS = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}


def _layer(dtype=jnp.float32, **overrides):
  config = dict(num_experts=E, expert_mlp_dim=F, expert_activations=('gelu', 'linear'), group_multiple=1)
  return MoeLayer(MoeConfig(**(config | overrides)), dtype)


@pytest.fixture(scope='module')
def inputs():
  return jax.random.normal(jax.random.PRNGKey(42), (B, L, H))


@pytest.fixture(scope='module')
def variables(inputs):
  return _layer().init(RNGS, inputs, enable_dropout=False)


def _apply(layer, variables, x, padding_mask=None, enable_dropout=False, rng=2, decode=False,
           router_logits=None):
  return layer.apply(variables, x, padding_mask, enable_dropout=enable_dropout, decode=decode,
                     router_logits=router_logits, rngs={'dropout': jax.random.PRNGKey(rng)}, mutable=['intermediates'])


# ---------------------------------------------------------------------------------------------------------
# Grouping (docs/routing.md §5)

def test_plan_groups_follows_the_rule():
  assert moe.plan_groups(8, 512, 4096, multiple=8) == (8, 8, 512)  # groups of 512 at E = 8
  assert moe.plan_groups(8, 512, 4096, multiple=1) == (1, 8, 512)
  assert moe.plan_groups(8, 512, 1024, multiple=1) == (4, 8, 512)
  assert moe.plan_groups(4, 6, 4096, multiple=4) == (4, 4, 6)
  assert moe.plan_groups(5, 6, 8, multiple=1) == (5, 5, 6)  # 30 tokens: 4 groups don't divide, 5 do


def test_plan_groups_pads_the_cheaper_dimension():
  # 15 tokens, groups a multiple of 4: length 5 -> 8 costs 9 tokens, batch 3 -> 4 costs 5.
  assert moe.plan_groups(3, 5, 4096, multiple=4) == (4, 4, 5)
  # length 3 -> 4 costs 2 tokens, batch 2 -> 4 costs 6.
  assert moe.plan_groups(2, 3, 4096, multiple=4) == (4, 2, 4)
  # A tie (4 tokens either way) pads the length.
  assert moe.plan_groups(2, 2, 4096, multiple=8) == (8, 2, 4)


def test_plan_groups_strict_raises_with_sizes():
  assert moe.plan_groups(4, 8, 8, multiple=4, strict=True) == (4, 4, 8)
  with pytest.raises(ValueError, match=r'3x5 = 15 tokens.*group_size=4'):
    moe.plan_groups(3, 5, 4, multiple=1, strict=True)


def test_group_tokens_pads_flags_and_ungroups_exactly():
  x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1.0
  mask = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  grouped, real, groups = moe.group_tokens(x, mask, group_size=4096, multiple=4)  # 6 tokens -> length 4
  assert groups == moe.Groups(2, 3, 2, 4, 4) and grouped.shape == (4, 2, 2) and real.shape == (4, 2)
  # Row-major order: batch row 0 is groups 0-1, its padded 4th position is the last token of group 1.
  np.testing.assert_array_equal(real.reshape(2, 4), [[1, 1, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(grouped.reshape(2, 4, 2)[:, :3], x)
  np.testing.assert_array_equal(grouped.reshape(2, 4, 2)[:, 3], 0.0)
  np.testing.assert_array_equal(moe.ungroup(grouped, groups), x)


# ---------------------------------------------------------------------------------------------------------
# The layer

def test_parameter_names_shapes_and_logical_axes(variables):
  specs = nn.get_partition_spec(variables)['params']
  params = nn.unbox(variables)['params']
  assert params['router']['router_weights']['w']['kernel'].shape == (H, E)
  assert params['router']['router_weights']['w']['kernel'].dtype == jnp.float32
  assert params['expert']['wi_0']['kernel'].shape == (E, H, F)
  assert params['expert']['wi_1']['kernel'].shape == (E, H, F)
  assert params['expert']['wo']['kernel'].shape == (E, F, H)
  assert tuple(specs['expert']['wi_0']['kernel']) == ('expert', 'mlp_embed', 'expert_mlp')
  assert tuple(specs['expert']['wo']['kernel']) == ('expert', 'expert_mlp', 'mlp_embed')
  assert tuple(specs['router']['router_weights']['w']['kernel']) == ('embed', 'unmodeled')
  # Experts are initialised independently.
  wi = params['expert']['wi_0']['kernel']
  assert not np.allclose(wi[0], wi[1])
  relu = _layer(expert_activations=('relu',)).init(RNGS, jnp.ones((B, L, H)), enable_dropout=False)
  assert set(nn.unbox(relu)['params']['expert']) == {'wi', 'wo'}


def _reference_layer_output(params, x, k, renormalize=False):
  """Direct computation for a layer with no dropped tokens: y_t = Σ_{e in top-k(t)} w_te · expert_e(x_t),
  w = p (flaxformer) or, renormalized, p_te / Σ_{top-k} p (GShard's top-2 gating)."""
  params = nn.unbox(params)
  w_router = np.asarray(params['router']['router_weights']['w']['kernel'], np.float64)
  wi0, wi1, wo = (np.asarray(params['expert'][n]['kernel'], np.float64) for n in ('wi_0', 'wi_1', 'wo'))
  tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  logits = tokens @ w_router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
  out = np.zeros_like(tokens)
  for t, tok in enumerate(tokens):
    chosen = np.argsort(-probs[t], kind='stable')[:k]
    total = probs[t, chosen].sum() if renormalize else 1.0
    for e in chosen:
      out[t] += probs[t, e] / total * ((gelu(tok @ wi0[e]) * (tok @ wi1[e])) @ wo[e])
  return out.reshape(x.shape)


@pytest.mark.parametrize('method', ['gather', 'einsum'])
def test_layer_matches_direct_computation_without_drops(variables, inputs, method):
  layer = _layer(dispatch_method=method, eval_capacity_factor=float(E))  # C = T: nothing can drop
  y, state = _apply(layer, variables, inputs)
  assert float(state['intermediates']['fraction_tokens_left_behind'][0]) == 0.0
  np.testing.assert_allclose(y, _reference_layer_output(variables['params'], inputs, k=2),
                             rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('method', ['gather', 'einsum'])
def test_renormalized_combine_weights_match_gshard_gating(variables, inputs, method):
  layer = _layer(dispatch_method=method, eval_capacity_factor=float(E), renormalize_combine_weights=True)
  y, _ = _apply(layer, variables, inputs)
  np.testing.assert_allclose(y, _reference_layer_output(variables['params'], inputs, k=2, renormalize=True),
                             rtol=2e-5, atol=2e-6)
  plain, _ = _apply(_layer(dispatch_method=method, eval_capacity_factor=float(E)), variables, inputs)
  assert np.max(np.abs(np.asarray(y) - np.asarray(plain))) > 1e-3  # E = 4: top-2 weights sum to < 1


@pytest.mark.parametrize('enable_dropout', [False, True])
def test_gather_and_einsum_layers_agree_in_outputs_and_gradients(variables, inputs, enable_dropout):
  upstream = jax.random.normal(jax.random.PRNGKey(7), inputs.shape)

  def loss(method, params, x):
    layer = _layer(dispatch_method=method, train_capacity_factor=0.75, jitter_noise=0.1,
                   expert_dropout_rate=0.2, batch_prioritized_routing=True)
    y, state = _apply(layer, {'params': params}, x, enable_dropout=enable_dropout)
    aux = state['intermediates']['auxiliary_loss'][0] + state['intermediates']['router_z_loss'][0]
    return jnp.sum(y * upstream) + aux

  out = {m: jax.value_and_grad(functools.partial(loss, m), argnums=(0, 1))(variables['params'], inputs)
         for m in ('gather', 'einsum')}
  np.testing.assert_allclose(out['gather'][0], out['einsum'][0], rtol=1e-5)
  flat_fast = jax.tree_util.tree_leaves(out['gather'][1])
  flat_ref = jax.tree_util.tree_leaves(out['einsum'][1])
  for g_fast, g_ref in zip(flat_fast, flat_ref):
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-5, atol=1e-6)
  router_grad = out['einsum'][1][0]['router']['router_weights']['w']['kernel']
  assert np.abs(np.asarray(nn.unbox(router_grad))).max() > 0


def test_metrics_are_sown_with_t5x_names(variables, inputs):
  _, state = _apply(_layer(), variables, inputs)
  metrics = dict(state['intermediates'])
  per_token = {moe.TOP1_EXPERT, moe.TOP1_PROBABILITY}  # [B, L] values for expert_analysis.py
  assert set(metrics) == set(MOE_METRIC_NAMES) | per_token
  for name in per_token:
    assert metrics.pop(name)[0].shape == inputs.shape[:2], name
  for name, value in metrics.items():
    assert value[0].shape == () and value[0].dtype == jnp.float32, name
  assert 1.0 <= float(metrics['auxiliary_loss'][0]) <= 2.0 * E  # about k near balance
  assert float(metrics['router_z_loss'][0]) > 0
  assert 0.0 <= float(metrics['fraction_tokens_left_behind'][0]) <= 1.0
  assert 0.0 < float(metrics['expert_usage'][0]) <= 1.0
  assert 0.0 < float(metrics['router_confidence'][0]) <= 1.0


def test_train_capacity_drops_more_than_eval_capacity(variables, inputs):
  layer = _layer(train_capacity_factor=0.5, eval_capacity_factor=4.0, min_expert_capacity=1)
  _, train_state = _apply(layer, variables, inputs, enable_dropout=True)
  _, eval_state = _apply(layer, variables, inputs, enable_dropout=False)
  assert float(train_state['intermediates']['fraction_tokens_left_behind'][0]) > 0.2
  assert float(eval_state['intermediates']['fraction_tokens_left_behind'][0]) == 0.0


def test_padding_is_neither_routed_nor_influential(variables, inputs):
  mask = jnp.ones((B, L)).at[0, 4:].set(0).at[1, 0].set(0)
  layer = _layer(train_capacity_factor=0.75, min_expert_capacity=1, batch_prioritized_routing=True)
  y, state = _apply(layer, variables, inputs, mask, enable_dropout=True)
  noisy = jnp.where(mask[..., None] > 0, inputs, 100.0)
  y_noisy, state_noisy = _apply(layer, variables, noisy, mask, enable_dropout=True)
  np.testing.assert_array_equal(np.asarray(y)[np.asarray(mask) == 0], 0.0)
  np.testing.assert_allclose(y, y_noisy, rtol=1e-6, atol=1e-6)
  for name in MOE_METRIC_NAMES:
    np.testing.assert_allclose(state['intermediates'][name][0], state_noisy['intermediates'][name][0],
                               rtol=1e-6)


def test_layer_pads_tokens_to_a_valid_grouping():
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, H))  # 15 tokens; groups must be a multiple of E=4
  layer = _layer(group_multiple=None, eval_capacity_factor=float(E))
  variables = layer.init(RNGS, x, enable_dropout=False)
  y, state = _apply(layer, variables, x)
  assert y.shape == x.shape
  # Padding tokens added by the layer count nowhere: every real token reached an expert.
  assert float(state['intermediates']['fraction_tokens_left_behind'][0]) == 0.0
  np.testing.assert_allclose(y, _reference_layer_output(variables['params'], x, k=2), rtol=2e-5,
                             atol=2e-6)


def test_jitter_and_expert_dropout_only_in_training(variables, inputs):
  layer = _layer(jitter_noise=0.5, expert_dropout_rate=0.5)
  y_eval_a, _ = _apply(layer, variables, inputs, rng=1)
  y_eval_b, _ = _apply(layer, variables, inputs, rng=2)
  np.testing.assert_array_equal(y_eval_a, y_eval_b)
  y_plain, _ = _apply(_layer(), variables, inputs)
  np.testing.assert_array_equal(y_eval_a, y_plain)
  y_train_a, _ = _apply(layer, variables, inputs, enable_dropout=True, rng=1)
  y_train_b, _ = _apply(layer, variables, inputs, enable_dropout=True, rng=2)
  assert not np.allclose(y_train_a, y_train_b)


def _numpy_router(params, x):
  """float64 router probabilities and logits of every token: ([N, E], [N, E]), N = B·L."""
  w_router = np.asarray(nn.unbox(params)['router']['router_weights']['w']['kernel'], np.float64)
  logits = np.asarray(x, np.float64).reshape(-1, x.shape[-1]) @ w_router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True), logits


def _numpy_experts(params, tokens):
  """Every expert's GEGLU FFN on every token, float64: [N, H] -> [E, N, H]."""
  params = nn.unbox(params)
  wi0, wi1, wo = (np.asarray(params['expert'][n]['kernel'], np.float64) for n in ('wi_0', 'wi_1', 'wo'))
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
  return np.stack([(gelu(tokens @ wi0[e]) * (tokens @ wi1[e])) @ wo[e] for e in range(wi0.shape[0])])


def test_layer_losses_match_a_direct_numpy_computation(variables, inputs):
  """Each row is a group (group_size = L), row 0 has padding: z-loss over real tokens, the auxiliary loss
  E · Σ_e f_e · P_e per group over its real tokens (f counts top-2 membership), averaged over groups."""
  mask = np.ones((B, L), np.float32)
  mask[0, 4:] = 0
  _, state = _apply(_layer(group_size=L), variables, inputs, jnp.asarray(mask))
  probs, logits = _numpy_router(variables['params'], inputs)
  real = mask.reshape(-1) > 0
  log_z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(state['intermediates']['router_z_loss'][0], np.mean(log_z[real] ** 2),
                             rtol=1e-5)
  per_group = []
  for g in range(B):
    rows = np.arange(g * L, (g + 1) * L)[real[g * L:(g + 1) * L]]
    top2 = np.argsort(-probs[rows], axis=-1, kind='stable')[:, :2]
    f = np.array([np.mean([e in choice for choice in top2]) for e in range(E)])
    per_group.append(E * np.sum(f * probs[rows].mean(0)))
  np.testing.assert_allclose(state['intermediates']['auxiliary_loss'][0], np.mean(per_group), rtol=1e-5)


def test_experts_choose_layer_matches_a_direct_computation(variables, inputs):
  """One group of 12 tokens, C = round(2.0 · 12 / 4) = 6: every expert takes its 6 most probable tokens
  (ties: lower token first); a token's output sums p_te · expert_e(x_t) over the experts that took it."""
  y, state = _apply(_layer(routing_method='experts_choose'), variables, inputs)
  assert float(state['intermediates']['auxiliary_loss'][0]) == 0.0
  assert float(state['intermediates']['expert_usage'][0]) == 1.0  # every slot filled: C <= T
  probs, _ = _numpy_router(variables['params'], inputs)
  tokens = np.asarray(inputs, np.float64).reshape(-1, H)
  expert_out = _numpy_experts(variables['params'], tokens)
  expected = np.zeros_like(tokens)
  for e in range(E):
    for t in np.argsort(-probs[:, e], kind='stable')[:6]:
      expected[t] += probs[t, e] * expert_out[e, t]
  np.testing.assert_allclose(y, expected.reshape(inputs.shape), rtol=2e-5, atol=2e-6)
  left_behind = np.mean([not any(t in np.argsort(-probs[:, e], kind='stable')[:6] for e in range(E))
                         for t in range(B * L)])
  np.testing.assert_allclose(state['intermediates']['fraction_tokens_left_behind'][0], left_behind)


def test_bfloat16_experts_keep_a_float32_router(variables, inputs):
  layer = _layer(dtype=jnp.bfloat16)
  x16 = inputs.astype(jnp.bfloat16)
  y, state = layer.apply(variables, x16, enable_dropout=False, mutable=['intermediates'],
                         capture_intermediates=True)
  assert y.dtype == jnp.bfloat16
  router_out = state['intermediates']['router']['__call__'][0]
  assert router_out.dtype == jnp.float32
  y32, _ = _apply(_layer(), variables, x16.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.1, atol=0.05)
  assert state['intermediates']['router_z_loss'][0].dtype == jnp.float32


@pytest.mark.parametrize('overrides, error, match', [
    (dict(num_experts=0), ValueError, 'num_experts'),
    (dict(num_selected_experts=5), ValueError, 'num_selected_experts'),
    (dict(train_capacity_factor=0.0), ValueError, 'train_capacity_factor'),
    (dict(eval_capacity_factor=-1.0), ValueError, 'eval_capacity_factor'),
    (dict(routing_method='random'), ValueError, 'routing_method'),
    (dict(dispatch_method='scatter'), ValueError, 'dispatch_method'),
    (dict(strict_group_size=True, group_size=5), ValueError, 'strict_group_size'),
    (dict(renormalize_combine_weights=True, num_selected_experts=1), ValueError,
     r'renormalize_combine_weights needs .* k=1 .*RENORMALIZE_COMBINE_WEIGHTS'),
    (dict(renormalize_combine_weights=True, routing_method='experts_choose'), ValueError,
     'renormalize_combine_weights'),
])
def test_bad_configuration_gets_a_clear_error(overrides, error, match):
  with pytest.raises(error, match=match):
    _layer(**overrides).init(RNGS, jnp.ones((B, L, H)), enable_dropout=False)


def test_bad_inputs_get_a_clear_error(variables):
  with pytest.raises(TypeError, match='floating point'):
    _apply(_layer(), variables, jnp.ones((B, L, H), jnp.int32))
  with pytest.raises(ValueError, match='padding_mask'):
    _apply(_layer(), variables, jnp.ones((B, L, H)), jnp.ones((B, L + 1)))


def test_fixed_expert_capacity_and_decode_steps_never_drop(variables, inputs):
  fixed = _layer(expert_capacity=1)
  _, state = _apply(fixed, variables, inputs)
  # 12 tokens, 4 experts with 1 slot each: at most 4 tokens reach an expert.
  assert float(state['intermediates']['fraction_tokens_left_behind'][0]) >= 8 / 12 - 1e-6
  assert float(state['intermediates']['expert_usage'][0]) == 1.0
  y_decode, state = _apply(fixed, variables, inputs, decode=True)  # C raised to T = 12
  assert float(state['intermediates']['fraction_tokens_left_behind'][0]) == 0.0
  np.testing.assert_allclose(y_decode, _reference_layer_output(variables['params'], inputs, k=2),
                             rtol=2e-5, atol=2e-6)
  with pytest.raises(ValueError, match='expert_capacity'):
    _layer(expert_capacity=0).init(RNGS, inputs, enable_dropout=False)


def test_external_router_logits_replace_the_linear_router(variables, inputs):
  params = nn.unbox(variables)['params']
  w = params['router']['router_weights']['w']['kernel']
  external = jnp.einsum('blh,he->ble', inputs, w)
  expert_only = {'params': {'expert': variables['params']['expert']}}
  y_ext, _ = _apply(_layer(), expert_only, inputs, router_logits=external)
  y_own, _ = _apply(_layer(), variables, inputs)
  np.testing.assert_allclose(y_ext, y_own, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='router_logits'):
    _apply(_layer(), expert_only, inputs, router_logits=external[..., :2])
