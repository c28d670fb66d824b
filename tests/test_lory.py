"""Lory: segment routing and expert merging, upcycling, cached decoding, similarity batching (the seqio
step and its tasks), gin."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from st_moe_jax import data, decoding, gin_setup, lory, models
from st_moe_jax.config import MoeConfig
from tasks import common
from tasks import lory_batching
from tasks import pretraining as pt

BYTES = seqio.ByteVocabulary()

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
  with pytest.raises(ValueError, match='first_segment'):
    lory.causal_segment_weights(probs, 'prefix')


def test_merge_experts():
  kernel = np.array([[[1., 0.]], [[0., 2.]]], np.float32)  # [E=2, 1, 2]
  np.testing.assert_allclose(lory.merge_experts(np.array([0.25, 0.75], np.float32), kernel), [[0.25, 1.5]])


# ---------------------------------------------------------------------------------------------------------
# The layer against a direct reference.

H, F, E, T = 4, 6, 3, 2
LAYER = lory.LoryMoeLayer(MoeConfig(moe_type='lory', num_experts=E, expert_mlp_dim=F, segment_length=T,
                                    expert_activations=('relu',)))
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


def _greedy_by_recompute(apply, prompt):
  """Greedy decoding by running the whole model on the prefix at every step; also the log-probability of
  the generated (not forced) tokens."""
  batch, length = prompt.shape
  out, logprob = np.zeros_like(prompt), np.zeros(batch, np.float32)
  for i in range(length):
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), out[:, :-1]], 1)
    targets = np.where(np.arange(length)[None] <= i, np.maximum(out, 1), 0)
    log_probs = np.asarray(jax.nn.log_softmax(apply(dec_in, targets)))[:, i]
    ended = (out[:, :i] == 1).any(1)
    free = (prompt[:, i] == 0) & ~ended
    out[:, i] = np.where(ended, 0, np.where(free, log_probs.argmax(-1), prompt[:, i]))
    logprob += np.where(free, log_probs[np.arange(batch), out[:, i]], 0.0)
  return out, logprob


def _route_on_the_prompt_seen_so_far(prompt_mask):
  """A flax interceptor for full passes: position t of every Lory layer routes on the prompt positions ≤ t
  (prompt_mask <int>[B, L], the decoder inputs that are prompt), which is what cached decoding does.

  Each row is repeated once per position t with the prompt cut after t; position t of copy t is kept."""
  def interceptor(next_fun, args, kwargs, context):
    if not (isinstance(context.module, lory.LoryMoeLayer) and context.method_name == '__call__'):
      return next_fun(*args, **kwargs)
    x, padding = args
    batch, length, hidden = x.shape
    seen = prompt_mask[:, None, :length] * np.tril(np.ones((length, length), np.int32))[None]  # [B, t, L]
    y = next_fun(jnp.repeat(x, length, 0), jnp.repeat(padding, length, 0),
                 **{**kwargs, 'prompt_mask': seen.reshape(batch * length, length)})
    return y.reshape(batch, length, length, hidden)[:, np.arange(length), np.arange(length)]
  return interceptor


def test_generate_routes_on_the_prompt():
  """decoding.generate tells a decoder-only Lory model its prompt: it equals a cache-free recompute whose
  Lory layers route on the prompt (seen so far), and differs from routing by segments."""
  model = models.DecoderOnly(CONFIG, dataclasses.replace(LORY, lory_inference_routing='prompt'))
  length = 6
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(2), jnp.zeros((4, length), jnp.int32), None,
                                      enable_dropout=False))()['params']
  # A sharp router (x100) makes the routing show in the greedy tokens.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 100.0 if 'router' in jax.tree_util.keystr(path) else x, nn.unbox(params))
  prompt = np.array([[5, 6, 7, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 9, 10, 11, 0, 0], [0, 0, 0, 0, 0, 0]],
                    np.int32)  # the last row has no prompt: it routes by segments
  prompt_mask = np.asarray(decoding.prompt_positions(prompt))
  np.testing.assert_array_equal(prompt_mask[:, :5], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                                                     [0, 0, 0, 0, 0]])  # BOS and the prompt tokens

  def apply(d_in, d_t, route_on_prompt):
    if not route_on_prompt:
      return model.apply({'params': params}, d_in, d_t, enable_dropout=False)
    with nn.intercept_methods(_route_on_the_prompt_seen_so_far(prompt_mask)):
      return model.apply({'params': params}, d_in, d_t, enable_dropout=False)
  apply = jax.jit(apply, static_argnums=2)

  tokens, logprob = decoding.generate(model, params, max_decode_length=length, prompt=prompt)
  expected, expected_logprob = _greedy_by_recompute(lambda i, t: apply(i, t, True), prompt)
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_allclose(logprob, expected_logprob, rtol=1e-4, atol=1e-4)
  by_segments, _ = _greedy_by_recompute(lambda i, t: apply(i, t, False), prompt)
  assert not np.array_equal(expected[:3], by_segments[:3])  # the prompt routing is what decides here
  np.testing.assert_array_equal(expected[3], by_segments[3])

  # Beam search repeats the prompt positions for every beam: its best beam is scored like the recompute.
  beams, scores = decoding.generate(model, params, max_decode_length=length, prompt=prompt, method='beam',
                                    beam_size=2, alpha=0.0)
  best = np.asarray(beams)[:, 0]
  np.testing.assert_array_equal(best[prompt > 0], prompt[prompt > 0])
  dec_in = np.concatenate([np.zeros((4, 1), np.int32), best[:, :-1]], 1)
  log_probs = np.asarray(jax.nn.log_softmax(apply(dec_in, np.maximum(best, 1), True)))
  picked = np.take_along_axis(log_probs, best[..., None], -1)[..., 0]
  np.testing.assert_allclose(scores[:, 0], (picked * ((best > 0) & (prompt == 0))).sum(-1), rtol=1e-4,
                             atol=1e-4)


def test_config_errors():
  with pytest.raises(ValueError, match='encoder_moe.moe_type="lory"'):
    models.EncoderDecoder(CONFIG, LORY, None)
  with pytest.raises(ValueError, match='MoeConfig.router=.*moe_type="lory"'):
    models.MoeConfig(moe_type='lory', router='recurrent')
  with pytest.raises(ValueError, match='MoeConfig.lory_first_segment'):
    models.MoeConfig(lory_first_segment='prefix')
  # Settings only routed layers read are an error with Lory, not silently ignored.
  for setting in (dict(jitter_noise=0.1), dict(train_capacity_factor=2.0), dict(expert_capacity=4),
                  dict(routing_method='sparsemixer'), dict(dropless=True), dict(num_selected_experts=1)):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f'moe_type="lory".*ignores {name}='):
      models.MoeConfig(moe_type='lory', **setting)
  with pytest.raises(ValueError, match='MoeConfig.segment_length'):
    models.MoeConfig(segment_length=0)
  with pytest.raises(ValueError, match='MoeConfig.moe_type'):
    models.MoeConfig(moe_type='smear')


def test_gin_lory_file(monkeypatch):
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


# Synthetic corpus with three clear topics, interleaved (document d is about topic d % 3). Each topic writes
# with its own letters, so the topic of any byte of a packed sequence can be read off, even of a cut word.
ALPHABETS = ('abcdefgh', 'ijklmnop', 'qrstuvwx')
NUM_TOPIC_DOCS = 60


def topic_corpus(num_docs=NUM_TOPIC_DOCS, words_per_doc=6):
  rng = np.random.RandomState(0)
  vocab = [[''.join(rng.choice(list(alphabet), 4)) for _ in range(12)] for alphabet in ALPHABETS]
  return [' '.join(rng.choice(vocab[d % 3], words_per_doc, replace=False)) for d in range(num_docs)]


def topic_of_text(text):
  topics = {t for ch in text for t, alphabet in enumerate(ALPHABETS) if ch in alphabet}
  assert len(topics) == 1, text
  return topics.pop()


def same_topic_rate(texts):
  topics = [topic_of_text(t) for t in texts]
  return np.mean([a == b for a, b in zip(topics, topics[1:])])


def test_walk_puts_documents_of_a_topic_together():
  docs = topic_corpus()
  order = lory_batching.similarity_order(docs, k=5)
  assert sorted(order) == list(range(len(docs)))
  assert same_topic_rate(docs) == 0  # interleaved
  assert same_topic_rate([docs[i] for i in order]) >= 0.8  # chance: 1/3; here 0.92
  # Neighbours in the walk are more similar than in random orders.
  emb = lory_batching.tfidf_embeddings(docs)
  sim = (emb @ emb.T).toarray()

  def adjacent_similarity(o):
    return np.mean([sim[a, b] for a, b in zip(o, o[1:])])

  rng = np.random.RandomState(1)
  random_orders = [adjacent_similarity(rng.permutation(len(docs))) for _ in range(20)]
  assert adjacent_similarity(order) > 2 * max(random_orders)


def ordered_examples(examples, **kwargs):
  ds = tf.data.Dataset.from_tensor_slices({k: [ex[k] for ex in examples] for k in examples[0]})
  return list(lory_batching.order_by_similarity(ds, **kwargs).as_numpy_iterator())


def test_order_by_similarity_preprocessor():
  docs = topic_corpus()
  examples = [{'text': t, 'id': i} for i, t in enumerate(docs)]
  lory_batching._ORDER_CACHE.clear()
  out = ordered_examples(examples, k=5)
  # Each document once, with its other features; a fixed order that ignores the input order.
  assert sorted((ex['id'], ex['text'].decode()) for ex in out) == [(i, t) for i, t in enumerate(docs)]
  assert same_topic_rate([ex['text'].decode() for ex in out]) >= 0.8
  lory_batching._ORDER_CACHE.clear()
  again = ordered_examples(examples[::-1], k=5)
  assert [ex['id'] for ex in again] == [ex['id'] for ex in out]
  # Duplicates are kept, not merged.
  twice = ordered_examples(examples[:4] + examples[:4], k=2)
  assert sorted(ex['id'] for ex in twice) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_order_by_similarity_keeps_a_documents_examples_together():
  # Three files of three segments each, given interleaved: each file comes out whole, segments in order.
  docs = topic_corpus(9)
  examples = [{'text': docs[3 * f + s], 'path': f'f{f}', 'segment': s} for s in range(3) for f in range(3)]
  out = ordered_examples(examples, k=2, group_key='path')
  paths = [ex['path'].decode() for ex in out]
  assert sorted(paths[::3]) == ['f0', 'f1', 'f2'] and paths == [p for p in paths[::3] for _ in range(3)]
  assert [ex['segment'] for ex in out] == [0, 1, 2] * 3
  with pytest.raises(ValueError, match="needs a 'file' feature"):
    ordered_examples(examples, group_key='file')


def test_order_by_similarity_errors():
  ds = tf.data.Dataset.from_tensor_slices({'text': ['a b', 'b c']})
  for k in (0, -1, 2.5):
    with pytest.raises(ValueError, match='k .*must be an integer >= 1'):
      lory_batching.order_by_similarity(ds, k=k)
  with pytest.raises(common.MissingDataError, match='no documents'):
    lory_batching.order_by_similarity(ds.filter(lambda x: False))
  with pytest.raises(ValueError, match="needs a 'body' feature"):
    lory_batching.order_by_similarity(ds, text_key='body')
  tokens = tf.data.Dataset.from_tensors({'text': tf.constant('a b'), 'targets': tf.constant([3, 4])})
  with pytest.raises(ValueError, match="scalar features; 'targets'.*before `tokenize`"):
    lory_batching.order_by_similarity(tokens)
  with pytest.raises(ValueError, match='k .*must be an integer'):
    lory_batching.similarity_order(['a'], k=0)


@pytest.fixture(scope='module')
def topic_tasks(tmp_path_factory):
  """'lory_topics_lm' over a directory of the topic corpus (one file per document) and its similarity twin."""
  root = tmp_path_factory.mktemp('topics')
  for d, text in enumerate(topic_corpus()):
    (root / f'doc{d:03d}.txt').write_text(text)
  names = pt.register_text_dir_tasks('lory_topics', str(root), patterns=('*.txt',), validation_fraction=0.25,
                                     similarity=True)
  assert names == ['lory_topics_span_corruption', 'lory_topics_lm', 'lory_topics_lm_similarity']
  return names[1:]


def documents(task_name, split):
  """The task's documents in the order its (unshuffled) token stream holds them."""
  ds = seqio.get_mixture_or_task(task_name).get_dataset({'targets': 32}, split=split, shuffle=False)
  stream = np.concatenate([ex['targets'] for ex in ds.as_numpy_iterator()]).tolist()
  assert stream[-1] == BYTES.eos_id
  pieces, start = [], 0
  for end in (i for i, t in enumerate(stream) if t == BYTES.eos_id):
    pieces.append(bytes(t - 3 for t in stream[start:end]).decode())  # bytes are ids 3..258
    start = end + 1
  return pieces


def test_similarity_task_reorders_the_plain_tasks_documents(topic_tasks):
  plain, similar = topic_tasks
  seen = {}
  for split in ('train', 'validation'):
    lory_batching._ORDER_CACHE.clear()
    ordered = documents(similar, split)
    assert sorted(ordered) == sorted(documents(plain, split))  # nothing dropped or duplicated
    lory_batching._ORDER_CACHE.clear()
    assert documents(similar, split) == ordered  # the same order on a second build
    seen[split] = ordered
  assert not set(seen['train']) & set(seen['validation']) and len(seen['validation']) >= 5
  assert same_topic_rate(documents(plain, 'train')) < 0.2  # files in name order: interleaved topics
  assert same_topic_rate(seen['train']) >= 0.8


def test_packed_sequences_hold_one_topic(topic_tasks):
  # Through the project's pipeline: seqio task, LM feature converter with packing, batches.
  def single_topic_rows(task_name):
    cfg = data.DatasetConfig(task_name, {'targets': 64}, batch_size=4, shuffle=True, seed=0, num_epochs=1)
    batches = data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False))
    rows = [row for batch in batches for row in batch['decoder_target_tokens']]
    # The topics whose letters a row holds (byte ids are 3 + the byte).
    topics = [{t for tok in row if tok >= 3 for t, a in enumerate(ALPHABETS) if chr(tok - 3) in a}
              for row in rows]
    assert len(rows) > 10 and all(topics)
    return np.mean([len(t) == 1 for t in topics])

  plain, similar = topic_tasks
  assert single_topic_rows(plain) < 0.2
  assert single_topic_rows(similar) >= 0.7


def test_similarity_task_resumes_exactly(topic_tasks, check_iterator_resumes):
  cfg = data.DatasetConfig(topic_tasks[1], {'targets': 16}, batch_size=2, seed=3)

  def fresh_process_iterator():
    lory_batching._ORDER_CACHE.clear()  # the order is rebuilt, as in a new process
    return data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False))
  check_iterator_resumes(fresh_process_iterator)


def test_registered_similarity_tasks():
  for prefix in ('stdlib', 'text_dir'):
    for suffix in ('', common.T5_VOCAB_SUFFIX):
      task = seqio.get_mixture_or_task(f'{prefix}_lm_similarity{suffix}')
      plain = seqio.get_mixture_or_task(f'{prefix}_lm{suffix}')
      # The plain task's files, each segment with its file's path: files are the documents.
      assert task.source._root is plain.source._root and task.source._path_key == pt.DOCUMENT_KEY
      assert task.output_features['targets'].vocabulary == plain.output_features['targets'].vocabulary
      assert task.preprocessors[0].func is lory_batching.order_by_similarity
      assert task.preprocessors[0].keywords['group_key'] == pt.DOCUMENT_KEY
  assert 'c4_lm_similarity' not in seqio.TaskRegistry.names()  # a global in-memory step: not for C4
  with pytest.raises(ValueError, match='must be an integer >= 1'):
    pt.register_similarity_lm_task('bad_k', pt.STDLIB_SOURCE, k=0)


def test_gin_similarity_batching_file(monkeypatch):
  import gin  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  try:
    gin_setup.parse_model_gin(['gin/runs/pretrain.gin', 'gin/models/st_moe_tiny.gin',
                               'gin/runs/decoder_only.gin', 'gin/routers/lory.gin',
                               'gin/runs/similarity_batching.gin'],
                              ['SIMILARITY_K = 0'], search_paths=[REPO])
    assert gin_setup.macro('TRAIN_MIXTURE_OR_TASK_NAME') == 'stdlib_lm_similarity'
    assert gin_setup.macro('MIXTURE_OR_TASK_NAME') == 'stdlib_lm'
    assert pt.similarity_k() == 0
    # The binding is read when a dataset is built, also by tasks registered before parsing.
    with pytest.raises(ValueError, match='must be an integer >= 1'):
      seqio.get_mixture_or_task('stdlib_lm_similarity').get_dataset({'targets': 32}, split='validation')
  finally:
    gin.clear_config()
