"""Lory: a fully differentiable MoE layer for causal decoders, by expert merging (docs/seed_methods.md §3,
arXiv:2405.03133).

A sequence is cut into segments of T tokens (SEGMENT_LENGTH). Segment k's routing weights come from the
mean MoE-block input of segment k−1, e = softmax(R · mean_{x ∈ S_{k−1}} h_x); the experts' FFN matrices
are merged in parameter space, θ̄ = Σ_i e_i θ_i (every matrix: wi_*, wo), and every token of segment k goes
through that one merged FFN. No top-k, no dispatch, no capacity, no load-balancing or z-loss.

First segment (there is no previous one):
  'uniform' (default, ours): e = 1/E, the plain average of the experts. Strictly causal.
  'self_stopgrad' (the paper's): segment 1 routes on its own mean with a stop-gradient on the weights.
    A token of segment 1 then depends (weakly) on later tokens of segment 1 in the forward pass; the
    stop-gradient only keeps training from exploiting it. tests/test_router_causality.py documents it.

Inference (decode=True, incremental with a cache):
  'prompt' (default, the paper's): route once on the mean of the prompt and keep that merged FFN for the
    rest of generation. The layer learns which tokens are the prompt from `prompt_mask`
    (DecoderOnly's `decoder_causal_attention`, 1 on prompt tokens; `decoding.generate` passes it for
    a prompt, see `decoding.prompt_positions`): in a full pass (enable_dropout=False) every position
    uses the prompt's weights; at decode steps the cache accumulates the prompt mean (a prompt token is
    routed on the prompt seen so far, every later token on the whole prompt). A row without prompt
    tokens, like a call without a prompt mask, has no prompt to route on and routes by segments.
  'segment': re-route every T tokens exactly as in training. With the causal first segment, cached
    decoding then equals recomputing the full sequence (tests/test_lory.py).

Packed rows: segments run across document boundaries, as in the paper, where documents are concatenated
(in similarity order, `tasks/lory_batching.py`) and cut into fixed-length instances.

Parameter names match MoeLayer's, so partitioning, Adafactor's expert rules and freezing patterns apply:
`mlp/expert/wi_0/kernel` <float32>[E, H, F], `mlp/expert/wo/kernel` [E, F, H],
`mlp/router/router_weights/w/kernel` [H, E] (Normal(0, 0.02): it must not start at zero, see
`upcycle_dense_to_lory`).
"""

from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from st_moe_jax.config import LORY_FIRST_SEGMENT_MODES, MoeConfig
from st_moe_jax.layers import Experts, batched_matmul, gated_ffn
from st_moe_jax.routers import LinearRouter

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Pure helpers.

def segment_means(x: Array, real: Array, segment_length: int) -> Array:
  """Mean of the real tokens of each segment.

  Args:
    x: <float>[B, N·T, H].
    real: <float32>[B, N·T], 1 for real tokens.
    segment_length: T.

  Returns:
    <float32>[B, N, H]; zeros for a segment without real tokens.
  """
  batch, length, hidden = x.shape
  xs = x.astype(jnp.float32).reshape(batch, length // segment_length, segment_length, hidden)
  rs = real.reshape(batch, length // segment_length, segment_length)
  total = jnp.einsum('bnth,bnt->bnh', xs, rs)
  return total / jnp.maximum(rs.sum(-1), 1.0)[..., None]


def causal_segment_weights(segment_probs: Array, first_segment: str = 'uniform') -> Array:
  """Shifts per-segment routing weights by one segment: segment k uses the weights of segment k−1.

  Args:
    segment_probs: <float32>[B, N, E], softmax(R · mean of segment k) for each segment k.
    first_segment: 'uniform' (1/E, causal) or 'self_stopgrad' (segment 0's own weights, no gradient).

  Returns:
    <float32>[B, N, E]. Shifting per row never mixes batch rows.
  """
  if first_segment not in LORY_FIRST_SEGMENT_MODES:
    raise ValueError(f'first_segment must be one of {LORY_FIRST_SEGMENT_MODES}, got {first_segment!r}.')
  num_experts = segment_probs.shape[-1]
  if first_segment == 'uniform':
    first = jnp.full_like(segment_probs[:, :1], 1.0 / num_experts)
  else:
    first = jax.lax.stop_gradient(segment_probs[:, :1])
  return jnp.concatenate([first, segment_probs[:, :-1]], axis=1)


def _masked_mean(x: Array, mask: Array) -> Array:
  """x <float>[B, L, H], mask <float32>[B, L] -> <float32>[B, H]: mean of the masked tokens (0 if none)."""
  total = jnp.einsum('blh,bl->bh', x.astype(jnp.float32), mask)
  return total / jnp.maximum(mask.sum(-1), 1.0)[:, None]


def merge_experts(weights: Array, kernel: Array) -> Array:
  """θ̄ = Σ_i w_i θ_i: weights <float32>[..., E], kernel <float32>[E, a, b] -> <float32>[..., a, b]."""
  return jnp.einsum('...e,eab->...ab', weights, kernel)


def upcycle_dense_to_lory(params: Any, *, num_experts: int, layer_indices: Sequence[int], rng: Array,
                          router_init_std: float = 2e-2, stack: str = 'decoder') -> dict:
  """Lory's dense warm-up recipe: copy a trained dense FFN into every expert, with a fresh random router.

  Training runs use it through `lory_warmup.fit_with_dense_warmup` (gin/runs/lory_warmup.gin).
  With identical experts the router gets exactly zero gradient (every ∂L/∂e_i is equal and the softmax
  Jacobian annihilates constants); the experts only drift apart because a *random* router makes the
  merged weights differ across segments. So the router is drawn from Normal(0, router_init_std), never 0.
  The upcycled model computes exactly what the dense one did (merged weights sum to 1).

  Args:
    params: a dense model's (un-boxed) params, e.g. DecoderOnly's {'decoder': {'layers_i': {'mlp':
      {'wi_0': {'kernel': [H, F]}, ..., 'wo': {'kernel': [F, H]}}}}}. Boxed (nn.Partitioned) leaves are
      unboxed.
    num_experts: E.
    layer_indices: the layers that become Lory layers (`models.sparse_layer_indices` of the Lory model).
    rng: PRNG key for the routers.
    router_init_std: > 0.
    stack: the top-level key holding the layers ('decoder').

  Returns:
    A new param tree for the Lory model (the Lory model must not have `extra_mlp`, which the dense model
    cannot provide): `layers_i/mlp/expert/<name>/kernel` [E, ...] copies and
    `layers_i/mlp/router/router_weights/w/kernel` [H, E].

  Raises:
    ValueError if router_init_std ≤ 0 or a listed layer has no dense FFN.
  """
  if router_init_std <= 0:
    raise ValueError(f'router_init_std must be > 0 (got {router_init_std}): with identical experts a zero '
                     f'router never receives gradient and the experts stay identical forever.')
  params = flax.core.unfreeze(nn.unbox(params))  # fresh dicts all the way down; arrays shared
  layers = params[stack]
  for i in layer_indices:
    name = f'layers_{i}'
    mlp = layers.get(name, {}).get('mlp')
    if mlp is None or 'expert' in mlp or not any(k.startswith('wi') for k in mlp):
      raise ValueError(f'{stack}/{name}/mlp is not a dense FFN (wi*/wo kernels); layer_indices must name '
                       f'dense layers of the warmed-up model, got {list(layer_indices)}.')
    experts = {k: {'kernel': jnp.broadcast_to(v['kernel'], (num_experts,) + v['kernel'].shape)}
               for k, v in mlp.items()}
    hidden = mlp['wo']['kernel'].shape[-1]
    router = router_init_std * jax.random.normal(jax.random.fold_in(rng, i), (hidden, num_experts),
                                                 jnp.float32)
    layers[name]['mlp'] = {'expert': experts, 'router': {'router_weights': {'w': {'kernel': router}}}}
  return params


def dense_warmup_steps(fraction: float, train_steps: int) -> int:
  """Steps of Lory's dense warm-up: round(fraction · TRAIN_STEPS), at least 1 when fraction > 0 (§3.3).

  Args:
    fraction: LORY_DENSE_WARMUP_FRACTION, in [0, 1); the paper trains dense for the first 0.05.
    train_steps: TRAIN_STEPS, the whole run's steps (dense and Lory together).

  Returns:
    W: steps 1..W train the dense model, W+1..TRAIN_STEPS the upcycled Lory model; 0 means no warm-up.

  Raises:
    ValueError if fraction is outside [0, 1) or leaves no Lory step.
  """
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
    raise ValueError(f'LORY_DENSE_WARMUP_FRACTION must be a number in [0, 1) (the fraction of TRAIN_STEPS '
                     f'trained dense before upcycling; the paper uses 0.05), got {fraction!r}.')
  if fraction == 0:
    return 0
  steps = max(1, round(fraction * train_steps))
  if steps >= train_steps:
    raise ValueError(f'LORY_DENSE_WARMUP_FRACTION={fraction} of TRAIN_STEPS={train_steps} is {steps} dense '
                     f'steps, which leaves no step for the Lory model; lower the fraction or raise '
                     f'TRAIN_STEPS.')
  return steps


# ---------------------------------------------------------------------------------------------------------
# Modules.

class LoryMoeLayer(nn.Module):
  """Lory MoE FFN for causal decoder stacks (see the module docstring for the routing rules).

  Attributes:
    config: the stack's MoeConfig (moe_type='lory'), with expert_mlp_dim and expert_activations set
      (`MoeConfig.with_model_defaults`); reads num_experts, segment_length, lory_first_segment,
      lory_inference_routing and expert_dropout_rate.
    dtype: FFN computation dtype; router, segment means and merging run in float32.
  """
  config: MoeConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, padding_mask: Optional[Array] = None, *,
               prompt_mask: Optional[Array] = None, enable_dropout: bool = True,
               decode: bool = False) -> Array:
    """Applies the layer.

    Args:
      inputs: <float>[B, L, H] (post-norm MoE-block input).
      padding_mask: optional [B, L], 1 for real tokens; padding is left out of the segment means.
      prompt_mask: optional [B, L], 1 on prompt tokens, for inference_routing='prompt' (not in training).
      enable_dropout: training mode.
      decode: incremental decoding with a cache; after the cache exists, L must be 1.

    Returns:
      <float>[B, L, H] in the inputs' dtype.
    """
    cfg = self.config
    if inputs.ndim != 3:
      raise ValueError(f'LoryMoeLayer inputs must be [batch, length, hidden], got shape {inputs.shape}.')
    batch, length, hidden = inputs.shape
    kernels = Experts(cfg.num_experts, cfg.expert_mlp_dim, len(cfg.expert_activations),
                      name='expert')(hidden)
    router = LinearRouter(cfg.num_experts, name='router')
    route = lambda means: jax.nn.softmax(router(means), axis=-1)  # [..., H] -> [..., E] float32

    use_prompt = (not enable_dropout and prompt_mask is not None and cfg.lory_inference_routing == 'prompt')
    if decode and self.has_variable('cache', 'index'):
      weights = self._decode_step_weights(inputs, route, prompt_mask if use_prompt else None)
      y = self._merged_ffn(inputs[:, None], weights[:, None], kernels, enable_dropout)
      return y[:, 0].astype(inputs.dtype)

    if decode:  # the cache-creating call: zeros, as decoding.init_cache makes them
      self._cache_variables(batch, hidden)
    real = (jnp.ones((batch, length), jnp.float32) if padding_mask is None
            else padding_mask.astype(jnp.float32))
    t = cfg.segment_length
    num_segments = -(-length // t)
    pad = num_segments * t - length
    x = jnp.pad(inputs, ((0, 0), (0, pad), (0, 0)))
    real = jnp.pad(real, ((0, 0), (0, pad)))
    probs = route(segment_means(x, real, t))  # [B, N, E]
    weights = causal_segment_weights(probs, cfg.lory_first_segment)  # [B, N, E]
    if use_prompt:
      # Every position of a row with a prompt routes on the prompt's mean: one merged FFN per sequence.
      prompt = prompt_mask.astype(jnp.float32) * real[:, :length]
      has_prompt = prompt.sum(-1) > 0  # [B]
      weights = jnp.where(has_prompt[:, None, None], route(_masked_mean(inputs, prompt))[:, None], weights)
    self.sow('intermediates', 'lory_router_confidence', jnp.mean(jnp.max(weights, axis=-1)))
    # The paper's utilisation: an expert counts as used when its weight exceeds 2/E somewhere.
    self.sow('intermediates', 'lory_expert_utilization',
             jnp.mean(jnp.any(weights > 2.0 / cfg.num_experts, axis=(0, 1)).astype(jnp.float32)))
    xs = x.reshape(batch, num_segments, t, hidden)  # [B, N, T, H]
    y = self._merged_ffn(xs, weights, kernels, enable_dropout)
    return y.reshape(batch, num_segments * t, hidden)[:, :length].astype(inputs.dtype)

  def _merged_ffn(self, xs: Array, weights: Array, kernels: dict[str, Array], enable_dropout: bool) -> Array:
    """xs <float>[B, N, T, H], weights <float32>[B, N, E] -> <dtype>[B, N, T, H]: one merged FFN per segment.

    Merging costs 2·E·H·F multiply-adds per matrix per segment, E/T of the FFN's own cost (paper §3).
    """
    merged = {n: merge_experts(weights, k).astype(self.dtype) for n, k in kernels.items()}  # [B, N, a, b]
    dropout = nn.Dropout(self.config.expert_dropout_rate)
    return gated_ffn(xs.astype(self.dtype), merged, self.config.expert_activations, matmul=batched_matmul,
                     dropout=lambda h: dropout(h, deterministic=not enable_dropout))

  def _cache_variables(self, batch: int, hidden: int):
    zeros = lambda *shape: (lambda: jnp.zeros(shape, jnp.float32))
    return (self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32)),
            self.variable('cache', 'segment_sum', zeros(batch, hidden)),  # Σ h over the current segment
            self.variable('cache', 'segment_weights', zeros(batch, self.config.num_experts)),  # e(k−1)
            self.variable('cache', 'prompt_sum', zeros(batch, hidden)),
            self.variable('cache', 'prompt_count', zeros(batch)))

  def _decode_step_weights(self, inputs: Array, route, prompt_mask: Optional[Array]) -> Array:
    """One decode step's routing weights <float32>[B, E]; advances the cache.

    Segment routing reproduces the full pass exactly with the 'uniform' first segment. With
    'self_stopgrad', segment 1 (whose full mean is not known yet) routes on its running mean.
    """
    if inputs.shape[1] != 1:
      raise ValueError(f'Incremental decoding feeds one token per step; got length {inputs.shape[1]}.')
    batch, _, hidden = inputs.shape
    index, seg_sum, seg_weights, prompt_sum, prompt_count = self._cache_variables(batch, hidden)
    x = inputs[:, 0].astype(jnp.float32)  # [B, H]
    t, num_experts = self.config.segment_length, self.config.num_experts
    i = index.value
    new_sum = seg_sum.value + x
    if self.config.lory_first_segment == 'uniform':
      first = jnp.full((batch, num_experts), 1.0 / num_experts, jnp.float32)
    else:
      first = route(new_sum / (i % t + 1).astype(jnp.float32))
    weights = jnp.where(i < t, first, seg_weights.value)
    # At the end of a segment its mean routes the next one.
    done = (i % t) == t - 1
    seg_weights.value = jnp.where(done, route(new_sum / t), seg_weights.value)
    seg_sum.value = jnp.where(done, jnp.zeros_like(new_sum), new_sum)
    index.value = i + 1
    if prompt_mask is not None:  # rows with prompt tokens so far route on them, the others by segments
      is_prompt = prompt_mask[:, 0].astype(jnp.float32)  # [B]
      prompt_sum.value = prompt_sum.value + is_prompt[:, None] * x
      prompt_count.value = prompt_count.value + is_prompt
      count = prompt_count.value
      weights = jnp.where((count > 0)[:, None],
                          route(prompt_sum.value / jnp.maximum(count, 1.0)[:, None]), weights)
    return weights


__all__ = ['LoryMoeLayer', 'segment_means', 'causal_segment_weights', 'merge_experts',
           'upcycle_dense_to_lory', 'dense_warmup_steps']
