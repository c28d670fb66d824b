"""Cached decoding against recomputing the full sequence, beam-search scores, and the MoE decode rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import decoding, losses, models

CONFIG = models.TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                  num_encoder_layers=1, num_decoder_layers=2)
# Eval capacity factor = E: the full-sequence pass never drops either, so both passes route alike.
MOE = models.MoeConfig(num_sparse_layers=1, num_experts=4, expert_mlp_dim=20, extra_mlp=True,
                       eval_capacity_factor=4.0, min_expert_capacity=1)
LENGTH = 6
ENC = np.array([[3, 4, 5, 6, 0], [6, 7, 8, 0, 0], [9, 10, 11, 12, 13]], np.int32)


def _recompute_greedy(apply, prompt):
  """Greedy decoding by running the whole model on the prefix at every step (no cache)."""
  batch = prompt.shape[0]
  out = np.zeros((batch, LENGTH), np.int32)
  ended = np.zeros(batch, bool)
  for i in range(LENGTH):
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), out[:, :-1]], 1)
    targets = np.where(np.arange(LENGTH)[None] <= i, np.maximum(out, 1), 0)  # the prefix counts as real
    logits = np.asarray(apply(dec_in, targets))
    token = np.where(prompt[:, i] != 0, prompt[:, i], logits[:, i].argmax(-1))
    token = np.where(ended, 0, token)
    out[:, i] = token
    ended |= token == 1
  return out


def _sequence_logprob(apply, tokens):
  """Teacher-forced log-probability of each row of tokens [B, L] up to and including its EOS."""
  dec_in = np.concatenate([np.zeros((tokens.shape[0], 1), np.int32), tokens[:, :-1]], 1)
  log_probs = np.asarray(jax.nn.log_softmax(apply(dec_in, np.maximum(tokens, 1))))
  picked = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
  return (picked * (tokens > 0)).sum(-1), (tokens > 0).sum(-1)


@pytest.fixture(scope='module')
def encdec():
  model = models.EncoderDecoder(CONFIG, MOE, MOE)
  dec = jnp.zeros((3, LENGTH), jnp.int32)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ENC, dec, dec, enable_dropout=False))()['params']
  apply = jax.jit(lambda d_in, d_t: model.apply({'params': params}, ENC, d_in, d_t, enable_dropout=False))
  return model, params, apply


@pytest.fixture(scope='module')
def lm():
  model = models.DecoderOnly(CONFIG, MOE)
  dec = jnp.zeros((3, LENGTH), jnp.int32)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(1), dec, dec, enable_dropout=False))()['params']
  apply = jax.jit(lambda d_in, d_t: model.apply({'params': params}, d_in, d_t, enable_dropout=False))
  return model, params, apply


def test_encoder_decoder_greedy_equals_recompute(encdec):
  model, params, apply = encdec
  tokens, logprob = decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC)
  expected = _recompute_greedy(apply, np.zeros((3, LENGTH), np.int32))
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_allclose(logprob, _sequence_logprob(apply, expected)[0], rtol=1e-4, atol=1e-4)


def test_decoder_only_greedy_with_prompt_equals_recompute(lm):
  model, params, apply = lm
  prompt = np.array([[5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 9, 10, 0, 0, 0]], np.int32)
  tokens, _ = decoding.generate(model, params, max_decode_length=LENGTH, prompt=prompt)
  np.testing.assert_array_equal(tokens, _recompute_greedy(apply, prompt))
  np.testing.assert_array_equal(np.asarray(tokens)[prompt > 0], prompt[prompt > 0])


def test_top1_sampling_is_greedy_and_sampling_varies(encdec):
  model, params, apply = encdec
  greedy, _ = decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC)
  top1, _ = decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC,
                              method='sample', rng=jax.random.PRNGKey(5), topk=1)
  np.testing.assert_array_equal(top1, greedy)
  samples = [decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC,
                               method='sample', rng=jax.random.PRNGKey(s), temperature=2.0, topk=0)
             for s in range(3)]
  assert len({np.asarray(t).tobytes() for t, _ in samples}) > 1
  tokens, logprob = samples[0]
  np.testing.assert_allclose(logprob, _sequence_logprob(apply, np.asarray(tokens))[0], rtol=1e-4, atol=1e-4)


def test_beam_search_scores_are_sorted_and_exact(encdec):
  model, params, apply = encdec
  alpha = 0.6
  beams, scores = decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC,
                                    method='beam', beam_size=3, alpha=alpha)
  beams, scores = np.asarray(beams), np.asarray(scores)
  assert beams.shape == (3, 3, LENGTH) and scores.shape == (3, 3)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)
  logprob, length = _sequence_logprob(apply, beams[:, 0])
  np.testing.assert_allclose(scores[:, 0], logprob / decoding.length_penalty(length, alpha), rtol=1e-4,
                             atol=1e-4)
  greedy, greedy_logprob = decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC)
  greedy_len = (np.asarray(greedy) > 0).sum(-1)
  # The best beam scores at least as well as the greedy sequence.
  assert np.all(scores[:, 0] >= greedy_logprob / decoding.length_penalty(greedy_len, alpha) - 1e-4)


def test_moe_decode_step_never_drops_tokens():
  """Tiny capacities: a full pass drops tokens, a decode step of the same layer drops none."""
  moe = models.MoeConfig(num_sparse_layers=1, num_experts=2, num_selected_experts=2, extra_mlp=False,
                         eval_capacity_factor=0.1, min_expert_capacity=1, group_size=8)
  model = models.DecoderOnly(CONFIG, moe)
  batch = 8
  tokens = (jnp.arange(batch * LENGTH, dtype=jnp.int32).reshape(batch, LENGTH) % 30) + 2
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False))()['params']
  full = jax.jit(lambda: model.apply({'params': params}, tokens, tokens, enable_dropout=False,
                                     mutable=['intermediates'])[1])()
  assert float(losses.moe_metrics(full['intermediates'])['fraction_tokens_left_behind']) > 0
  cache = decoding.init_cache(model, batch, LENGTH)
  step = jax.jit(lambda cache, tok: model.apply({'params': params, 'cache': cache}, tok, None,
                                                enable_dropout=False, decode=True, max_decode_length=LENGTH,
                                                mutable=['cache', 'intermediates'])[1])
  for i in range(2):
    state = step(cache, tokens[:, i:i + 1])
    cache = state['cache']
    metrics = losses.moe_metrics(state['intermediates'])
    assert float(metrics['fraction_tokens_left_behind']) == 0.0


def test_prompt_positions_are_the_prefix_lm_inputs():
  """BOS and the leading forced tokens, as seqio's PrefixLM marks decoder_causal_attention; a forced token
  after a free position is not prompt, and a row without leading forced tokens has no prompt."""
  prompt = np.array([[5, 6, 0, 7, 0], [0, 4, 0, 0, 0], [3, 4, 5, 6, 7], [9, 0, 0, 0, 0]], np.int32)
  np.testing.assert_array_equal(decoding.prompt_positions(prompt),
                                [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])


def test_bad_arguments(encdec):
  model, params, _ = encdec
  with pytest.raises(ValueError, match='Unknown decoding method'):
    decoding.generate(model, params, max_decode_length=LENGTH, encoder_input_tokens=ENC, method='nucleus')
  with pytest.raises(ValueError, match='needs encoder_input_tokens'):
    decoding.generate(model, params, max_decode_length=LENGTH)
  with pytest.raises(ValueError, match='DecoderOnly needs a prompt'):
    decoding.generate(models.DecoderOnly(CONFIG, MOE), params, max_decode_length=LENGTH)
