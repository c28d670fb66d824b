"""Incremental decoding with a key/value cache: greedy, temperature / top-k sampling, beam search.

The search functions are model-agnostic, as in t5x: they take `tokens_to_logits(tokens [B, 1], cache) ->
(logits [B, V], cache)`. `generate` wires them to an `EncoderDecoder` or `DecoderOnly` and is jit-compiled.

Token conventions (t5x): 0 is padding and the decoder's BOS (decoder inputs are the targets shifted right),
`eos_id` (1) ends a sequence; positions after it are 0. A `prompt` [B, L] forces its non-zero tokens at
their positions (a decoder-only model's prefix); the search fills the zeros.

MoE layers at decode time (rule): every decode step routes the batch's current tokens with the eval
capacity factor, grouped as MoeLayer groups them, with the expert capacity raised to at least the tokens
per group, so no token of the step is ever dropped (see `models.TransformerLayer._moe_layer`). Because
tokens-choose routing without BPR is then a per-token decision, cached decoding gives the same tokens as
recomputing the full sequence whenever the full pass does not drop tokens either (eval capacity factor
≥ E / k guarantees that; with smaller factors, a full-sequence pass may drop tokens that decoding keeps).

Lory layers at decode time (rule): a decoder-only model is told which fed tokens are its prompt
(`prompt_positions`, the decoder_causal_attention of seqio's PrefixLM), so Lory layers with
lory_inference_routing='prompt' route every generated token on the mean of the whole prompt, as the paper
does; a prompt token is routed on the prompt fed so far, since decoding feeds one token at a time. Rows
without a prompt route by segments, as in training. Attention stays causal over the prompt. Generation
therefore equals recomputing with causal attention and each position routed on the prompt up to it
(tests/test_lory.py); a full pass given decoder_causal_attention differs on two counts: the prompt attends
bidirectionally (prefix LM), and prompt tokens route on the whole prompt.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st_moe_jax import models

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]

NEG_INF = -1.0e7  # finite "minus infinity" for log-probabilities: sums stay finite, never NaN
METHODS = ('greedy', 'sample', 'beam')


# ---------------------------------------------------------------------------------------------------------
# Model-agnostic searches.

def _previous_token(tokens: Array, i: Array) -> Array:
  """Decoder input at step i: the output at i − 1, or BOS (0) at i = 0. tokens [..., L] -> [...]."""
  prev = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(i - 1, 0), axis=-1, keepdims=False)
  return jnp.where(i == 0, 0, prev)


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Cache, prompt: Array,
                       rng: Optional[Array] = None, *, temperature: float = 1.0, topk: int = 0,
                       eos_id: int = 1) -> tuple[Array, Array]:
  """Samples (or, with temperature 0, greedily decodes) one sequence per row.

  Args:
    tokens_to_logits: one decode step.
    cache: the initial (empty) cache for B rows.
    prompt: <int>[B, L]; non-zero entries are forced, L is the decode length.
    rng: PRNG key (unused when temperature is 0).
    temperature: softmax temperature; 0 means greedy (argmax).
    topk: sample among the k most likely tokens only (0: all).
    eos_id: ends a row; later positions are 0.

  Returns:
    tokens <int32>[B, L] and log-probabilities <float32>[B] of the generated (not forced) tokens.
  """
  batch, length = prompt.shape
  if rng is None:
    rng = jax.random.PRNGKey(0)
  greedy = temperature == 0

  def cond(state):
    i, _, _, ended, _, _ = state
    return (i < length) & ~jnp.all(ended)

  def body(state):
    i, tokens, cache, ended, rng, logprob = state
    logits, cache = tokens_to_logits(_previous_token(tokens, i)[:, None], cache)  # [B, V]
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    if greedy:
      next_token = jnp.argmax(logits, axis=-1)
    else:
      rng, step_rng = jax.random.split(rng)
      scaled = logits / temperature
      if topk:
        kth = jax.lax.top_k(scaled, topk)[0][:, -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
      next_token = jax.random.categorical(step_rng, scaled)
    forced = prompt[:, i]
    is_forced = forced != 0
    next_token = jnp.where(is_forced, forced, next_token).astype(jnp.int32)
    next_token = jnp.where(ended, 0, next_token)
    chosen = jnp.take_along_axis(log_probs, next_token[:, None], axis=-1)[:, 0]
    logprob = logprob + jnp.where(ended | is_forced, 0.0, chosen)
    tokens = tokens.at[:, i].set(next_token)
    ended = ended | (next_token == eos_id)
    return i + 1, tokens, cache, ended, rng, logprob

  init = (jnp.zeros((), jnp.int32), jnp.zeros((batch, length), jnp.int32), cache,
          jnp.zeros((batch,), bool), rng, jnp.zeros((batch,), jnp.float32))
  _, tokens, _, _, _, logprob = jax.lax.while_loop(cond, body, init)
  return tokens, logprob


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT's ((5 + length) / 6)^alpha (t5x's brevity penalty)."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree: Any, beam_index: Array, batch: int, beams: int) -> Any:
  """Reorders every [B·K, ...] leaf by beam_index [B, K']; scalars (cache indices) are left alone."""
  def gather(x):
    if x.ndim == 0:
      return x
    x = x.reshape((batch, beams) + x.shape[1:])
    idx = beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2))
    x = jnp.take_along_axis(x, idx, axis=1)
    return x.reshape((batch * beam_index.shape[1],) + x.shape[2:])
  return jax.tree_util.tree_map(gather, tree)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, prompt: Array, *, beam_size: int,
                alpha: float = 0.6, eos_id: int = 1) -> tuple[Array, Array]:
  """Beam search with a length penalty.

  Args:
    tokens_to_logits: one decode step over B·K rows.
    cache: the initial cache for B·K rows (row b·K + k is beam k of example b).
    prompt: <int>[B, L]; non-zero entries are forced (their log-probability is not scored).
    beam_size: K.
    alpha: length penalty exponent.
    eos_id: ends a hypothesis.

  Returns:
    tokens <int32>[B, K, L] best first, and their scores <float32>[B, K] (log-probability divided by the
    length penalty). Hypotheses without EOS at length L are scored at length L.
  """
  batch, length = prompt.shape
  k = beam_size
  max_penalty = length_penalty(jnp.float32(length), alpha)

  def cond(state):
    i, _, alive_logp, _, finished_scores, finished, _ = state
    # Stop when no alive beam can beat the worst finished one (log-probabilities only decrease).
    best_possible = alive_logp[:, 0] / max_penalty
    worst_finished = jnp.where(finished, finished_scores, NEG_INF).min(axis=1)
    done = jnp.all(finished, axis=1) & (worst_finished >= best_possible)
    return (i < length) & ~jnp.all(done)

  def body(state):
    i, alive_seqs, alive_logp, finished_seqs, finished_scores, finished, cache = state
    prev = _previous_token(alive_seqs, i).reshape(batch * k, 1)
    logits, cache = tokens_to_logits(prev, cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)  # [B, K, V]
    vocab = log_probs.shape[-1]
    forced = prompt[:, i]
    forced_logp = jnp.where(jnp.arange(vocab)[None, :] == forced[:, None], 0.0, NEG_INF)  # [B, V]
    log_probs = jnp.where((forced != 0)[:, None, None], forced_logp[:, None, :], log_probs)

    candidates = (alive_logp[:, :, None] + log_probs).reshape(batch, k * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * k)  # [B, 2K]
    top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(alive_seqs, top_beam[:, :, None], axis=1)
    top_seqs = top_seqs.at[:, :, i].set(top_token)  # [B, 2K, L]
    is_eos = (top_token == eos_id) & (forced[:, None] == 0)

    # Alive: the best K candidates that did not just end.
    alive_score = jnp.where(is_eos, NEG_INF, top_logp)
    alive_logp, keep = jax.lax.top_k(alive_score, k)
    alive_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(top_beam, keep, axis=1), batch, k)

    # Finished: merge the new EOS hypotheses with the old ones, keep the best K.
    new_scores = jnp.where(is_eos, top_logp / length_penalty((i + 1).astype(jnp.float32), alpha), NEG_INF)
    all_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    all_flags = jnp.concatenate([finished, is_eos], axis=1)
    all_seqs = jnp.concatenate([finished_seqs, top_seqs], axis=1)
    finished_scores, keep = jax.lax.top_k(jnp.where(all_flags, all_scores, NEG_INF), k)
    finished = jnp.take_along_axis(all_flags, keep, axis=1)
    finished_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
    return i + 1, alive_seqs, alive_logp, finished_seqs, finished_scores, finished, cache

  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  init = (jnp.zeros((), jnp.int32), jnp.zeros((batch, k, length), jnp.int32), alive_logp,
          jnp.zeros((batch, k, length), jnp.int32), jnp.full((batch, k), NEG_INF, jnp.float32),
          jnp.zeros((batch, k), bool), cache)
  _, alive_seqs, alive_logp, finished_seqs, finished_scores, finished, _ = jax.lax.while_loop(
      cond, body, init)
  # Hypotheses still alive at the end compete at their full length.
  scores = jnp.concatenate([jnp.where(finished, finished_scores, NEG_INF), alive_logp / max_penalty], 1)
  scores, keep = jax.lax.top_k(scores, k)
  seqs = jnp.take_along_axis(jnp.concatenate([finished_seqs, alive_seqs], axis=1), keep[:, :, None], 1)
  return seqs, scores


# ---------------------------------------------------------------------------------------------------------
# Wiring to the models.

def init_cache(model: nn.Module, batch_size: int, max_decode_length: int,
               encoder_length: Optional[int] = None) -> Cache:
  """An empty decoding cache (zeros) for batch_size rows, without materialising any parameter."""
  dec = jnp.ones((batch_size, max_decode_length), jnp.int32)
  if isinstance(model, models.EncoderDecoder):
    enc = jnp.ones((batch_size, encoder_length or 1), jnp.int32)
    init = lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec, enable_dropout=False, decode=True)
  else:
    init = lambda: model.init(jax.random.PRNGKey(0), dec, dec, enable_dropout=False, decode=True)
  shapes = jax.eval_shape(init)['cache']
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prompt_positions(prompt: Array) -> Array:
  """Which decoder inputs are the prompt: <int32>[B, L] from the forced tokens prompt <int>[B, L].

  A row's prompt is its leading run of forced (non-zero) tokens, of length P. Decoder inputs are the
  outputs shifted right behind BOS, so the prompt covers inputs 0..P (BOS and the P tokens): seqio's
  PrefixLM `decoder_causal_attention` (inputs plus one). A row that forces no leading token has no prompt
  (all zeros). Forced tokens after a free position are forced, not prompt.
  """
  length = jnp.sum(jnp.cumprod(prompt != 0, axis=1), axis=1)  # P [B]
  positions = jnp.arange(prompt.shape[1])[None]
  return ((positions <= length[:, None]) & (length[:, None] > 0)).astype(jnp.int32)


def _repeat_rows(x: Array, n: int) -> Array:
  """[B, ...] -> [B·n, ...], row b repeated n times (beam k of example b is row b·n + k)."""
  return x if n == 1 else jnp.repeat(x, n, axis=0)


@functools.partial(jax.jit, static_argnames=('model', 'max_decode_length', 'method', 'temperature', 'topk',
                                             'beam_size', 'alpha', 'eos_id'))
def generate(model: nn.Module, params: Any, *, max_decode_length: int,
             encoder_input_tokens: Optional[Array] = None, prompt: Optional[Array] = None,
             method: str = 'greedy', rng: Optional[Array] = None, temperature: float = 1.0, topk: int = 0,
             beam_size: int = 4, alpha: float = 0.6, eos_id: int = 1) -> tuple[Array, Array]:
  """Decodes with the KV cache (jit-compiled; the model and search settings are static).

  Args:
    model: an `EncoderDecoder` (needs encoder_input_tokens [B, Le]) or a `DecoderOnly`.
    params: the model's params.
    max_decode_length: L, the number of decoder positions.
    encoder_input_tokens: <int>[B, Le] for encoder-decoders.
    prompt: optional <int>[B, L] forced tokens (0 = free); decoder-only prompts go here. For a decoder-only
      model the leading forced tokens are also its prompt for Lory's prompt routing (`prompt_positions`).
    method: 'greedy', 'sample' (temperature / topk) or 'beam' (beam_size, alpha).
    rng: sampling key.

  Returns:
    greedy / sample: tokens <int32>[B, L], log-probabilities <float32>[B].
    beam: tokens <int32>[B, K, L] best first, scores <float32>[B, K].
  """
  if method not in METHODS:
    raise ValueError(f'Unknown decoding method {method!r}; choose one of {METHODS}.')
  encoder_decoder = isinstance(model, models.EncoderDecoder)
  if encoder_decoder and encoder_input_tokens is None:
    raise ValueError('An EncoderDecoder needs encoder_input_tokens to decode.')
  if not encoder_decoder and prompt is None:
    raise ValueError('A DecoderOnly needs a prompt <int>[batch, max_decode_length] (zeros: no prompt).')
  batch = encoder_input_tokens.shape[0] if encoder_decoder else prompt.shape[0]
  if prompt is None:
    prompt = jnp.zeros((batch, max_decode_length), jnp.int32)
  if prompt.shape != (batch, max_decode_length):
    raise ValueError(f'prompt has shape {prompt.shape}; expected [batch, max_decode_length] = '
                     f'{(batch, max_decode_length)}.')
  rows = beam_size if method == 'beam' else 1

  encoded = None
  if encoder_decoder:
    encoded = model.apply({'params': params}, encoder_input_tokens, enable_dropout=False,
                          method=models.EncoderDecoder.encode)
    encoded, encoder_input_tokens = _repeat_rows(encoded, rows), _repeat_rows(encoder_input_tokens, rows)
  else:
    prompt_mask = _repeat_rows(prompt_positions(prompt), rows)  # [B·rows, L]
  # The searches see one cache; it carries the step next to the model's cache, so that a decoder-only
  # model learns whether the token it is fed belongs to the prompt.
  cache = {'model': init_cache(model, batch * rows, max_decode_length,
                               encoder_input_tokens.shape[1] if encoder_decoder else None),
           'step': jnp.zeros((), jnp.int32)}

  def tokens_to_logits(tokens, cache):
    variables = {'params': params, 'cache': cache['model']}
    if encoder_decoder:
      logits, state = model.apply(variables, encoded, encoder_input_tokens, tokens, None,
                                  enable_dropout=False, decode=True, max_decode_length=max_decode_length,
                                  method=models.EncoderDecoder.decode, mutable=['cache'])
    else:
      fed_prompt = jax.lax.dynamic_slice_in_dim(prompt_mask, cache['step'], 1, axis=1)  # [B·rows, 1]
      logits, state = model.apply(variables, tokens, None, decoder_causal_attention=fed_prompt,
                                  enable_dropout=False, decode=True, max_decode_length=max_decode_length,
                                  mutable=['cache'])
    return logits[:, -1], {'model': state['cache'], 'step': cache['step'] + 1}

  if method == 'beam':
    return beam_search(tokens_to_logits, cache, prompt, beam_size=beam_size, alpha=alpha, eos_id=eos_id)
  return temperature_sample(tokens_to_logits, cache, prompt, rng,
                            temperature=0.0 if method == 'greedy' else temperature, topk=topk,
                            eos_id=eos_id)
