"""Cross-entropy, z-loss and label smoothing against hand-computed values; MoE metric collection."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax.config import MoeConfig
from st_moe_jax import losses
from st_moe_jax.moe import MoeLayer

LOG = np.log
# Two sequences of two tokens over a 3-token vocabulary. Token (1, 1) is padding (target 0); its logits are
# extreme so that counting it would show.
LOGITS = np.array([[LOG([1.0, 2.0, 5.0]), [0.0, 0.0, 0.0]],
                   [LOG([6.0, 1.0, 1.0]), [0.0, 50.0, -50.0]]], np.float32)
TARGETS = np.array([[2, 1], [1, 0]], np.int32)


def test_cross_entropy_and_z_loss_by_hand():
  ce, z = losses.token_cross_entropy(LOGITS, TARGETS, z_loss=1e-4)
  np.testing.assert_allclose(np.asarray(ce)[0], [math.log(8 / 5), math.log(3)], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ce)[1, 0], math.log(8), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(z)[0], [1e-4 * math.log(8) ** 2, 1e-4 * math.log(3) ** 2], rtol=1e-6)


def test_label_smoothing_by_hand():
  s, vocab = 0.1, 3
  conf, low = 1 - s, s / (vocab - 1)
  normalizer = -(conf * math.log(conf) + (vocab - 1) * low * math.log(low))
  want = -(conf * math.log(5 / 8) + low * math.log(1 / 8) + low * math.log(2 / 8)) - normalizer
  ce, _ = losses.token_cross_entropy(LOGITS, TARGETS, label_smoothing=s)
  np.testing.assert_allclose(float(ce[0, 0]), want, rtol=1e-5)
  # A prediction equal to the smoothed targets scores zero: the constant makes the minimum 0.
  perfect = jnp.log(jnp.array([low, low, conf]))
  ce, _ = losses.token_cross_entropy(perfect, jnp.array(2), label_smoothing=s)
  assert abs(float(ce)) < 1e-6
  with pytest.raises(ValueError, match='LABEL_SMOOTHING'):
    losses.token_cross_entropy(LOGITS, TARGETS, label_smoothing=1.0)


def test_loss_is_normalised_by_real_target_tokens():
  loss, metrics = losses.compute_loss(LOGITS, TARGETS, z_loss=1e-4)
  ce = (math.log(8 / 5) + math.log(3) + math.log(8)) / 3
  z = 1e-4 * (math.log(8) ** 2 + math.log(3) ** 2 + math.log(8) ** 2) / 3
  np.testing.assert_allclose(float(metrics['cross_ent_loss']), ce, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['z_loss']), z, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ce + z, rtol=1e-6)
  assert float(metrics['loss']) == float(loss)
  # Argmax hits token (0, 0) only; (0, 1) is a tie at 0 (argmax 0 ≠ 1); (1, 0) argmax 0 ≠ 1.
  np.testing.assert_allclose(float(metrics['accuracy']), 1 / 3, rtol=1e-6)
  assert not any(k.startswith('experts/') for k in metrics)  # dense model: no MoE metrics

  # Explicit decoder_loss_weights override targets > 0; more padding rows change nothing.
  weights = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  _, metrics = losses.compute_loss(LOGITS, TARGETS, weights)
  np.testing.assert_allclose(float(metrics['cross_ent_loss']), (math.log(8 / 5) + math.log(8)) / 2, rtol=1e-6)
  padded_logits = np.concatenate([LOGITS, np.full_like(LOGITS, 7.0)])
  padded_targets = np.concatenate([TARGETS, np.zeros_like(TARGETS)])
  padded_loss, _ = losses.compute_loss(padded_logits, padded_targets)
  np.testing.assert_allclose(float(padded_loss), float(loss), rtol=1e-6)
  # t5x's LOSS_NORMALIZING_FACTOR: a fixed denominator.
  _, metrics = losses.compute_loss(LOGITS, TARGETS, loss_normalizing_factor=6.0)
  np.testing.assert_allclose(float(metrics['cross_ent_loss']), ce * 3 / 6, rtol=1e-6)


def _sown(aux, z, left, usage, conf):
  return {'auxiliary_loss': aux, 'router_z_loss': z, 'fraction_tokens_left_behind': left,
          'expert_usage': usage, 'router_confidence': conf}


def test_moe_terms_collected_over_layers():
  intermediates = {
      'encoder': {'layers_1': {'mlp': _sown((1.0,), (2.0,), (0.1,), (0.5,), (0.6,))}},
      # a scanned stack of two layers sows one value per layer along a leading axis
      'decoder': {'layers': {'mlp': _sown((jnp.array([3.0, 5.0]),), (jnp.array([4.0, 6.0]),),
                                         (jnp.array([0.2, 0.3]),), (jnp.array([0.7, 0.8]),),
                                         (jnp.array([0.9, 0.3]),))}},
  }
  loss, metrics = losses.compute_loss(LOGITS, TARGETS, None, {'intermediates': intermediates},
                                      z_loss=1e-4, aux_loss_factor=0.01, router_z_loss_factor=1e-3)
  np.testing.assert_allclose(float(metrics['experts/auxiliary_loss']), 0.01 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['experts/router_z_loss']), 1e-3 * 4.0, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['experts/fraction_tokens_left_behind']), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['experts/expert_usage']), 2.0 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['experts/router_confidence']), 0.6, rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(metrics['cross_ent_loss'] + metrics['z_loss']) + 0.03 + 0.004,
                             rtol=1e-6)


class _TwoMoeLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = x + MoeLayer(MoeConfig(num_experts=4, expert_mlp_dim=8, expert_activations=('gelu', 'linear'),
                                 group_multiple=1),
                       name=f'layers_{i}')(
          x, enable_dropout=False)
    return x


def test_collects_what_moe_layer_sows():
  x = jax.random.normal(jax.random.key(0), (2, 4, 6))
  model = _TwoMoeLayers()
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  _, state = jax.jit(lambda p: model.apply({'params': p}, x, mutable=['intermediates']))(params)
  assert len(losses.collect_sown(state['intermediates'], 'auxiliary_loss')) == 2
  per_layer = [float(state['intermediates'][f'layers_{i}']['router_z_loss'][0]) for i in range(2)]
  moe_loss, metrics = losses.moe_losses(state['intermediates'], aux_loss_factor=0.0,
                                        router_z_loss_factor=2.0)
  np.testing.assert_allclose(float(metrics['experts/router_z_loss']), 2.0 * np.mean(per_layer), rtol=1e-6)
  np.testing.assert_allclose(float(moe_loss), 2.0 * np.mean(per_layer), rtol=1e-6)
  assert set(metrics) == {f'experts/{n}' for n in losses.MOE_METRIC_NAMES}

  means = losses.moe_metrics(state['intermediates'])
  assert set(means) == set(losses.MOE_METRIC_NAMES)
  np.testing.assert_allclose(float(means['router_z_loss']), np.mean(per_layer), rtol=1e-6)
  layers = losses.per_layer_moe_metrics(state['intermediates'])
  assert set(layers) == {f'layers_{i}/{n}' for i in range(2) for n in losses.MOE_METRIC_NAMES}
  np.testing.assert_allclose([float(layers[f'layers_{i}/router_z_loss']) for i in range(2)], per_layer,
                             rtol=1e-6)
  assert losses.moe_metrics({}) == {} and losses.per_layer_moe_metrics(None) == {}  # a dense model


def test_loss_factor_defaults_are_stated_once():
  """ST-MoE's router z-loss 1e-3 (not t5x's output z-loss 1e-4) is the default everywhere."""
  import inspect
  from st_moe_jax import train, trainer
  assert losses.ROUTER_Z_LOSS_FACTOR == 1e-3 and losses.Z_LOSS == 1e-4 and losses.AUX_LOSS_FACTOR == 0.01
  assert trainer.LossConfig() == trainer.LossConfig(losses.Z_LOSS, 0.0, losses.AUX_LOSS_FACTOR,
                                                    losses.ROUTER_Z_LOSS_FACTOR)
  for fn in (losses.compute_loss, losses.moe_losses, train.train):
    assert inspect.signature(fn).parameters['router_z_loss_factor'].default == losses.ROUTER_Z_LOSS_FACTOR
