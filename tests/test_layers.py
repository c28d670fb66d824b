"""Dense building blocks against plain numpy / plain-Python references of the T5 definitions."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import layers


def _specs_cover_every_param(variables):
  """Every param leaf is annotated with one logical axis name per dimension."""
  specs = nn.get_partition_spec(variables)['params']
  params = nn.unbox(variables)['params']
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  assert len(flat_specs) == len(flat_params)
  for (path, spec), (_, value) in zip(flat_specs, flat_params):
    assert isinstance(spec, jax.sharding.PartitionSpec), jax.tree_util.keystr(path)
    assert len(spec) == value.ndim and all(isinstance(a, str) for a in spec), (jax.tree_util.keystr(path), spec)


def test_rms_norm_matches_formula():
  x = np.array([[1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 4.0]], np.float32)
  norm = layers.RMSNorm(epsilon=1e-6)
  variables = norm.init(jax.random.PRNGKey(0), x)
  scale = np.array([1.0, 2.0, 0.5, -1.0], np.float32)
  y = norm.apply({'params': {'scale': scale}}, x)
  expected = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(y, expected, rtol=1e-6)
  assert nn.get_partition_spec(variables)['params']['scale'] == jax.sharding.PartitionSpec('embed')


def test_embed_lookup_and_attend():
  embed = layers.Embed(num_embeddings=5, features=3)
  variables = embed.init(jax.random.PRNGKey(0), jnp.array([0, 1]))
  table = np.arange(15, dtype=np.float32).reshape(5, 3) / 10
  params = {'params': {'embedding': table}}
  np.testing.assert_allclose(embed.apply(params, jnp.array([[4, 0]])), table[[[4, 0]]])
  query = np.array([[1.0, -1.0, 0.5]], np.float32)
  np.testing.assert_allclose(embed.apply(params, query, method='attend'), query @ table.T, rtol=1e-6)
  _specs_cover_every_param(variables)
  assert nn.get_partition_spec(variables)['params']['embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')
  with pytest.raises(TypeError, match='integer token ids'):
    embed.apply(params, jnp.ones((2,), jnp.float32))


def reference_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """Mesh TF / T5's bucketing written out for one integer."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(np.float32(math.log(n / max_exact) / math.log(max_distance / max_exact))
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_bucket_matches_reference(bidirectional):
  rel = np.arange(-300, 301)
  got = np.asarray(layers.relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128))
  expected = [reference_bucket(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, expected)
  assert got.min() >= 0 and got.max() < 32
  if not bidirectional:  # future keys all share bucket 0 with the query's own position
    assert np.all(got[rel >= 0] == 0)


def test_relative_position_biases_shapes_and_values():
  module = layers.RelativePositionBiases(num_heads=2, num_buckets=8, max_distance=16)
  pos = jnp.arange(5)[None]
  variables = module.init(jax.random.PRNGKey(0), pos, pos)
  table = np.asarray(nn.unbox(variables)['params']['rel_embedding'])
  bias = np.asarray(module.apply(variables, pos, pos, bidirectional=True))
  assert bias.shape == (1, 2, 5, 5)
  buckets = np.asarray(layers.relative_position_bucket(pos[0][None, :] - pos[0][:, None], True, 8, 16))
  np.testing.assert_allclose(bias[0], table[:, buckets], rtol=1e-6)
  # Per-row positions: a batch of [B, L] positions gives [B, N, L, L]; shifted positions, same bias.
  batch_pos = jnp.stack([jnp.arange(5), jnp.arange(5) + 7])
  batched = np.asarray(module.apply(variables, batch_pos, batch_pos))
  np.testing.assert_allclose(batched[0], batched[1])
  assert nn.get_partition_spec(variables)['params']['rel_embedding'] == jax.sharding.PartitionSpec(
      'heads', 'relpos_buckets')


def reference_attention(params, xq, xkv, mask, bias):
  q = np.einsum('bqh,hnd->bqnd', xq, params['query']['kernel'])
  k = np.einsum('bkh,hnd->bknd', xkv, params['key']['kernel'])
  v = np.einsum('bkh,hnd->bknd', xkv, params['value']['kernel'])
  logits = np.einsum('bqnd,bknd->bnqk', q, k) + bias  # no 1/sqrt(D): T5 puts it in the query init
  logits = np.where(mask, logits, -1e10)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum('bnqk,bknd->bqnd', w, v)
  return np.einsum('bqnd,ndh->bqh', out, params['out']['kernel'])


@pytest.fixture(scope='module')
def attention_setup():
  attn = layers.MultiHeadDotProductAttention(num_heads=2, head_dim=3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 5)).astype(np.float32)
  variables = attn.init(jax.random.PRNGKey(1), x, x)
  return attn, variables, x


def test_attention_matches_reference(attention_setup):
  attn, variables, x = attention_setup
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(variables)['params'])
  assert params['query']['kernel'].shape == (5, 2, 3) and params['out']['kernel'].shape == (2, 3, 5)
  mask = layers.combine_masks(layers.make_causal_mask(x[..., 0]),
                              layers.make_attention_mask(jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]]) > 0,
                                                         jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]]) > 0))
  bias = np.random.default_rng(1).normal(size=(1, 2, 4, 4)).astype(np.float32)
  got = attn.apply(variables, x, x, mask, bias)
  np.testing.assert_allclose(got, reference_attention(params, x, x, np.asarray(mask), bias), rtol=2e-5,
                             atol=2e-6)
  assert np.all(np.isfinite(np.asarray(got)))  # the fully masked padding query stays finite
  _specs_cover_every_param(variables)
  specs = nn.get_partition_spec(variables)['params']
  assert specs['query']['kernel'] == jax.sharding.PartitionSpec('embed', 'heads', 'kv')
  assert specs['out']['kernel'] == jax.sharding.PartitionSpec('heads', 'kv', 'embed')


def test_attention_kv_cache_equals_full_causal_attention(attention_setup):
  attn, variables, x = attention_setup
  length = x.shape[1]
  bias = np.random.default_rng(2).normal(size=(1, 2, length, length)).astype(np.float32)
  full = attn.apply(variables, x, x, layers.make_causal_mask(x[..., 0]), bias)
  cache = attn.init(jax.random.PRNGKey(0), x, x, decode=True)['cache']
  cache = jax.tree_util.tree_map(jnp.zeros_like, cache)
  steps = []
  for i in range(length):
    out, state = attn.apply({'params': variables['params'], 'cache': cache}, x[:, i:i + 1], x[:, i:i + 1],
                            None, bias[:, :, i:i + 1], decode=True, mutable=['cache'])
    cache = state['cache']
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=2e-5, atol=2e-6)
  assert int(cache['cache_index']) == length
  with pytest.raises(ValueError, match='one token per step'):
    attn.apply({'params': variables['params'], 'cache': cache}, x, x, decode=True, mutable=['cache'])


def test_dense_general_fan_in_init():
  module = layers.DenseGeneral((4, 8), ('embed', 'heads', 'kv'))
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 256)))
  kernel = np.asarray(nn.unbox(variables)['params']['kernel'])
  assert kernel.shape == (256, 4, 8)
  # variance_scaling(1, fan_in): std ≈ 1/sqrt(256) with fan-in the contracted dimension only
  assert 0.8 / 16 < kernel.std() < 1.2 / 16
