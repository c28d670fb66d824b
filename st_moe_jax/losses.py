"""Training losses: cross-entropy with output z-loss and label smoothing, and the MoE loss composition; the
one reader of the metrics MoE layers sow (`moe_metrics`, `per_layer_moe_metrics`).

docs/routing.md §7: total = CE + z_loss · mean (logsumexp logits)² + aux_factor · mean_layers(aux)
+ router_z_factor · mean_layers(router_z), every token mean taken over real target tokens only.
Metric names are t5x's, so TensorBoard looks the same as a t5x MoE run.
"""

from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp

Array = jax.Array

# The metrics every MoE layer sows (the one list; moe.py sows these names).
MOE_METRIC_NAMES = ('auxiliary_loss', 'router_z_loss', 'fraction_tokens_left_behind', 'expert_usage',
                    'router_confidence')

# Default loss coefficients, the one place they are stated (the t5x macros of the same names override them).
Z_LOSS = 1e-4                 # output-logit z-loss (t5x)
AUX_LOSS_FACTOR = 0.01        # load-balancing loss (Switch, ST-MoE)
ROUTER_Z_LOSS_FACTOR = 1e-3   # router z-loss c_z (ST-MoE §3.1)


def token_cross_entropy(logits: Array, targets: Array, *, z_loss: float = Z_LOSS,
                        label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Per-token cross-entropy and output z-loss, in float32.

  Label smoothing follows t5x: the target distribution puts 1 − s on the target and s / (V − 1) on every
  other token, and the entropy of that distribution is subtracted so a perfect prediction scores 0.

  Args:
    logits: <float>[..., V].
    targets: <int>[...] token ids.
    z_loss: coefficient of log(Z)², which keeps the softmax normaliser near 1 (log Z near 0).
    label_smoothing: s in [0, 1).

  Returns:
    (cross_entropy <float32>[...], z_loss <float32>[...] = z_loss · logsumexp(logits)²).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing (LABEL_SMOOTHING) must be in [0, 1), got {label_smoothing}.')
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  soft_targets = jax.nn.one_hot(targets, vocab, dtype=jnp.float32) * (confidence - low) + low
  # Entropy of the smoothed targets (1e-20 guards log 0 when s = 0), the minimum of the smoothed CE.
  normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  cross_entropy = -jnp.sum(soft_targets * log_probs, axis=-1) - normalizer
  return cross_entropy, z_loss * jnp.square(log_z)


def _sown_by_layer(intermediates: Optional[Mapping[str, Any]], name: str) -> dict[str, list[Array]]:
  """{'decoder/layers_1': [value per call], ...}: the values sown under `name`, by layer path ('mlp' left
  out of the path, as t5x names MoE layers)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates or {}))
  out: dict[str, list[Array]] = {}
  for path, value in flat.items():
    if path[-1] == name:
      layer = '/'.join(str(p) for p in path[:-1] if p != 'mlp')
      out.setdefault(layer, []).extend(jax.tree.leaves(value))
  return out


def collect_sown(intermediates: Mapping[str, Any], name: str) -> list[Array]:
  """Every value sown under `name` anywhere in a flax 'intermediates' tree (one per layer call; a scanned
  layer's value carries a leading layers axis)."""
  return [v for values in _sown_by_layer(intermediates, name).values() for v in values]


def moe_metrics(intermediates: Optional[Mapping[str, Any]],
                names: Sequence[str] = MOE_METRIC_NAMES) -> dict[str, Array]:
  """{name: float32 mean over all MoE layers (encoder and decoder together)} of what the layers sow; names
  nothing sowed are left out (a dense model gives {}).

  Args:
    intermediates: the 'intermediates' collection from `model.apply(..., mutable=['intermediates'])`.
  """
  out = {}
  for name in names:
    values = collect_sown(intermediates or {}, name)
    if values:
      out[name] = jnp.mean(jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in values]))
  return out


def per_layer_moe_metrics(intermediates: Optional[Mapping[str, Any]],
                          names: Sequence[str] = MOE_METRIC_NAMES) -> dict[str, Array]:
  """{'decoder/layers_1/expert_usage': scalar, ...}: each MoE layer's sown metrics (mean over its calls; a
  scanned stack is one entry, averaged over its layers)."""
  out = {}
  for name in names:
    for layer, values in _sown_by_layer(intermediates, name).items():
      out[f'{layer}/{name}'] = jnp.mean(jnp.stack([jnp.mean(v.astype(jnp.float32)) for v in values]))
  return out


def moe_losses(intermediates: Optional[Mapping[str, Any]], *, aux_loss_factor: float = AUX_LOSS_FACTOR,
               router_z_loss_factor: float = ROUTER_Z_LOSS_FACTOR) -> tuple[Array, dict[str, Array]]:
  """The MoE terms of the loss from what MoeLayer sows.

  Args:
    intermediates: the 'intermediates' collection from `model.apply(..., mutable=['intermediates'])`
      (the whole mutated-variables dict works too). None or no MoE layers: no MoE terms.
    aux_loss_factor: AUX_LOSS_FACTOR.
    router_z_loss_factor: ROUTER_Z_LOSS_FACTOR.

  Returns:
    (aux_loss_factor · mean(aux) + router_z_loss_factor · mean(router_z), metrics): the metrics are
    'experts/<name>' averaged over layers, the two losses already multiplied by their factors.
  """
  metrics = {f'experts/{name}': value for name, value in moe_metrics(intermediates).items()}
  if not metrics:
    return jnp.zeros((), jnp.float32), metrics
  for name, factor in (('auxiliary_loss', aux_loss_factor), ('router_z_loss', router_z_loss_factor)):
    if f'experts/{name}' not in metrics:
      raise ValueError(f'MoE metrics were sown but none named {name!r}; MoeLayer must sow '
                       f'{MOE_METRIC_NAMES}.')
    metrics[f'experts/{name}'] = factor * metrics[f'experts/{name}']
  return metrics['experts/auxiliary_loss'] + metrics['experts/router_z_loss'], metrics


def compute_loss(logits: Array, targets: Array, weights: Optional[Array] = None,
                 intermediates: Optional[Mapping[str, Any]] = None, *, z_loss: float = Z_LOSS,
                 label_smoothing: float = 0.0, aux_loss_factor: float = AUX_LOSS_FACTOR,
                 router_z_loss_factor: float = ROUTER_Z_LOSS_FACTOR,
                 loss_normalizing_factor: Optional[float] = None) -> tuple[Array, dict[str, Array]]:
  """The training loss and its metrics.

  Args:
    logits: <float>[B, L, V] decoder output logits.
    targets: <int>[B, L] decoder_target_tokens.
    weights: <float>[B, L] decoder_loss_weights; None means targets > 0 (0 is padding).
    intermediates: MoeLayer's sown metrics ('intermediates' collection); None for a dense model.
    z_loss: Z_LOSS, coefficient of the output z-loss.
    label_smoothing: LABEL_SMOOTHING.
    aux_loss_factor, router_z_loss_factor: AUX_LOSS_FACTOR, ROUTER_Z_LOSS_FACTOR.
    loss_normalizing_factor: divide token sums by this constant instead of the number of real target
      tokens (t5x's LOSS_NORMALIZING_FACTOR); None: the number of real target tokens (sum of weights).

  Returns:
    (loss <float32>[], metrics): 'loss' (the total), 'cross_ent_loss' (total minus z and MoE terms),
    'z_loss', 'accuracy' (of the argmax over real target tokens) and the 'experts/...' metrics.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f'logits {logits.shape} must be targets {targets.shape} plus a vocabulary axis.')
  weights = (targets > 0) if weights is None else weights
  weights = weights.astype(jnp.float32)
  if loss_normalizing_factor is None:
    num_tokens = jnp.sum(weights)
    denominator = jnp.where(num_tokens > 0, num_tokens, 1.0)  # an all-padding batch has zero loss
  else:
    denominator = jnp.asarray(loss_normalizing_factor, jnp.float32)

  cross_entropy, z = token_cross_entropy(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
  cross_ent_loss = jnp.sum(cross_entropy * weights) / denominator
  z_term = jnp.sum(z * weights) / denominator
  moe_term, moe_metrics = moe_losses(intermediates, aux_loss_factor=aux_loss_factor,
                                     router_z_loss_factor=router_z_loss_factor)
  loss = cross_ent_loss + z_term + moe_term
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * weights) / jnp.where(jnp.sum(weights) > 0, jnp.sum(weights), 1.0)
  return loss, {'loss': loss, 'cross_ent_loss': cross_ent_loss, 'z_loss': z_term, 'accuracy': accuracy,
                **moe_metrics}
