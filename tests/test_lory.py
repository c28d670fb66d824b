"""Lory: segment routing and expert merging, upcycling, cached decoding, similarity batching, gin."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import decoding, lory, models
from tasks import lory_batching

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# Pure helpers on hand-sized arrays.

def test_segment_means_skip_padding():
  x = np.array([[[1., 2.], [3., 4.], [5., 6.], [7., 8.]]], np.float32)  # [1, 4, 2], T = 2
  real = np.array([[1, 1, 1, 0]], np.float32)
  np.testing.assert_allclose(lory.segment_means(x, real, 2), [[[2., 3.], [5., 6.]]])


def test_causal_segment_weights():
  probs = np.array([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]], np.float32)  # [B=1, N=3, E=2]
  np.testing.assert_allclose(lory.causal_segment_weights(probs, 'uniform'),
                             [[[0.5, 0.5], [0.7, 0.3], [0.2, 0.8]]])
  np.testing.assert_allclose(lory.causal_segment_weights(probs, 'self_stopgrad'),
                             [[[0.7, 0.3], [0.7, 0.3], [0.2, 0.8]]])
  # The paper's stop-gradient: segment 1's own weights pass no gradient.
  grad = jax.grad(lambda p: lory.causal_segment_weights(p, 'self_stopgrad')[0, 0, 0])(jnp.asarray(probs))
  assert float(jnp.abs(grad).sum()) == 0.0
  with pytest.raises(ValueError, match='lory_first_segment'):
    lory.causal_segment_weights(probs, 'prefix')


def test_merge_experts():
  kernel = np.array([[[1., 0.]], [[0., 2.]]], np.float32)  # [E=2, 1, 2]
  np.testing.assert_allclose(lory.merge_experts(np.array([0.25, 0.75], np.float32), kernel), [[0.25, 1.5]])


# ---------------------------------------------------------------------------------------------------------
# The layer against a direct reference.

H, F, E, T = 4, 6, 3, 2
LAYER = lory.LoryMoeLayer(num_experts=E, intermediate_dim=F, segment_length=T, activations=('relu',))
X = np.linspace(-1.0, 1.0, 2 * 5 * H, dtype=np.float32).reshape(2, 5, H)  # L = 5: a short last segment


def _reference(params, x, weights_of_segment):
  """Token t of segment k: wo_k · relu(wi_k · x) with θ_k = Σ_i w_i(k) θ_i; done with numpy loops."""
  p = nn.unbox(params)
  wi, wo = np.asarray(p['expert']['wi']['kernel']), np.asarray(p['expert']['wo']['kernel'])
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      w = weights_of_segment(b, t // T)
      out[b, t] = np.maximum(x[b, t] @ np.tensordot(w, wi, 1), 0) @ np.tensordot(w, wo, 1)
  return out


def test_layer_matches_reference():
  params = LAYER.init(jax.random.PRNGKey(0), X, enable_dropout=False)['params']
  r = np.asarray(nn.unbox(params)['router']['router_weights']['w']['kernel'])  # [H, E]
  softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()

  def weights(b, k):  # segment k routes on the mean of segment k − 1; segment 0 uniform
    return np.full(E, 1 / E) if k == 0 else softmax(X[b, (k - 1) * T:k * T].mean(0) @ r)

  y = LAYER.apply({'params': params}, X, enable_dropout=False)
  np.testing.assert_allclose(y, _reference(params, X, weights), rtol=1e-5, atol=1e-6)
  # Prompt routing (inference): every position uses the mean of the prompt tokens (here the first 3).
  prompt = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], np.int32)
  y = LAYER.apply({'params': params}, X, prompt_mask=prompt, enable_dropout=False)
  np.testing.assert_allclose(y, _reference(params, X, lambda b, k: softmax(X[b, :3].mean(0) @ r)),
                             rtol=1e-5, atol=1e-6)
  # In training the prompt is ignored: segment routing.
  y_train = LAYER.apply({'params': params}, X, prompt_mask=prompt, enable_dropout=True)
  np.testing.assert_allclose(y_train, _reference(params, X, weights), rtol=1e-5, atol=1e-6)


def _decode_steps(layer, params, x, prompt=None):
  """Runs the layer token by token with its cache; returns [B, L, H]."""
  cache = layer.init(jax.random.PRNGKey(0), x, enable_dropout=False, decode=True)['cache']
  cache = jax.tree_util.tree_map(jnp.zeros_like, cache)  # as decoding.init_cache makes it
  outs = []
  for t in range(x.shape[1]):
    y, state = layer.apply({'params': params, 'cache': cache}, x[:, t:t + 1], enable_dropout=False, decode=True,
                           prompt_mask=None if prompt is None else prompt[:, t:t + 1], mutable=['cache'])
    cache = state['cache']
    outs.append(y)
  return np.concatenate(outs, 1)


def test_layer_decode_steps_match_full_pass():
  params = LAYER.init(jax.random.PRNGKey(0), X, enable_dropout=False)['params']
  full = LAYER.apply({'params': params}, X, enable_dropout=False)
  np.testing.assert_allclose(_decode_steps(LAYER, params, X), full, rtol=1e-5, atol=1e-6)
  # Prompt routing: once the prompt is complete, decode steps use the full prompt's merged FFN.
  prompt = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int32)
  full = np.asarray(LAYER.apply({'params': params}, X, prompt_mask=prompt, enable_dropout=False))
  steps = _decode_steps(LAYER, params, X, prompt)
  np.testing.assert_allclose(steps[0, 2:], full[0, 2:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(steps[1, 1:], full[1, 1:], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Models: upcycling and cached decoding.

CONFIG = models.TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                  num_decoder_layers=2, activations=('silu', 'linear'))
LORY = models.MoeConfig(num_sparse_layers=2, num_experts=4, moe_type='lory', segment_length=2,
                        lory_inference_routing='segment')
TOKENS = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 11, 0]], np.int32)


def test_upcycle_dense_to_lory_keeps_the_function():
  dense_model = models.DecoderOnly(CONFIG, None)
  lory_model = models.DecoderOnly(CONFIG, LORY)
  layers = models.sparse_layer_indices(2, LORY.num_sparse_layers, LORY.sparse_layout)

  @jax.jit
  def run():
    dense = dense_model.init(jax.random.PRNGKey(0), TOKENS, None, enable_dropout=False)['params']
    upcycled = lory.upcycle_dense_to_lory(dense, num_experts=4, layer_indices=layers,
                                          rng=jax.random.PRNGKey(1))
    return (upcycled, dense_model.apply({'params': dense}, TOKENS, None, enable_dropout=False),
            lory_model.apply({'params': upcycled}, TOKENS, None, enable_dropout=False))

  upcycled, dense_logits, lory_logits = run()
  expected = nn.unbox(jax.eval_shape(lambda: lory_model.init(jax.random.PRNGKey(0), TOKENS, None,
                                                             enable_dropout=False))['params'])
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(upcycled) == shapes(expected)
  mlp = upcycled['decoder']['layers_0']['mlp']
  np.testing.assert_array_equal(mlp['expert']['wi_0']['kernel'][3], mlp['expert']['wi_0']['kernel'][0])
  assert float(jnp.std(mlp['router']['router_weights']['w']['kernel'])) > 0.005  # random, not zero
  # Identical experts merged with weights summing to 1 are the dense FFN.
  np.testing.assert_allclose(lory_logits, dense_logits, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='router_init_std'):
    lory.upcycle_dense_to_lory({}, num_experts=4, layer_indices=layers, rng=jax.random.PRNGKey(1),
                               router_init_std=0.0)
  with pytest.raises(ValueError, match='not a dense FFN'):
    lory.upcycle_dense_to_lory(upcycled, num_experts=4, layer_indices=layers, rng=jax.random.PRNGKey(1))


def test_cached_decoding_equals_recompute_with_segment_routing():
  model = models.DecoderOnly(CONFIG, LORY)
  length = 6
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(2), jnp.zeros((3, length), jnp.int32), None,
                                      enable_dropout=False))()['params']
  prompt = np.array([[5, 6, 7, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 9, 10, 11, 0, 0]], np.int32)
  tokens, _ = decoding.generate(model, params, max_decode_length=length, prompt=prompt)
  apply = jax.jit(lambda d_in, d_t: model.apply({'params': params}, d_in, d_t, enable_dropout=False))
  out = np.zeros_like(prompt)
  for i in range(length):  # greedy by recomputing the whole prefix
    dec_in = np.concatenate([np.zeros((3, 1), np.int32), out[:, :-1]], 1)
    targets = np.where(np.arange(length)[None] <= i, np.maximum(out, 1), 0)
    step = np.asarray(apply(dec_in, targets))[:, i].argmax(-1)
    out[:, i] = np.where(prompt[:, i] != 0, prompt[:, i], step)
    out[:, i] = np.where((out[:, :i] == 1).any(1), 0, out[:, i])
  np.testing.assert_array_equal(tokens, out)


def test_config_errors():
  with pytest.raises(ValueError, match='encoder_moe.moe_type="lory"'):
    models.EncoderDecoder(CONFIG, LORY, None)
  with pytest.raises(ValueError, match='MoeConfig.router=.*moe_type="lory"'):
    models.MoeConfig(moe_type='lory', router='recurrent')
  with pytest.raises(ValueError, match='MoeConfig.lory_first_segment'):
    models.MoeConfig(lory_first_segment='prefix')
  with pytest.raises(ValueError, match='MoeConfig.segment_length'):
    models.MoeConfig(segment_length=0)
  with pytest.raises(ValueError, match='MoeConfig.moe_type'):
    models.MoeConfig(moe_type='smear')


def test_gin_lory_file(monkeypatch):
  gin_setup = pytest.importorskip('st_moe_jax.gin_setup')
  monkeypatch.chdir(REPO)
  gin_setup.parse_model_gin(['gin/models/st_moe_tiny.gin', 'gin/runs/decoder_only.gin', 'gin/routers/lory.gin'],
                            ['SEGMENT_LENGTH = 4'], search_paths=[REPO])
  model = gin_setup.architecture()
  assert isinstance(model, models.DecoderOnly)
  assert model.moe.moe_type == 'lory' and model.moe.segment_length == 4 and not model.moe.extra_mlp
  tokens = jnp.ones((2, 8), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens,
                                                      enable_dropout=False))['params'])
  assert shapes['decoder']['layers_1']['mlp']['expert']['wo']['kernel'].shape == (8, 256, 128)


# ---------------------------------------------------------------------------------------------------------
# Similarity batching (tasks/lory_batching.py).

DOCS = [
    'the cat sat on the mat and the cat purred',           # 0 cats
    'stock prices fell as market trading slowed',          # 1 markets
    'python functions return values and raise errors',     # 2 code
    'a young cat purred on a warm mat',                    # 3 cats
    'investors sold stock when market prices fell',        # 4 markets
    'errors in python code raise exceptions in functions',  # 5 code
]
TOPIC = [0, 1, 2, 0, 1, 2]


def test_tfidf_and_neighbours():
  emb = lory_batching.tfidf_embeddings(DOCS)
  assert emb.shape[0] == 6
  np.testing.assert_allclose(np.sqrt(emb.multiply(emb).sum(1)).A.ravel(), 1.0, rtol=1e-6)
  idx, sims = lory_batching.nearest_neighbours(emb, k=1)
  assert [TOPIC[j] for j in idx[:, 0]] == TOPIC  # each document's nearest neighbour shares its topic
  assert np.all(idx[:, 0] != np.arange(6)) and np.all(sims[:, 0] > 0)


def test_greedy_path_puts_similar_documents_next_to_each_other():
  order = lory_batching.similarity_order(DOCS, k=2)
  assert sorted(order) == list(range(6))
  adjacent_same_topic = sum(TOPIC[a] == TOPIC[b] for a, b in zip(order, order[1:]))
  assert adjacent_same_topic == 3, order  # the three pairs, each adjacent


def test_greedy_path_on_a_hand_made_graph():
  # A path 0–1–2 with a weak shortcut 0–2, and an isolated node 3. Degrees: 0:2, 1:2, 2:2, 3:0.
  adjacency = [{1: 0.9, 2: 0.1}, {0: 0.9, 2: 0.8}, {1: 0.8, 0: 0.1}, {}]
  assert lory_batching.greedy_max_path(adjacency) == [3, 0, 1, 2]  # min degree first, then best neighbour


def test_pack_in_order():
  packed = lory_batching.pack_in_order([[5, 6], [7], [8, 9, 10]], [2, 0, 1], length=4, eos_id=1)
  np.testing.assert_array_equal(packed, [[8, 9, 10, 1], [5, 6, 1, 7], [1, 0, 0, 0]])
  assert lory_batching.pack_in_order([[5, 6], [7]], [1, 0], 2, drop_remainder=True).tolist() == [[7, 1], [5, 6]]
  with pytest.raises(ValueError, match='permutation'):
    lory_batching.pack_in_order([[5], [6]], [0, 0], 4)
