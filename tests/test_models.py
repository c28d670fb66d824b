"""EncoderDecoder / DecoderOnly: layouts, parameter names and axes, masking, errors, gin model files."""

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import gin_setup, losses, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = models.TransformerConfig(vocab_size=48, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                  num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1)
# Eval capacity factor E: C = T, so no token is ever dropped and routing is a per-token decision (lets
# packed and unpacked batches be compared).
MOE = models.MoeConfig(num_sparse_layers=1, num_experts=4, expert_mlp_dim=20, extra_mlp=True,
                       eval_capacity_factor=4.0, min_expert_capacity=1)


# ---------------------------------------------------------------------------------------------------------
# Layouts (docs/routing.md §8).

@pytest.mark.parametrize('layers,sparse,layout,expected', [
    (12, 3, 'MIXED', (3, 7, 11)),
    (12, 6, 'MIXED', (1, 3, 5, 7, 9, 11)),
    (12, 12, 'MIXED', tuple(range(12))),
    (12, 3, 'BOTTOM', (0, 1, 2)),
    (12, 3, 'TOP', (9, 10, 11)),
    (12, 4, 'MIDDLE', (4, 5, 6, 7)),
    (12, 3, 'MIDDLE', (5, 6, 7)),   # L − S ≤ 2i < L + S: 9 ≤ 2i < 15
    (2, 1, 'mixed', (1,)),
    (5, 0, 'TOP', ()),
])
def test_sparse_layer_indices(layers, sparse, layout, expected):
  assert models.sparse_layer_indices(layers, sparse, layout) == expected


@pytest.mark.parametrize('layers,sparse,layout,match', [
    (12, 3, 'EVERY_OTHER', 'Unknown sparse layout'),
    (4, 5, 'TOP', 'does not fit'),
    (4, -1, 'TOP', 'does not fit'),
    (12, 5, 'MIXED', 'multiple of the sparse layer count'),
])
def test_sparse_layer_indices_errors(layers, sparse, layout, match):
  with pytest.raises(ValueError, match=match):
    models.sparse_layer_indices(layers, sparse, layout)


def test_bad_configs_fail_at_construction():
  with pytest.raises(ValueError, match='MoeConfig.sparse_layout.*SOMETIMES.*SPARSE_LAYOUT'):
    models.MoeConfig(num_sparse_layers=1, sparse_layout='SOMETIMES')
  with pytest.raises(ValueError, match='decoder_moe.*does not fit'):
    models.EncoderDecoder(CONFIG, None, models.MoeConfig(num_sparse_layers=3))
  with pytest.raises(ValueError, match='batch_prioritized_routing.*future'):
    models.EncoderDecoder(CONFIG, MOE, models.MoeConfig(num_sparse_layers=1, batch_prioritized_routing=True))
  with pytest.raises(ValueError, match='experts_choose.*future'):
    models.EncoderDecoder(CONFIG, MOE, models.MoeConfig(num_sparse_layers=1, routing_method='experts_choose'))
  with pytest.raises(ValueError, match='moe.batch_prioritized_routing'):
    models.DecoderOnly(CONFIG, models.MoeConfig(num_sparse_layers=1, batch_prioritized_routing=True))
  # The encoder may use both.
  models.EncoderDecoder(CONFIG, models.MoeConfig(num_sparse_layers=1, batch_prioritized_routing=True))
  models.EncoderDecoder(CONFIG, models.MoeConfig(num_sparse_layers=1, routing_method='experts_choose'))


# ---------------------------------------------------------------------------------------------------------
# The tiny encoder-decoder, shared.

ENC = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], np.int32)
DEC_T = np.array([[13, 14, 1, 0], [15, 16, 17, 1]], np.int32)
DEC_I = np.array([[0, 13, 14, 1], [0, 15, 16, 17]], np.int32)


@pytest.fixture(scope='module')
def encdec():
  model = models.EncoderDecoder(CONFIG, MOE, MOE)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ENC, DEC_I, DEC_T, enable_dropout=False))()
  apply = jax.jit(lambda p, *a: model.apply({'params': p}, *a, enable_dropout=False,
                                            mutable=['intermediates']))
  return model, variables, apply


def _paths(tree):
  return {'/'.join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_names_follow_flaxformer(encdec):
  _, variables, _ = encdec
  paths = _paths(nn.unbox(variables['params']))
  for name in ['token_embedder/embedding', 'encoder/relpos_bias/rel_embedding', 'encoder/encoder_norm/scale',
               'encoder/layers_0/attention/query/kernel', 'encoder/layers_0/mlp/wi_0/kernel',
               'encoder/layers_1/mlp/expert/wi_0/kernel', 'encoder/layers_1/mlp/expert/wi_1/kernel',
               'encoder/layers_1/mlp/expert/wo/kernel', 'encoder/layers_1/mlp/router/router_weights/w/kernel',
               'encoder/layers_1/extra_mlp/wi_0/kernel', 'encoder/layers_1/pre_extra_mlp_layer_norm/scale',
               'decoder/layers_0/self_attention/key/kernel', 'decoder/layers_0/encoder_decoder_attention/out/kernel',
               'decoder/layers_0/pre_cross_attention_layer_norm/scale', 'decoder/layers_1/mlp/expert/wo/kernel',
               'decoder/decoder_norm/scale', 'decoder/logits_dense/kernel', 'decoder/relpos_bias/rel_embedding']:
    assert name in paths, name
  assert 'encoder/layers_0/extra_mlp/wi_0/kernel' not in paths  # only sparse layers get the extra FFN
  params = nn.unbox(variables['params'])
  assert params['encoder']['layers_1']['mlp']['expert']['wi_0']['kernel'].shape == (4, 16, 20)


def test_every_param_has_logical_axes(encdec):
  _, variables, _ = encdec
  specs = nn.get_partition_spec(variables)['params']
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  flat_specs = dict((jax.tree_util.keystr(p), s) for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec))
  flat_params = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(
      nn.unbox(variables['params'])))
  assert flat_specs.keys() == flat_params.keys()
  allowed = {'batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab', 'expert', 'expert_mlp', 'mlp_embed',
             'unmodeled', 'relpos_buckets'}
  for path, spec in flat_specs.items():
    assert is_spec(spec) and len(spec) == flat_params[path].ndim, path
    assert set(spec) <= allowed, (path, spec)
  expert = "['encoder']['layers_1']['mlp']['expert']['wi_0']['kernel']"
  assert flat_specs[expert] == jax.sharding.PartitionSpec('expert', 'mlp_embed', 'expert_mlp')


def test_forward_shapes_and_moe_metrics(encdec):
  _, variables, apply = encdec
  logits, state = apply(variables['params'], ENC, DEC_I, DEC_T)
  assert logits.shape == (2, 4, CONFIG.vocab_size) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  metrics = losses.moe_metrics(state['intermediates'])
  assert set(metrics) == {'auxiliary_loss', 'router_z_loss', 'fraction_tokens_left_behind', 'expert_usage',
                          'router_confidence'}
  # The average over the two MoE layers (encoder layer 1, decoder layer 1).
  enc_z = state['intermediates']['encoder']['layers_1']['mlp']['router_z_loss'][0]
  dec_z = state['intermediates']['decoder']['layers_1']['mlp']['router_z_loss'][0]
  np.testing.assert_allclose(metrics['router_z_loss'], (enc_z + dec_z) / 2, rtol=1e-6)
  assert float(metrics['fraction_tokens_left_behind']) == 0.0  # C = T at eval


def test_encoder_padding_does_not_change_outputs(encdec):
  _, variables, apply = encdec
  logits, _ = apply(variables['params'], ENC, DEC_I, DEC_T)
  padded = np.pad(ENC, ((0, 0), (0, 3)))
  logits_padded, _ = apply(variables['params'], padded, DEC_I, DEC_T)
  real = DEC_T > 0  # padding targets' outputs are meaningless (their queries see nothing)
  np.testing.assert_allclose(np.asarray(logits_padded)[real], np.asarray(logits)[real], rtol=1e-5, atol=1e-5)


def test_packed_segments_attend_only_within_their_segment(encdec):
  """Two examples packed into one row give the logits each gets on its own row."""
  _, variables, apply = encdec
  enc_a, enc_b = [5, 6, 7], [8, 9]
  dec_a_t, dec_b_t = [10, 1], [11, 12, 1]
  packed = dict(
      enc=np.array([enc_a + enc_b + [0]]), enc_seg=np.array([[1, 1, 1, 2, 2, 0]]),
      enc_pos=np.array([[0, 1, 2, 0, 1, 0]]),
      dec_t=np.array([dec_a_t + dec_b_t + [0]]), dec_i=np.array([[0, 10, 0, 11, 12, 0]]),
      dec_seg=np.array([[1, 1, 2, 2, 2, 0]]), dec_pos=np.array([[0, 1, 0, 1, 2, 0]]))
  logits, _ = apply(variables['params'], packed['enc'], packed['dec_i'], packed['dec_t'], packed['enc_seg'],
                    packed['dec_seg'], packed['enc_pos'], packed['dec_pos'])
  # Each example alone, padded to the same [1, 6] shapes (one compilation; padding is inert).
  pad = lambda x: np.array([x + [0] * (6 - len(x))])
  alone_a, _ = apply(variables['params'], pad(enc_a), pad([0, 10]), pad(dec_a_t), None, None, None, None)
  alone_b, _ = apply(variables['params'], pad(enc_b), pad([0, 11, 12]), pad(dec_b_t), None, None, None, None)
  np.testing.assert_allclose(logits[0, :2], alone_a[0, :2], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits[0, 2:5], alone_b[0, :3], rtol=1e-4, atol=1e-5)
  # Without segment ids the second example would see the first.
  unmasked, _ = apply(variables['params'], packed['enc'], packed['dec_i'], packed['dec_t'], None, None, None,
                      None)
  assert not np.allclose(unmasked[0, 2:5], alone_b[0, :3], atol=1e-3)


def test_decoder_is_causal(encdec):
  _, variables, apply = encdec
  logits, _ = apply(variables['params'], ENC, DEC_I, DEC_T)
  changed_i = DEC_I.copy()
  changed_i[:, 3] = 20
  changed, _ = apply(variables['params'], ENC, changed_i, DEC_T)
  np.testing.assert_allclose(changed[:, :3], logits[:, :3], rtol=1e-5, atol=1e-6)
  assert not np.allclose(changed[:, 3], logits[:, 3])


@pytest.fixture(scope='module')
def relu_tied():
  """A second, smaller model: ReLU FFNs, tied logits, top-1 Switch layer at the top of the decoder."""
  config = models.TransformerConfig(vocab_size=32, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=12,
                                    num_encoder_layers=1, num_decoder_layers=2, activations=['relu'],
                                    logits_via_embedding=True, dropout_rate=0.1)
  model = models.EncoderDecoder(config, None, models.MoeConfig(num_sparse_layers=1, num_experts=2,
                                                               num_selected_experts=1, sparse_layout='TOP'))
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ENC, DEC_I, DEC_T, enable_dropout=False))()
  return model, variables


def test_tied_logits_and_relu(relu_tied):
  model, variables = relu_tied
  paths = _paths(nn.unbox(variables['params']))
  assert 'decoder/logits_dense/kernel' not in paths
  assert 'decoder/layers_1/mlp/expert/wi/kernel' in paths and 'decoder/layers_0/mlp/wi/kernel' in paths
  # Tied logits = decoder_norm output · embeddingᵀ / √H (t5x's scaling).
  logits, state = jax.jit(lambda: model.apply(
      variables, ENC, DEC_I, DEC_T, enable_dropout=False, mutable=['intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'decoder_norm'))()
  hidden = state['intermediates']['decoder']['decoder_norm']['__call__'][0]
  table = nn.unbox(variables['params'])['token_embedder']['embedding']
  np.testing.assert_allclose(logits, hidden @ table.T / np.sqrt(8), rtol=1e-5, atol=1e-5)


def test_dropout_and_gradients(relu_tied):
  model, variables = relu_tied

  def loss(params, rng):
    logits = model.apply({'params': params}, ENC, DEC_I, DEC_T, enable_dropout=True, rngs={'dropout': rng})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss))
  value_a, grads = grad_fn(variables['params'], jax.random.PRNGKey(1))
  value_b, _ = grad_fn(variables['params'], jax.random.PRNGKey(2))
  assert value_a != value_b  # dropout is on
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(nn.unbox(grads))]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2
  expert_grad = nn.unbox(grads)['decoder']['layers_1']['mlp']['expert']['wi']['kernel']
  assert float(jnp.abs(expert_grad).sum()) > 0


# ---------------------------------------------------------------------------------------------------------
# Decoder-only.

@pytest.fixture(scope='module')
def lm():
  model = models.DecoderOnly(CONFIG, MOE)
  tokens = np.array([[0, 5, 6, 7, 8], [0, 9, 10, 11, 0]], np.int32)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(3), tokens, tokens, enable_dropout=False))()
  apply = jax.jit(lambda p, *a: model.apply({'params': p}, *a, enable_dropout=False))
  return model, variables, apply, tokens


def test_decoder_only_forward_and_prefix_lm(lm):
  _, variables, apply, tokens = lm
  targets = np.array([[5, 6, 7, 8, 1], [9, 10, 11, 1, 0]], np.int32)
  logits = apply(variables['params'], tokens, targets)
  assert logits.shape == (2, 5, CONFIG.vocab_size)
  paths = _paths(nn.unbox(variables['params']))
  assert 'decoder/layers_1/mlp/expert/wi_0/kernel' in paths
  assert not any('encoder_decoder_attention' in p for p in paths)
  # Prefix LM: with positions 0-2 as the prefix, position 0 sees position 2; causally it does not.
  changed = tokens.copy()
  changed[:, 2] = 30
  prefix = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], np.int32)
  causal_a, causal_b = apply(variables['params'], tokens, targets), apply(variables['params'], changed, targets)
  np.testing.assert_allclose(causal_a[:, :2], causal_b[:, :2], rtol=1e-5, atol=1e-6)
  prefix_a = apply(variables['params'], tokens, targets, None, None, prefix)
  prefix_b = apply(variables['params'], changed, targets, None, None, prefix)
  assert not np.allclose(prefix_a[:, 0], prefix_b[:, 0])
  # After the prefix attention stays causal, and the prefix does not see past itself: changing token 4
  # leaves positions 0-3, changing token 3 leaves the prefix 0-2 as they were.
  for position in (4, 3):
    later = tokens.copy()
    later[:, position] = 31
    prefix_later = apply(variables['params'], later, targets, None, None, prefix)
    np.testing.assert_allclose(prefix_later[:, :position], prefix_a[:, :position], rtol=1e-5, atol=1e-6)
    assert not np.allclose(prefix_later[0, position], prefix_a[0, position])
  # A prefix of one token, or of none, gives exactly the causal logits.
  for short in ([1, 0, 0, 0, 0], [0, 0, 0, 0, 0]):
    short_prefix = np.array([short] * 2, np.int32)
    np.testing.assert_allclose(apply(variables['params'], tokens, targets, None, None, short_prefix), causal_a,
                               rtol=1e-5, atol=1e-6)


def test_decoder_only_segments(lm):
  _, variables, apply, _ = lm
  a_in, a_t, b_in, b_t = [0, 5, 6], [5, 6, 1], [0, 7], [7, 1]
  logits = apply(variables['params'], np.array([a_in + b_in]), np.array([a_t + b_t]),
                 np.array([[1, 1, 1, 2, 2]]), np.array([[0, 1, 2, 0, 1]]))
  alone_b = apply(variables['params'], np.array([b_in]), np.array([b_t]))
  np.testing.assert_allclose(logits[0, 3:], alone_b[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Gin model files.

GIN_FILES = sorted(glob.glob(os.path.join(REPO, 'gin', 'models', '*.gin')))
# Public parameter counts: ST-MoE-32B 269B, Switch-Base-8 620M (google/switch-base-8).
EXPECTED_PARAMS = {'st_moe_32b.gin': (268e9, 270e9), 'switch_base_8.gin': (615e6, 625e6)}


def test_all_model_files_are_tested():
  names = {os.path.basename(f) for f in GIN_FILES}
  assert {'st_moe_tiny.gin', 'st_moe_small.gin', 'st_moe_base.gin', 'st_moe_32b.gin', 'switch_base_8.gin',
          't5_1_1_tiny_dense.gin'} <= names


@pytest.mark.parametrize('path', GIN_FILES, ids=os.path.basename)
def test_gin_model_file_parses_and_builds(path, monkeypatch):
  monkeypatch.chdir(REPO)
  gin_setup.parse_model_gin([path], search_paths=[REPO])
  model = gin_setup.architecture()
  assert isinstance(model, models.EncoderDecoder)
  tokens = jnp.ones((2, 8), jnp.int32)
  # Shapes only: never materialise a large model's parameters.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                             enable_dropout=False))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(shapes['params']))
  low, high = EXPECTED_PARAMS.get(os.path.basename(path), (0, float('inf')))
  assert low <= num_params <= high, num_params
  if 'tiny' in os.path.basename(path):
    assert model.config.vocab_size >= gin_setup.macro('VOCABULARY').vocab_size
  if 'dense' in os.path.basename(path):
    assert model.encoder_moe.num_sparse_layers == 0 and model.decoder_moe.num_sparse_layers == 0
