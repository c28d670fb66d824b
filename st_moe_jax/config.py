"""The model's two configs: dense shapes (`TransformerConfig`) and one stack's MoE layers (`MoeConfig`).

One path for every setting: gin binds these dataclasses (as `models.TransformerConfig` /
`[encoder/|decoder/]models.MoeConfig`, see gin/models/moe_architecture.gin), the models hand the MoeConfig
unchanged to the layers (`moe.MoeLayer`, `lory.LoryMoeLayer`, `routers.RecurrentRouter`), and every value
is checked once, here, when the config is made. Layers do not re-validate.
"""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from st_moe_jax.dispatch import DISPATCH_METHODS, GROUPED_MATMUL_METHODS
from st_moe_jax.layers import ACTIVATIONS
from st_moe_jax.routers import RECURRENT_CELLS, RECURRENT_STATE_MODES

class ConfigError(ValueError):
  """A model setting that cannot work, raised when the config (or the model built from it) is made."""


LAYOUTS = ('BOTTOM', 'MIDDLE', 'MIXED', 'TOP')
ROUTING_METHODS = ('tokens_choose', 'experts_choose', 'sparsemixer')
ROUTERS = ('linear', 'recurrent')
MOE_TYPES = ('sparse', 'lory')
LORY_FIRST_SEGMENT_MODES = ('uniform', 'self_stopgrad')
LORY_INFERENCE_ROUTING_MODES = ('prompt', 'segment')

# Settings that only the routed ('sparse') layer reads. A Lory layer merges every expert for a whole
# segment, so setting any of them away from its default with moe_type='lory' is a mistake, not a no-op.
LORY_IGNORED_FIELDS = ('routing_method', 'num_selected_experts', 'batch_prioritized_routing', 'jitter_noise',
                       'train_capacity_factor', 'eval_capacity_factor', 'min_expert_capacity',
                       'expert_capacity', 'dropless')


# The gin macros of gin/models/moe_architecture.gin that set a field, named in its errors.
MACROS = {'sparse_layout': 'ENCODER_SPARSE_LAYOUT / DECODER_SPARSE_LAYOUT', 'moe_type': 'MOE_TYPE',
          'router': 'ROUTER', 'routing_method': 'ENCODER_ROUTING_METHOD', 'dispatch_method': 'DISPATCH_METHOD',
          'grouped_matmul_method': 'GROUPED_MATMUL_METHOD', 'recurrent_router_cell': 'RECURRENT_ROUTER_CELL',
          'recurrent_router_state': 'RECURRENT_ROUTER_STATE', 'lory_first_segment': 'LORY_FIRST_SEGMENT',
          'lory_inference_routing': 'LORY_INFERENCE_ROUTING', 'vocab_size': 'NUM_EMBEDDINGS',
          'embed_dim': 'EMBED_DIM', 'num_heads': 'NUM_HEADS', 'head_dim': 'HEAD_DIM', 'mlp_dim': 'MLP_DIM',
          'num_encoder_layers': 'NUM_ENCODER_LAYERS', 'num_decoder_layers': 'NUM_DECODER_LAYERS',
          'dropout_rate': 'DROPOUT_RATE', 'num_experts': 'NUM_EXPERTS', 'expert_mlp_dim': 'EXPERT_MLP_DIM',
          'num_selected_experts': 'NUM_SELECTED_EXPERTS', 'min_expert_capacity': 'MIN_EXPERT_CAPACITY',
          'group_size': 'GROUP_SIZE', 'num_expert_replicas': 'NUM_EXPERT_REPLICAS',
          'dropless_tile_size': 'DROPLESS_TILE_SIZE',
          'train_capacity_factor': 'TRAIN_EXPERT_CAPACITY_FACTOR',
          'eval_capacity_factor': 'EVAL_EXPERT_CAPACITY_FACTOR', 'jitter_noise': 'JITTER_NOISE',
          'expert_dropout_rate': 'EXPERT_DROPOUT_RATE',
          'renormalize_combine_weights': 'RENORMALIZE_COMBINE_WEIGHTS',
          'num_sparse_layers': 'NUM_ENCODER_SPARSE_LAYERS / NUM_DECODER_SPARSE_LAYERS'}


def _gin(name: str) -> str:
  return f' (gin: {MACROS[name]})' if name in MACROS else ''


def _check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise ConfigError(f'{owner}.{name} must be one of {allowed}, got {value!r}{_gin(name)}.')


def _check_activations(owner: str, name: str, activations: tuple[str, ...]) -> None:
  if not activations:
    raise ConfigError(f'{owner}.{name} must name at least one activation, e.g. ("gelu", "linear").')
  for act in activations:
    if act not in ACTIVATIONS:
      raise ConfigError(f'{owner}.{name}: unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}.')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Dense shapes and options shared by both model kinds (t5x macros in brackets).

  Attributes:
    vocab_size: V [NUM_EMBEDDINGS].
    embed_dim: H [EMBED_DIM].
    num_heads: N [NUM_HEADS].
    head_dim: D [HEAD_DIM].
    mlp_dim: F of the dense FFNs [MLP_DIM].
    num_encoder_layers / num_decoder_layers [NUM_ENCODER_LAYERS / NUM_DECODER_LAYERS].
    activations: ('gelu', 'linear') = GEGLU (T5 1.1, ST-MoE) or ('relu',) (T5 1.0, Switch) [ACTIVATIONS].
    dropout_rate: residual, embedding and attention dropout [DROPOUT_RATE].
    logits_via_embedding: tied output logits (scaled by 1/√H as t5x does) instead of `logits_dense`.
    dtype: activation dtype [ACTIVATION_DTYPE]; parameters stay float32.
    relpos_num_buckets / relpos_max_distance: T5 relative position bias (32 / 128).
    layer_norm_epsilon: RMSNorm epsilon.
  """
  vocab_size: int = 32128
  embed_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 2048
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  activations: tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  dtype: Any = 'float32'
  relpos_num_buckets: int = 32
  relpos_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, 'activations', tuple(self.activations))  # gin gives lists
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    for name in ('vocab_size', 'embed_dim', 'num_heads', 'head_dim', 'mlp_dim'):
      if getattr(self, name) < 1:
        raise ConfigError(f'TransformerConfig.{name} must be >= 1, got {getattr(self, name)}{_gin(name)}.')
    for name in ('num_encoder_layers', 'num_decoder_layers'):
      if getattr(self, name) < 0:
        raise ConfigError(f'TransformerConfig.{name} must be >= 0, got {getattr(self, name)}{_gin(name)}.')
    if not 0 <= self.dropout_rate < 1:
      raise ConfigError(f'TransformerConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}{_gin("dropout_rate")}.')
    _check_activations('TransformerConfig', 'activations', self.activations)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """One stack's sparse layers: where they go, how they route, how the experts run (t5x macros in brackets).

  Layout of the stack:
    num_sparse_layers: S [NUM_ENCODER_SPARSE_LAYERS / NUM_DECODER_SPARSE_LAYERS].
    sparse_layout: BOTTOM / MIDDLE / MIXED / TOP [ENCODER_SPARSE_LAYOUT / DECODER_SPARSE_LAYOUT].
    extra_mlp: ST-MoE's extra dense FFN after each sparse layer's MoE (scope `extra_mlp`) [EXTRA_MLP].
    moe_type: 'sparse' (`moe.MoeLayer`: routed tokens) or 'lory' (`lory.LoryMoeLayer`: segment routing
      and expert merging; causal decoder stacks only) [MOE_TYPE].

  Experts:
    num_experts: E [NUM_EXPERTS].
    expert_mlp_dim: F of each expert; None = TransformerConfig.mlp_dim [EXPERT_MLP_DIM].
    expert_activations: None = TransformerConfig.activations; ('silu', 'linear') is SwiGLU (Lory).
    expert_dropout_rate: dropout on the experts' hidden activations [EXPERT_DROPOUT_RATE].

  Router (scores, float32):
    router: 'linear' (ST-MoE, per layer) or 'recurrent' (RMoE: a GRU over depth shared by the stack's
      MoE layers) [ROUTER].
    jitter_noise: ε of the multiplicative input jitter U(1−ε, 1+ε), training only [JITTER_NOISE].
    recurrent_router_dim: p, the GRU size (the RMoE paper's 128) [RECURRENT_ROUTER_DIM].
    recurrent_router_cell: 'gru' or 'rnn' (ablation) [RECURRENT_ROUTER_CELL].
    recurrent_router_state: 'pass' (RMoE), or the ablations 'detach' / 'none' [RECURRENT_ROUTER_STATE].

  Routing (docs/routing.md §3-§5):
    routing_method: 'tokens_choose' (top-k), 'experts_choose' (encoder only) or 'sparsemixer' (GRIN's
      SparseMixer-v2: top-k sampled in training, argmax in evaluation; its multipliers are the combine
      weights, not renormalised).
    num_selected_experts: k: 1 for Switch, 2 for ST-MoE [NUM_SELECTED_EXPERTS].
    renormalize_combine_weights: tokens_choose with k >= 2: a token's k combine weights are its top-k
      probabilities divided by their sum (GShard's top-2 gating, arXiv:2006.16668 Alg. 1), instead of the
      raw softmax probabilities (flaxformer's default) [RENORMALIZE_COMBINE_WEIGHTS].
    batch_prioritized_routing: BPR for tokens_choose and sparsemixer (encoder only).
    sparsemixer_eps: SparseMixer's mask threshold (GRIN's router_jitter_noise, 0.01).
    train_capacity_factor / eval_capacity_factor: cf in training / evaluation
      [TRAIN_EXPERT_CAPACITY_FACTOR / EVAL_EXPERT_CAPACITY_FACTOR].
    min_expert_capacity: lower bound on C [MIN_EXPERT_CAPACITY].
    expert_capacity: a fixed C per group instead of one from the capacity factors (HF Switch).

  Groups (docs/routing.md §5):
    group_size: tokens per routing group at most [GROUP_SIZE].
    group_by_sequence: each sequence is its own group (HF Switch); overrides group_size and group_multiple.
    strict_group_size: raise instead of choosing a smaller group size or padding.
    num_expert_replicas: devices ÷ (expert partitions × model partitions) [NUM_EXPERT_REPLICAS].
    group_multiple: the number of groups is a multiple of this; None = E × num_expert_replicas
      (flaxformer's rule); 1 lets a small batch form one group [GROUP_MULTIPLE].

  Dispatch:
    dispatch_method: 'gather' (fast) or 'einsum' (exact one-hot reference) [DISPATCH_METHOD].
    dropless: every token reaches its k experts, no capacity (GRIN, MegaBlocks): choices sorted by expert
      and run as grouped matmuls; tokens_choose and sparsemixer only [DROPLESS]. Under a mesh with an
      expert axis > 1 the rows are exchanged between devices (docs/routing.md §6).
    dropless_tile_size: rows per tile of the grouped matmul; each expert wastes fewer than this many
      rows [DROPLESS_TILE_SIZE].
    grouped_matmul_method: 'auto' (ragged_dot on GPU/TPU, tiled on CPU), 'tiled' or 'ragged_dot'
      [GROUPED_MATMUL_METHOD].

  Lory (docs/seed_methods.md §3):
    segment_length: T [SEGMENT_LENGTH].
    lory_first_segment: 'uniform' (causal, default) or 'self_stopgrad' (the paper) [LORY_FIRST_SEGMENT].
    lory_inference_routing: 'prompt' (default) or 'segment' [LORY_INFERENCE_ROUTING].
  """
  num_sparse_layers: int = 0
  sparse_layout: str = 'MIXED'
  extra_mlp: bool = False
  moe_type: str = 'sparse'
  num_experts: int = 8
  expert_mlp_dim: Optional[int] = None
  expert_activations: Optional[tuple[str, ...]] = None
  expert_dropout_rate: float = 0.0
  router: str = 'linear'
  jitter_noise: float = 0.0
  recurrent_router_dim: int = 128
  recurrent_router_cell: str = 'gru'
  recurrent_router_state: str = 'pass'
  routing_method: str = 'tokens_choose'
  num_selected_experts: int = 2
  batch_prioritized_routing: bool = False
  renormalize_combine_weights: bool = False
  sparsemixer_eps: float = 0.01
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  expert_capacity: Optional[int] = None
  group_size: int = 4096
  group_by_sequence: bool = False
  strict_group_size: bool = False
  num_expert_replicas: int = 1
  group_multiple: Optional[int] = None
  dispatch_method: str = 'gather'
  dropless: bool = False
  dropless_tile_size: int = 32
  grouped_matmul_method: str = 'auto'
  segment_length: int = 256
  lory_first_segment: str = 'uniform'
  lory_inference_routing: str = 'prompt'

  def __post_init__(self):
    if self.expert_activations is not None:
      object.__setattr__(self, 'expert_activations', tuple(self.expert_activations))
      _check_activations('MoeConfig', 'expert_activations', self.expert_activations)
    object.__setattr__(self, 'sparse_layout', str(self.sparse_layout).upper())
    choices = [('sparse_layout', LAYOUTS), ('moe_type', MOE_TYPES), ('router', ROUTERS),
               ('recurrent_router_cell', RECURRENT_CELLS), ('recurrent_router_state', RECURRENT_STATE_MODES),
               ('routing_method', ROUTING_METHODS), ('dispatch_method', DISPATCH_METHODS),
               ('grouped_matmul_method', GROUPED_MATMUL_METHODS),
               ('lory_first_segment', LORY_FIRST_SEGMENT_MODES),
               ('lory_inference_routing', LORY_INFERENCE_ROUTING_MODES)]
    for name, allowed in choices:
      _check_choice('MoeConfig', name, getattr(self, name), allowed)
    at_least_one = ['num_experts', 'num_selected_experts', 'min_expert_capacity', 'group_size',
                    'num_expert_replicas', 'dropless_tile_size', 'recurrent_router_dim', 'segment_length']
    at_least_one += [name for name in ('expert_mlp_dim', 'expert_capacity', 'group_multiple')
                     if getattr(self, name) is not None]
    for name in at_least_one:
      if getattr(self, name) < 1:
        raise ConfigError(f'MoeConfig.{name} must be >= 1, got {getattr(self, name)}{_gin(name)}.')
    if self.num_sparse_layers < 0:
      raise ConfigError(f'MoeConfig.num_sparse_layers must be >= 0, got {self.num_sparse_layers}{_gin("num_sparse_layers")}.')
    if self.num_selected_experts > self.num_experts:
      raise ConfigError(f'MoeConfig.num_selected_experts={self.num_selected_experts} exceeds '
                       f'num_experts={self.num_experts}; each token picks k <= E experts.')
    for name in ('train_capacity_factor', 'eval_capacity_factor'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'MoeConfig.{name} must be > 0, got {getattr(self, name)}{_gin(name)}.')
    for name in ('jitter_noise', 'expert_dropout_rate'):
      if not 0 <= getattr(self, name) < 1:
        raise ConfigError(f'MoeConfig.{name} must be in [0, 1), got {getattr(self, name)}{_gin(name)}.')
    if self.renormalize_combine_weights and (self.routing_method != 'tokens_choose'
                                             or self.num_selected_experts < 2):
      why = ('with k=1 every weight would be 1 and the router would get no gradient from the loss'
             if self.routing_method == 'tokens_choose' else
             f'{self.routing_method} has its own combine weights')
      raise ConfigError(
          'MoeConfig.renormalize_combine_weights needs routing_method="tokens_choose" with '
          f'num_selected_experts >= 2, got {self.routing_method!r} with k={self.num_selected_experts}: {why} '
          '(gin: RENORMALIZE_COMBINE_WEIGHTS = False).')
    if self.dropless and self.routing_method == 'experts_choose':
      raise ConfigError('MoeConfig.dropless needs routing_method="tokens_choose" or "sparsemixer": '
                       'experts-choose has no per-token choices to keep.')
    if self.moe_type == 'lory':
      self._check_lory()

  def _check_lory(self) -> None:
    if self.router != 'linear':
      raise ConfigError(f'MoeConfig.router={self.router!r} does not apply to moe_type="lory", which routes '
                       f'segments with its own linear router; use router="linear" with Lory.')
    defaults = {f.name: f.default for f in dataclasses.fields(MoeConfig)}
    changed = [name for name in LORY_IGNORED_FIELDS if getattr(self, name) != defaults[name]]
    if changed:
      settings = ', '.join(f'{name}={getattr(self, name)!r}' for name in changed)
      raise ConfigError(f'MoeConfig.moe_type="lory" merges all experts for each segment and ignores '
                       f'{settings}; remove these settings (defaults: '
                       f'{", ".join(f"{n}={defaults[n]!r}" for n in changed)}) or use moe_type="sparse".')

  def with_model_defaults(self, mlp_dim: int, activations: tuple[str, ...]) -> 'MoeConfig':
    """This config with expert_mlp_dim / expert_activations filled from the dense model where unset."""
    return dataclasses.replace(self, expert_mlp_dim=self.expert_mlp_dim or mlp_dim,
                               expert_activations=self.expert_activations or tuple(activations))
