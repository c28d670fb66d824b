"""Dense building blocks, with flaxformer parameter names and logical axis names."""

import functools
import math
from typing import Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = jnp.dtype

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu': nn.gelu,  # tanh approximation, as T5 1.1's gated-gelu
    'relu': nn.relu,
    'silu': nn.silu,
    'linear': lambda x: x,
}

# flaxformer's MLP kernel init: truncated normal scaled by fan-in.
default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def input_projection_names(num_inputs: int) -> list[str]:
  """flaxformer's FFN kernel names: 'wi' for one input projection, 'wi_0', 'wi_1', ... for gated FFNs."""
  return ['wi'] if num_inputs == 1 else [f'wi_{i}' for i in range(num_inputs)]


class Dense(nn.Module):
  """y = x · kernel, no bias, with a float32 kernel [in, out] carrying logical axis names."""
  features: int
  axes: tuple[str, str] = ('embed', 'mlp')
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (inputs.shape[-1], self.features), jnp.float32)
    # One matrix product over all leading dims: XLA:CPU runs the weight gradient of a [B, L, H] dot
    # (two contracting dims) about 1.7x slower than the same product on [B·L, H].
    x = inputs.astype(self.dtype).reshape(-1, inputs.shape[-1])
    y = cast_matmul(x, kernel)  # float32 weight gradient (see cast_matmul)
    return y.reshape(*inputs.shape[:-1], self.features)


class Kernel(nn.Module):
  """One float32 parameter `kernel` of a fixed shape with logical axis names (a matrix without its matmul)."""
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]
  init: Callable = default_kernel_init

  @nn.compact
  def __call__(self) -> Array:
    return self.param('kernel', nn.with_logical_partitioning(self.init, self.axes), self.shape, jnp.float32)


def _product(x: Array, kernel: Array, batched: bool) -> Array:
  return jnp.einsum('...tk,...km->...tm', x, kernel) if batched else jnp.dot(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cast_matmul(x: Array, kernel: Array, batched: bool = False) -> Array:
  """x · kernel.astype(x.dtype): <dtype>[M, K] · [K, N] (batched: [*b, T, K] · [*b, K, N]) in x's dtype,
  with the kernel's gradient computed with float32 accumulation and returned in the kernel's dtype.

  The weight gradient sums over the rows, which are sharded over the batch mesh axes, so XLA reduces its
  partial sums across chips. Under autodiff of `x · kernel.astype(bf16)` that reduction runs in bfloat16,
  before the cast back to float32; here the product itself yields float32 partial sums, so the cross-chip
  reduction is float32, as in t5x (tests/test_compile_tpu.py reads the HLO). The forward product and the
  input gradient stay in x's dtype.
  """
  return _product(x, kernel.astype(x.dtype), batched)


def _cast_matmul_fwd(x, kernel, batched):
  return cast_matmul(x, kernel, batched), (x, kernel)


def _cast_matmul_bwd(batched, residuals, grad):
  x, kernel = residuals
  grad = grad.astype(x.dtype)
  if batched:
    d_x = jnp.einsum('...tm,...km->...tk', grad, kernel.astype(x.dtype))
    d_kernel = jnp.einsum('...tk,...tm->...km', x, grad, preferred_element_type=jnp.float32)
  else:
    d_x = jnp.dot(grad, kernel.astype(x.dtype).T)
    d_kernel = jax.lax.dot_general(x, grad, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


cast_matmul.defvjp(_cast_matmul_fwd, _cast_matmul_bwd)


def flat_matmul(x: Array, kernels: Sequence[Array]) -> list[Array]:
  """x <float>[..., K] times each 2-D kernel [K, M_i], as one [prod(...), K] product (see Dense), in x's
  dtype (float32 kernels are cast inside `cast_matmul`, their gradients reduced in float32).

  Returns [<float>[..., M_i], ...].
  """
  flat = x.reshape(-1, x.shape[-1])
  return [cast_matmul(flat, k).reshape(*x.shape[:-1], k.shape[-1]) for k in kernels]


def batched_matmul(x: Array, kernels: Sequence[Array]) -> list[Array]:
  """x <float>[*b, T, K] times each batched kernel [*b, K, M_i] -> [*b, T, M_i] (experts, merged FFNs), in
  x's dtype (see cast_matmul)."""
  return [cast_matmul(x, k, True) for k in kernels]


def gated_ffn(x: Array, kernels: Mapping[str, Array], activations: Sequence[str], *,
              matmul: Callable[[Array, Sequence[Array]], list[Array]] = flat_matmul,
              dropout: Callable[[Array], Array] = lambda h: h) -> Array:
  """The feed-forward block every FFN here runs: wo(dropout(∏_i act_i(x · wi_i))).

  The one copy of the gated product, shared by the dense FFN (MlpBlock), the capacity and dropless expert
  paths (moe.MoeLayer) and Lory's merged experts; they differ only in `matmul`.

  Args:
    x: <float>[..., H] inputs, already in the computation dtype.
    kernels: 'wi' (one activation) or 'wi_0', 'wi_1', ... (one per activation) [.., H, F] and 'wo'
      [.., F, H]: float32 for flat_matmul / batched_matmul (which cast them), in the computation dtype for
      other matmuls.
    activations: names in ACTIVATIONS, multiplied together: ('gelu', 'linear') = GEGLU,
      ('silu', 'linear') = SwiGLU, ('relu',) = the T5 1.0 / Switch FFN.
    matmul: (x, [kernel, ...]) -> [x · kernel, ...]; input projections share one call, so a grouped
      matmul reads its rows once for all of them.
    dropout: applied to the hidden activations.

  Returns:
    <float>[..., H].
  """
  names = input_projection_names(len(activations))
  hidden = None
  for h, act in zip(matmul(x, [kernels[n] for n in names]), activations):
    h = ACTIVATIONS[act](h)
    hidden = h if hidden is None else hidden * h
  return matmul(dropout(hidden), [kernels['wo']])[0]


class MlpBlock(nn.Module):
  """Dense transformer FFN: `gated_ffn` with 2-D kernels `wi_0/kernel` [H, F], ..., `wo/kernel` [F, H].

  Attributes:
    intermediate_dim: F.
    activations: one name per input projection, multiplied together (validated by the model config).
    intermediate_dropout_rate: dropout on the hidden activations.
    dtype: computation dtype; parameters stay float32.
  """
  intermediate_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  intermediate_dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, inputs: Array, *, enable_dropout: bool = False) -> Array:
    """inputs: <float>[..., H] -> <float>[..., H] in self.dtype."""
    hidden, inner = inputs.shape[-1], self.intermediate_dim
    kernels = {n: Kernel((hidden, inner), ('embed', 'mlp'), self.kernel_init, name=n)()
               for n in input_projection_names(len(self.activations))}
    kernels['wo'] = Kernel((inner, hidden), ('mlp', 'embed'), self.kernel_init, name='wo')()
    dropout = nn.Dropout(rate=self.intermediate_dropout_rate)
    # float32 kernels: flat_matmul casts them to self.dtype, keeping their gradients float32.
    return gated_ffn(inputs.astype(self.dtype), kernels, self.activations,
                     dropout=lambda h: dropout(h, deterministic=not enable_dropout))


class Experts(nn.Module):
  """The E experts' FFN kernels, declared once for every expert path: `wi_0/kernel` <float32>[E, H, F], ...,
  `wo/kernel` [E, F, H], logical axes ('expert', 'mlp_embed', 'expert_mlp'), each expert's matrix
  initialised like a dense FFN kernel (truncated normal, fan-in of that expert's matrix).

  Attributes:
    num_experts: E.
    intermediate_dim: F.
    num_inputs: input projections (len(activations)).
  """
  num_experts: int
  intermediate_dim: int
  num_inputs: int = 2

  @nn.compact
  def __call__(self, hidden: int) -> dict[str, Array]:
    """hidden: H. Returns {name: float32 kernel}."""
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1,
                                            batch_axis=(0,))
    e, f = self.num_experts, self.intermediate_dim
    kernels = {n: Kernel((e, hidden, f), EXPERT_INPUT_AXES, init, name=n)()
               for n in input_projection_names(self.num_inputs)}
    kernels['wo'] = Kernel((e, f, hidden), EXPERT_OUTPUT_AXES, init, name='wo')()
    return kernels


# The logical axes of the experts' kernels: wi_* [E, H, F] and wo [E, F, H].
EXPERT_INPUT_AXES = ('expert', 'mlp_embed', 'expert_mlp')
EXPERT_OUTPUT_AXES = ('expert', 'expert_mlp', 'mlp_embed')


def expert_kernel_axes(name: str) -> tuple[str, str, str]:
  """The logical axes of expert kernel `name` ('wo' or an input projection)."""
  return EXPERT_OUTPUT_AXES if name == 'wo' else EXPERT_INPUT_AXES


# ---------------------------------------------------------------------------------------------------------
# Normalisation, embedding, attention and relative position bias (T5 v1.1 / flaxformer shapes and names).

class RMSNorm(nn.Module):
  """T5 layer norm: x / RMS(x) · scale, no mean subtraction and no bias, computed in float32.

  Attributes:
    epsilon: added to the mean square.
    dtype: output dtype.
  """
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: <float>[..., H] -> <dtype>[..., H]."""
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale[(None,) * (x.ndim - 1)]).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding table <float32>[vocab, H] with an `attend` method for tied output logits.

  Attributes:
    num_embeddings: vocabulary size V (T5: 32128, a multiple of 128).
    features: H.
    dtype: output dtype.
  """
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)  # T5's init; RMSNorm follows

  def setup(self):
    self.embedding = self.param('embedding',
                                nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """tokens: <int>[...] -> <dtype>[..., H]."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f'Embed expects integer token ids, got dtype {tokens.dtype}.')
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    """Logits against every embedding: <float>[..., H] -> <dtype>[..., V]."""
    flat = query.astype(self.dtype).reshape(-1, query.shape[-1])  # 2-D product: see Dense
    logits = cast_matmul(flat, self.embedding.T)  # float32 gradient (see cast_matmul)
    return logits.reshape(*query.shape[:-1], self.embedding.shape[0])


def relative_position_bucket(relative_position: Array, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """T5's bucketing of key_position − query_position.

  Half the buckets (per direction when bidirectional) are exact offsets; the rest grow logarithmically up to
  max_distance, beyond which everything shares the last bucket. Causal attention (bidirectional=False)
  only sees keys at or before the query, so only non-positive offsets get distinct buckets.

  Args:
    relative_position: <int>[...] key position minus query position.

  Returns:
    <int32>[...] bucket ids in [0, num_buckets).
  """
  bucket = jnp.zeros_like(relative_position, jnp.int32)
  n = -relative_position.astype(jnp.int32)  # distance into the past
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(jnp.int32) * num_buckets  # keys after the query use the upper half
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 log, as T5 / HF compute it; n=0 only reaches this branch masked out by is_small.
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / np.float32(
      math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  """T5 bucketed relative position bias, one scalar per (head, bucket), shared by a stack's layers.

  Attributes:
    num_buckets / max_distance: bucketing (T5: 32 / 128).
    num_heads: N.
    dtype: output dtype.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: DType = jnp.float32
  embedding_init: Callable = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool = True) -> Array:
    """Bias added to the attention logits.

    Args:
      query_positions: <int>[B or 1, Lq].
      key_positions: <int>[B or 1, Lk].
      bidirectional: encoder (True) or causal decoder (False) bucketing.

    Returns:
      <dtype>[B or 1, N, Lq, Lk].
    """
    rel_embedding = self.param(
        'rel_embedding', nn.with_logical_partitioning(self.embedding_init, ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), jnp.float32)
    relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, Lq, Lk]
    buckets = relative_position_bucket(relative, bidirectional, self.num_buckets, self.max_distance)
    # A one-hot contraction instead of a gather: the flaxformer / TPU-friendly form, exact in float32.
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=jnp.float32)  # [B, Lq, Lk, buckets]
    bias = jnp.einsum('nk,bqlk->bnql', rel_embedding, one_hot,
                      precision=jax.lax.Precision.HIGHEST)
    return bias.astype(self.dtype)


class DenseGeneral(nn.Module):
  """x · kernel contracting the last `num_contract` axes of x; kernel [*in, *features], no bias.

  The kernel is initialised as a 2-D [prod(in), prod(features)] matrix (so fan-in is the real fan-in) and
  reshaped, as t5x does.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  num_contract: int = 1
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    in_shape = inputs.shape[inputs.ndim - self.num_contract:]
    shape = tuple(in_shape) + tuple(self.features)

    def init(rng, shape, dtype):
      flat = (int(np.prod(in_shape)), int(np.prod(self.features)))
      return self.kernel_init(rng, flat, dtype).reshape(shape)

    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes), shape, jnp.float32)
    # As one 2-D matrix product (see Dense): [prod(leading), prod(in)] · [prod(in), prod(features)].
    leading = inputs.shape[:inputs.ndim - self.num_contract]
    x = inputs.astype(self.dtype).reshape(int(np.prod(leading)), int(np.prod(in_shape)))
    y = cast_matmul(x, kernel.reshape(x.shape[1], -1))  # float32 gradient (see cast_matmul)
    return y.reshape(*leading, *self.features)


def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: Callable[[Array, Array], Array] = jnp.logical_and) -> Array:
  """<bool>[B, 1, Lq, Lk] from per-token [B, Lq] and [B, Lk] features (padding flags, segment ids)."""
  return pairwise_fn(query_input[:, None, :, None], key_input[:, None, None, :])


def make_causal_mask(x: Array) -> Array:
  """<bool>[1, 1, L, L]: query i sees keys j ≤ i. x: [B, L] (only its length is used)."""
  idx = jnp.arange(x.shape[-1])
  return (idx[None, :] <= idx[:, None])[None, None]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the masks that are not None (broadcasting); None if all are None."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


class MultiHeadDotProductAttention(nn.Module):
  """T5 multi-head attention with an optional incremental-decoding key/value cache.

  No 1/√D scaling of the logits: as in T5, the query kernel's init is divided by √D instead, so
  imported T5 / Switch weights work unchanged. Logits and softmax run in float32.

  Decoding (decode=True): the first call (at init, with full-length inputs) creates the 'cache' collection
  — cached_key / cached_value <[B, L_max, N, D]> and cache_index — and attends normally; later calls take
  one query token [B, 1, H], write its key and value at cache_index and attend to positions ≤ cache_index.
  The caller passes the relative bias row for that position ([.., N, 1, L_max]).

  Attributes:
    num_heads: N.
    head_dim: D.
    dropout_rate: dropout on the attention weights.
    dtype: computation dtype.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, enable_dropout: bool = False,
               decode: bool = False) -> Array:
    """Attends.

    Args:
      inputs_q: <float>[B, Lq, H].
      inputs_kv: <float>[B, Lk, H].
      mask: optional <bool>[B or 1, 1, Lq, Lk], True where attention is allowed.
      bias: optional <float>[B or 1, N, Lq, Lk] added to the logits (relative position bias).
      enable_dropout: attention-weight dropout.
      decode: use / create the key-value cache (self-attention only).

    Returns:
      <dtype>[B, Lq, H].
    """
    features = (self.num_heads, self.head_dim)
    depth_scaling = np.sqrt(self.head_dim).astype(np.float32)
    query_init = lambda *args: self.kernel_init(*args) / depth_scaling
    proj = lambda name, init: DenseGeneral(features, ('embed', 'heads', 'kv'), 1, self.dtype, init,
                                           name=name)
    query = proj('query', query_init)(inputs_q)  # [B, Lq, N, D]
    key = proj('key', self.kernel_init)(inputs_kv)  # [B, Lk, N, D]
    value = proj('value', self.kernel_init)(inputs_kv)

    if decode:
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
      if initialized:
        batch, length, num_heads, head_dim = cached_key.value.shape
        if query.shape[1] != 1:
          raise ValueError(f'Incremental decoding feeds one token per step; got query length '
                           f'{query.shape[1]}. Initialise the cache with the full length first.')
        i = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                           (0, i, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype),
                                             (0, i, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = i + 1
        # Only the positions written so far: [1, 1, 1, L_max].
        mask = combine_masks(mask, (jnp.arange(length) <= i)[None, None, None, :])

    logits = jnp.einsum('bqnd,bknd->bnqk', query.astype(jnp.float32), key.astype(jnp.float32))
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      # A large finite negative: fully masked rows (padding queries) stay finite, never NaN.
      logits = jnp.where(mask, logits, -1e10)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not enable_dropout)
    out = jnp.einsum('bnqk,bknd->bqnd', weights, value.astype(self.dtype))  # [B, Lq, N, D]
    return DenseGeneral((inputs_q.shape[-1],), ('heads', 'kv', 'embed'), 2, self.dtype,
                        self.kernel_init, name='out')(out)
