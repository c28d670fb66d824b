"""Encoder-decoder and decoder-only transformers (T5 v1.1 / ST-MoE / Switch), with sparse MoE layers.

The architecture only decides where the sparse layers go (`sparse_layer_indices`) and wires them; the MoE
layer itself is `moe.MoeLayer` (or `lory.LoryMoeLayer`, MoeConfig.moe_type='lory'), which receives the
stack's `config.MoeConfig` as it is. With MoeConfig.router='recurrent' (RMoE) each stack owns one recurrent
cell shared by its MoE layers, and the per-token routing state flows through the stack's layers in depth
order (see `routers.RecurrentRouter`). Parameter names follow flaxformer (docs/design.md §3), e.g.
`encoder/layers_3/mlp/expert/wi_0/kernel`, `decoder/layers_1/extra_mlp/wo/kernel`, `token_embedder/embedding`.

Notation: B batch, L length (Le encoder, Ld decoder), H d_model, N heads, D head dim, V vocabulary.
Token id 0 is padding (t5x): the encoder padding mask is `encoder_input_tokens > 0`, the decoder's is
`decoder_target_tokens > 0`.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st_moe_jax import lory as lory_lib
from st_moe_jax import moe as moe_lib
from st_moe_jax import routers as routers_lib
from st_moe_jax.config import LAYOUTS, ConfigError, MoeConfig, TransformerConfig
from st_moe_jax.layers import (Dense, Embed, MlpBlock, MultiHeadDotProductAttention, RelativePositionBiases,
                               RMSNorm, combine_masks, make_attention_mask, make_causal_mask)

Array = jax.Array


def sparse_layer_indices(num_layers: int, num_sparse_layers: int, layout: str) -> tuple[int, ...]:
  """The 0-based indices of the sparse layers (docs/routing.md §8).

  BOTTOM: i < S.  TOP: i ≥ L − S.  MIDDLE: L − S ≤ 2i < L + S.  MIXED: every (L/S)-th layer, i.e.
  i % (L/S) == L/S − 1 (L = 12, S = 3 → 3, 7, 11); needs L % S == 0.

  Raises:
    ValueError for an unknown layout or a sparse count that does not fit the layers.
  """
  name = str(layout).upper()
  if name not in LAYOUTS:
    raise ConfigError(f'Unknown sparse layout {layout!r}; choose one of {LAYOUTS} '
                     f'(ENCODER_SPARSE_LAYOUT / DECODER_SPARSE_LAYOUT).')
  if not 0 <= num_sparse_layers <= num_layers:
    raise ConfigError(f'num_sparse_layers={num_sparse_layers} does not fit a stack of {num_layers} layers; '
                     f'set NUM_ENCODER_SPARSE_LAYERS / NUM_DECODER_SPARSE_LAYERS between 0 and {num_layers}.')
  s, n = num_sparse_layers, num_layers
  if s == 0:
    return ()
  if name == 'MIXED' and n % s:
    raise ConfigError(f'MIXED layout needs the layer count ({n}) to be a multiple of the sparse layer count '
                     f'({s}); choose a divisor of {n} or another layout (BOTTOM / MIDDLE / TOP).')
  rule = {
      'BOTTOM': lambda i: i < s,
      'TOP': lambda i: i >= n - s,
      'MIDDLE': lambda i: n - s <= 2 * i < n + s,
      'MIXED': lambda i: i % (n // s) == n // s - 1,
  }[name]
  return tuple(i for i in range(n) if rule(i))


def check_causal_moe(moe: Optional[MoeConfig], field: str) -> None:
  """BPR and experts-choose rank a group's tokens using later tokens: they leak the future in a decoder."""
  if moe is None or moe.num_sparse_layers == 0:
    return
  if moe.routing_method not in ('tokens_choose', 'sparsemixer'):
    raise ConfigError(f'{field}.routing_method={moe.routing_method!r} looks at future tokens, which a causal '
                     f'decoder must not see; use routing_method="tokens_choose" or "sparsemixer" in the '
                     f'decoder.')
  if moe.batch_prioritized_routing:
    raise ConfigError(f'{field}.batch_prioritized_routing=True orders tokens by router confidence over the '
                     f'whole group, leaking future tokens in a causal decoder; set it to False for the '
                     f'decoder (keep it for the encoder only).')


def check_lory_stack(moe: Optional[MoeConfig], field: str) -> None:
  """Lory's segments route the *next* segment: it only makes sense in a causal (decoder) stack."""
  if moe is not None and moe.num_sparse_layers and moe.moe_type == 'lory':
    raise ConfigError(f'{field}.moe_type="lory" routes each segment on the previous one, which only makes '
                     f'sense in a causal decoder; use moe_type="sparse" for {field}.')


def _check_stack(moe: Optional[MoeConfig], num_layers: int, field: str) -> tuple[int, ...]:
  if moe is None:
    return ()
  try:
    return sparse_layer_indices(num_layers, moe.num_sparse_layers, moe.sparse_layout)
  except ValueError as e:
    raise ConfigError(f'{field}: {e}') from None


# ---------------------------------------------------------------------------------------------------------
# Layers and stacks.

class TransformerLayer(nn.Module):
  """One pre-norm layer: self-attention, optional cross-attention, FFN (dense or MoE), optional extra FFN.

  Sublayers: x + dropout(sublayer(RMSNorm(x))). The MoE layer is named `mlp` like the dense FFN, so a
  sparse layer's params read `layers_i/mlp/expert/...` and `layers_i/mlp/router/...`. With the recurrent
  router (RMoE) the layer's projections are `layers_i/router/{input,output}_projection/kernel` and the
  shared cell lives in the stack (`<stack>/router/...`).

  Attributes:
    config: shapes.
    moe: the stack's MoE config; used only if `sparse`.
    sparse: this layer's FFN is an MoE layer.
    causal: decoder self-attention (names it `self_attention`); an encoder layer names it `attention`.
    cross_attention: has an `encoder_decoder_attention` sublayer.
    router_cell: the stack's shared `routers.RecurrentRouterCell` when moe.router == 'recurrent'.
  """
  config: TransformerConfig
  moe: Optional[MoeConfig] = None
  sparse: bool = False
  causal: bool = False
  cross_attention: bool = False
  router_cell: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array], bias: Optional[Array], padding_mask: Optional[Array],
               encoded: Optional[Array] = None, cross_mask: Optional[Array] = None, *,
               router_state: Optional[Array] = None, prompt_mask: Optional[Array] = None,
               enable_dropout: bool = False, decode: bool = False) -> tuple[Array, Optional[Array]]:
    """x: <dtype>[B, L, H]; mask [B|1, 1, L, L]; bias [B|1, N, L, L]; padding_mask [B, L] or None;
    encoded [B, Le, H]; cross_mask [B, 1, L, Le]; router_state <float32>[B, L, p] (RMoE, from the previous
    MoE layer; None before the first); prompt_mask [B, L] (Lory's prompt routing at inference).

    Returns:
      (<dtype>[B, L, H], the routing state for the next layer: updated by a recurrent-router MoE layer,
      passed through unchanged by any other layer).
    """
    cfg = self.config
    attention = lambda name: MultiHeadDotProductAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate,
                                                          cfg.dtype, name=name)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not enable_dropout)
    norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name=name)
    prefix = 'self_' if self.causal else ''

    h = norm(f'pre_{prefix}attention_layer_norm')(x)
    h = attention(f'{prefix}attention')(h, h, mask, bias, enable_dropout=enable_dropout, decode=decode)
    x = x + dropout(h)
    if self.cross_attention:
      h = norm('pre_cross_attention_layer_norm')(x)
      h = attention('encoder_decoder_attention')(h, encoded, cross_mask, enable_dropout=enable_dropout)
      x = x + dropout(h)

    h = norm('pre_mlp_layer_norm')(x)
    if self.sparse:
      moe = self.moe.with_model_defaults(cfg.mlp_dim, cfg.activations)
      if moe.moe_type == 'lory':
        h = lory_lib.LoryMoeLayer(moe, cfg.dtype, name='mlp')(
            h, padding_mask, prompt_mask=prompt_mask, enable_dropout=enable_dropout, decode=decode)
      else:
        logits = None
        if moe.router == 'recurrent':
          logits, router_state = routers_lib.RecurrentRouter(
              moe.num_experts, self.router_cell, moe.jitter_noise, moe.recurrent_router_state,
              name='router')(h, router_state, apply_jitter=enable_dropout)  # [B, L, E], [B, L, p]
        h = moe_lib.MoeLayer(moe, cfg.dtype, name='mlp')(
            h, padding_mask, enable_dropout=enable_dropout, decode=decode, router_logits=logits)
    else:
      h = MlpBlock(cfg.mlp_dim, cfg.activations, cfg.dropout_rate, cfg.dtype, name='mlp')(
          h, enable_dropout=enable_dropout)
    x = x + dropout(h)
    if self.sparse and self.moe.extra_mlp:
      h = norm('pre_extra_mlp_layer_norm')(x)
      h = MlpBlock(cfg.mlp_dim, cfg.activations, cfg.dropout_rate, cfg.dtype, name='extra_mlp')(
          h, enable_dropout=enable_dropout)
      x = x + dropout(h)
    return x, router_state


def _router_cell(moe: Optional[MoeConfig], sparse: set[int]) -> Optional[nn.Module]:
  """The stack's shared RMoE cell (named `router`), or None. Call inside the stack's compact __call__."""
  if moe is None or not sparse or moe.router != 'recurrent' or moe.moe_type != 'sparse':
    return None
  return routers_lib.RecurrentRouterCell(moe.recurrent_router_dim, moe.recurrent_router_cell, name='router')


def _positions(positions: Optional[Array], length: int) -> Array:
  """[B, L] given positions, else [1, L] arange (the relative bias depends only on key − query)."""
  return jnp.arange(length)[None] if positions is None else positions


class Encoder(nn.Module):
  """Embedding, bidirectional pre-norm layers, final RMSNorm (`encoder_norm`)."""
  config: TransformerConfig
  moe: Optional[MoeConfig]
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
               *, enable_dropout: bool = False) -> Array:
    """tokens: <int>[B, Le] -> <dtype>[B, Le, H]."""
    cfg = self.config
    sparse = set(_check_stack(self.moe, cfg.num_encoder_layers, 'encoder_moe'))
    real = tokens > 0
    mask = make_attention_mask(real, real)
    if segment_ids is not None:
      mask = combine_masks(mask, make_attention_mask(segment_ids, segment_ids, jnp.equal))
    pos = _positions(positions, tokens.shape[1])
    bias = RelativePositionBiases(cfg.num_heads, cfg.relpos_num_buckets, cfg.relpos_max_distance, cfg.dtype,
                                  name='relpos_bias')(pos, pos, bidirectional=True)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not enable_dropout)
    x = dropout(self.shared_embedding(tokens))
    cell, state = _router_cell(self.moe, sparse), None  # the RMoE state starts at the first MoE layer
    for i in range(cfg.num_encoder_layers):
      x, state = TransformerLayer(cfg, self.moe, i in sparse, router_cell=cell, name=f'layers_{i}')(
          x, mask, bias, real, router_state=state, enable_dropout=enable_dropout)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='encoder_norm')(x)
    return dropout(x)


class Decoder(nn.Module):
  """Embedding, causal pre-norm layers (with cross-attention when there is an encoder), norm, logits.

  In decode mode after the cache exists, each call takes one token per sequence: the stack keeps its own
  position counter in the 'cache' collection (`decode_position`) for the relative position bias.
  """
  config: TransformerConfig
  moe: Optional[MoeConfig]
  shared_embedding: nn.Module
  cross_attention: bool = True

  @nn.compact
  def __call__(self, encoded: Optional[Array], encoder_tokens: Optional[Array], decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array], encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None, decoder_positions: Optional[Array] = None,
               decoder_causal_attention: Optional[Array] = None, *, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Returns <float32>[B, Ld, V] logits."""
    cfg = self.config
    sparse = set(_check_stack(self.moe, cfg.num_decoder_layers, 'decoder_moe'))
    batch, length = decoder_input_tokens.shape
    relpos = RelativePositionBiases(cfg.num_heads, cfg.relpos_num_buckets, cfg.relpos_max_distance,
                                    cfg.dtype, name='relpos_bias')

    step = decode and self.has_variable('cache', 'decode_position')
    if decode:
      position = self.variable('cache', 'decode_position', lambda: jnp.zeros((), jnp.int32))
    if step:
      if max_decode_length is None:
        raise ValueError('decode=True with an initialised cache needs max_decode_length (the cache length).')
      # One query at the counter's position against all cache slots; the attention masks unwritten ones.
      bias = relpos(position.value[None, None], jnp.arange(max_decode_length)[None], bidirectional=False)
      position.value += 1
      mask, padding_mask = None, None  # every token of a decode step is routed
      cross_real = jnp.ones((batch, length), bool)
    else:
      real = (decoder_target_tokens if decoder_target_tokens is not None else decoder_input_tokens) > 0
      causal = make_causal_mask(decoder_input_tokens)
      if decoder_causal_attention is not None:  # prefix LM: the inputs part attends bidirectionally
        prefix = decoder_causal_attention > 0
        causal = jnp.logical_or(causal, make_attention_mask(prefix, prefix))
      mask = combine_masks(causal, make_attention_mask(real, real))
      if decoder_segment_ids is not None:
        mask = combine_masks(mask, make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal))
      pos = _positions(decoder_positions, length)
      bias = relpos(pos, pos, bidirectional=False)
      padding_mask = real
      cross_real = real

    cross_mask = None
    if self.cross_attention:
      cross_mask = make_attention_mask(cross_real, encoder_tokens > 0)
      if decoder_segment_ids is not None and encoder_segment_ids is not None and not step:
        cross_mask = combine_masks(
            cross_mask, make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal))

    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not enable_dropout)
    x = dropout(self.shared_embedding(decoder_input_tokens))
    cell, state = _router_cell(self.moe, sparse), None  # the RMoE state starts at the first MoE layer
    for i in range(cfg.num_decoder_layers):
      x, state = TransformerLayer(cfg, self.moe, i in sparse, causal=True, cross_attention=self.cross_attention,
                                  router_cell=cell, name=f'layers_{i}')(
          x, mask, bias, padding_mask, encoded, cross_mask, router_state=state,
          prompt_mask=decoder_causal_attention, enable_dropout=enable_dropout, decode=decode)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='decoder_norm')(x)
    x = dropout(x)
    if cfg.logits_via_embedding:
      # t5x / Mesh TF scale tied logits by 1/√H (the embedding is Normal(0, 1)).
      logits = self.shared_embedding.attend(x) / jnp.sqrt(x.shape[-1]).astype(x.dtype)
    else:
      logits = Dense(cfg.vocab_size, ('embed', 'vocab'), cfg.dtype, name='logits_dense')(x)
    return logits.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Models.

class EncoderDecoder(nn.Module):
  """T5 v1.1 / ST-MoE / Switch encoder-decoder.

  Attributes:
    config: dense shapes.
    encoder_moe / decoder_moe: sparse layers of each stack (None or num_sparse_layers=0: dense).
  """
  config: TransformerConfig = TransformerConfig()
  encoder_moe: Optional[MoeConfig] = None
  decoder_moe: Optional[MoeConfig] = None

  def __post_init__(self):
    # Refuse bad layouts and leaky decoder routing when the model is built, not deep inside a trace.
    _check_stack(self.encoder_moe, self.config.num_encoder_layers, 'encoder_moe')
    _check_stack(self.decoder_moe, self.config.num_decoder_layers, 'decoder_moe')
    check_lory_stack(self.encoder_moe, 'encoder_moe')
    check_causal_moe(self.decoder_moe, 'decoder_moe')
    super().__post_init__()

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.embed_dim, cfg.dtype)
    self.encoder = Encoder(cfg, self.encoder_moe, self.token_embedder)
    self.decoder = Decoder(cfg, self.decoder_moe, self.token_embedder, cross_attention=True)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None, *, enable_dropout: bool = True) -> Array:
    """<int>[B, Le] -> <dtype>[B, Le, H]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        enable_dropout=enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array], encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None, decoder_positions: Optional[Array] = None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None) -> Array:
    """Decoder given the encoder output: <float32>[B, Ld, V] logits."""
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                        encoder_segment_ids, decoder_segment_ids, decoder_positions,
                        enable_dropout=enable_dropout, decode=decode, max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None, encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Teacher-forced logits.

    Args:
      encoder_input_tokens: <int>[B, Le], 0 = padding.
      decoder_input_tokens: <int>[B, Ld] (targets shifted right, 0 = BOS).
      decoder_target_tokens: <int>[B, Ld], 0 = padding.
      *_segment_ids: <int>[B, L] packed-segment ids; attention stays within a segment.
      *_positions: <int>[B, L] positions within a segment, for the relative position bias.
      enable_dropout: training mode.
      decode: incremental decoding with the KV cache (see `decoding.py`).
      max_decode_length: the cache length, needed at decode steps.

    Returns:
      <float32>[B, Ld, V] logits.
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode, max_decode_length=max_decode_length)


class DecoderOnly(nn.Module):
  """Decoder-only language model (causal, or prefix LM via decoder_causal_attention).

  Uses config.num_decoder_layers.

  Attributes:
    config: dense shapes.
    moe: sparse layers (tokens-choose without BPR only).
  """
  config: TransformerConfig = TransformerConfig()
  moe: Optional[MoeConfig] = None

  def __post_init__(self):
    _check_stack(self.moe, self.config.num_decoder_layers, 'moe')
    check_causal_moe(self.moe, 'moe')
    super().__post_init__()

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.embed_dim, cfg.dtype)
    self.decoder = Decoder(cfg, self.moe, self.token_embedder, cross_attention=False)

  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Optional[Array],
               decoder_segment_ids: Optional[Array] = None, decoder_positions: Optional[Array] = None,
               decoder_causal_attention: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Teacher-forced logits <float32>[B, L, V] (argument meanings as in EncoderDecoder).

    decoder_causal_attention: optional <int>[B, L], 1 on the prefix (inputs) positions, which then attend
      to each other bidirectionally (t5x's PrefixLM). Incremental decoding treats the prefix causally.
      Lory layers with lory_inference_routing='prompt' also route on the mean of these positions when not
      training; at decode steps pass it as [B, 1] (1 while the fed token belongs to the prompt) for the
      same, otherwise decode steps route by segments.
    """
    return self.decoder(None, None, decoder_input_tokens, decoder_target_tokens, None, decoder_segment_ids,
                        decoder_positions, decoder_causal_attention, enable_dropout=enable_dropout,
                        decode=decode, max_decode_length=max_decode_length)
