"""Adafactor as t5x runs it, built from optax transformations; learning-rate schedules; parameter freezing.

Semantics are `docs/routing.md` §9. The optimizer reads top to bottom:

  scale_by_factored_rms      u = g / √v̂   (factored row/column statistics for large matrices)
  clip_by_block_rms          u ← u / max(1, RMS(u))
  scale_by_param_block_rms   u ← u · max(RMS(param), 1e-3)
  scale_by_learning_rate     u ← −lr · u
  [scale_by_path]            optional learning rate per parameter group (e.g. experts at 0.3×)
  [ema]                      optional momentum on the step, as t5x's beta1

Which axes are factored, and which are batch axes, comes from the parameters' logical axis names, as t5x's
`logical_factor_rules` (`LOGICAL_FACTOR_RULES`, `factor_rules`): 'embed' is the row, 'heads' / 'kv' / 'mlp' /
'vocab' / 'expert_mlp' are columns, and 'expert' is a batch axis, so each expert of an [E, H, F] kernel is its
own tensor for Adafactor, with its own statistics, parameter scale and clipping. The model never tells the
optimizer about experts.
"""

import dataclasses
import enum
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from st_moe_jax.config import ConfigError

Array = jax.Array
PyTree = Any

# Parameters ST-MoE keeps frozen when fine-tuning (§4.2 of the paper): experts and routers.
EXPERT_PARAM_PATTERN = r'(^|/)expert/'
MOE_PARAM_PATTERNS = (EXPERT_PARAM_PATTERN, r'(^|/)router/')


# ---------------------------------------------------------------------------------------------------------
# Factor rules: which axes of each parameter are factored (rows, columns) and which are batch axes.


class FactorDim(enum.Enum):
  """What one logical axis is to Adafactor (t5x's adafactor.FactorDim)."""
  NONE = 'none'      # kept whole: a tensor with such an axis is not factored
  BATCH = 'batch'    # stacks independent tensors: never factored, never averaged over
  ROW = 'row'        # v_row keeps the row axes (it is the mean of g² over the columns)
  COLUMN = 'column'  # v_col keeps the column axes (the mean over the rows)


# Logical axis name -> FactorDim: t5x's adafactor.standard_logical_factor_rules() updated with
# t5x/contrib/moe/adafactor_utils.logical_factor_rules() (expert, expert_mlp, unmodeled), plus 'mlp_embed',
# the model axis of expert kernels: t5x's tables have no entry for it, and it plays 'embed' (flaxformer's
# moe.gin gives expert kernels input_axis_name='embed', a ROW, in some versions, 'mlp_embed' in others).
LOGICAL_FACTOR_RULES: Mapping[str, FactorDim] = {
    # t5x standard rules.
    'vocab': FactorDim.COLUMN,
    'embed': FactorDim.ROW,
    'mlp': FactorDim.COLUMN,
    'heads': FactorDim.COLUMN,
    'kv': FactorDim.COLUMN,
    'joined_kv': FactorDim.COLUMN,
    'relpos_buckets': FactorDim.NONE,
    'layers': FactorDim.BATCH,  # scanned layers
    'stack': FactorDim.BATCH,   # stacked parameters
    'q_wi_fused': FactorDim.COLUMN,
    'o_wo_fused': FactorDim.COLUMN,
    'multiquery_heads': FactorDim.COLUMN,
    'kv_fused': FactorDim.COLUMN,
    'layer_norm_scale': FactorDim.NONE,
    'mlp_activations': FactorDim.COLUMN,
    # t5x MoE rules.
    'expert': FactorDim.BATCH,
    'expert_mlp': FactorDim.COLUMN,
    'unmodeled': FactorDim.NONE,
    # Ours (see above).
    'mlp_embed': FactorDim.ROW,
}


@dataclasses.dataclass(frozen=True)
class FactorRule:
  """How Adafactor treats one parameter's axes (a pytree leaf).

  Attributes:
    batch_axes: axes indexing independent tensors (the leading 'expert' axis of expert kernels). They are
      never factored and never averaged over: statistics, parameter scale and clipping are per index.
    row_axes, col_axes: the factored axes. v_row keeps the row axes (mean of g² over the columns), v_col the
      column axes. Both () means full statistics. None (both) means t5x's size heuristic picks one row and
      one column axis from the non-batch axes (`factored_axes`).
  """
  batch_axes: tuple[int, ...] = ()
  row_axes: Optional[tuple[int, ...]] = None
  col_axes: Optional[tuple[int, ...]] = None


FactorRules = Union[None, PyTree, Callable[[PyTree], PyTree]]


def rule_for_axes(logical_axes: Sequence[Optional[str]],
                  logical_factor_rules: Mapping[str, FactorDim] = LOGICAL_FACTOR_RULES) -> FactorRule:
  """The FactorRule of a parameter with these logical axis names, as t5x's Adafactor decides it.

  t5x (Adafactor.set_param_axes and _parse_rule), in order:
    1. A parameter of rank <= 2 without batch axes (dense kernels, embeddings, scales, biases) ignores its
       names and uses the size heuristic: factored iff its smaller dimension is >= min_dim_size_to_factor.
    2. Otherwise the names decide, with no size threshold: every ROW axis is a row and every COLUMN axis a
       column, so an attention kernel ('embed', 'heads', 'kv') is the matrix [embed, heads·kv]: v_row is
       [embed], v_col is [heads, kv]. Without both a ROW and a COLUMN axis nothing is factored (batch axes
       still count); ROW and COLUMN with a NONE axis beside them is an error.
  Names with no rule (None, or not in the table) send the parameter to the heuristic (t5x raises instead),
  keeping the batch axes that are named.

  Example: ('expert', 'mlp_embed', 'expert_mlp') -> FactorRule(batch_axes=(0,), row_axes=(1,), col_axes=(2,)).
  """
  dims = [logical_factor_rules.get(name) if isinstance(name, str) else None for name in logical_axes]
  batch_axes = tuple(i for i, d in enumerate(dims) if d is FactorDim.BATCH)
  if (len(dims) <= 2 and not batch_axes) or None in dims:
    return FactorRule(batch_axes)
  row_axes = tuple(i for i, d in enumerate(dims) if d is FactorDim.ROW)
  col_axes = tuple(i for i, d in enumerate(dims) if d is FactorDim.COLUMN)
  if not row_axes or not col_axes:
    return FactorRule(batch_axes, (), ())
  if FactorDim.NONE in dims:
    raise ValueError(f'Incomplete Adafactor factoring for logical axes {tuple(logical_axes)}: rows and '
                     f'columns beside an unfactored axis ({dims}).')
  return FactorRule(batch_axes, row_axes, col_axes)


def _logical_spec(leaf: Any) -> jax.sharding.PartitionSpec:
  if isinstance(leaf, jax.sharding.PartitionSpec):
    return leaf
  if isinstance(leaf, nn.meta.Partitioned):  # LogicallyPartitioned from nn.with_logical_partitioning
    return leaf.get_partition_spec()
  return jax.sharding.PartitionSpec()  # no metadata: the heuristic, no batch axes


def factor_rules(logical_axes: PyTree,
                 logical_factor_rules: Mapping[str, FactorDim] = LOGICAL_FACTOR_RULES) -> PyTree:
  """Per-parameter FactorRules from logical axis names (`rule_for_axes`).

  Args:
    logical_axes: the boxed parameters (as `model.init` or `jax.eval_shape(model.init, ...)` return them,
      with `nn.LogicallyPartitioned` leaves) or their logical specs (`nn.get_partition_spec(boxed)`).
    logical_factor_rules: logical axis name -> FactorDim.

  Returns:
    The parameters' tree (unboxed structure) with a FactorRule per leaf; e.g. FactorRule((0,), (1,), (2,))
    for an expert kernel with axes ('expert', 'mlp_embed', 'expert_mlp').
  """
  is_leaf = lambda x: isinstance(x, (jax.sharding.PartitionSpec, nn.meta.Partitioned))
  return jax.tree.map(lambda leaf: rule_for_axes(tuple(_logical_spec(leaf)), logical_factor_rules),
                      logical_axes, is_leaf=is_leaf)


def _resolve_rules(rules: FactorRules, params: PyTree) -> PyTree:
  if rules is None:
    return jax.tree.map(lambda _: FactorRule(), params)
  if callable(rules):
    return rules(params)
  return rules


def _map_with_rules(fn: Callable[..., Any], rules: PyTree, params: PyTree, *rest: PyTree) -> PyTree:
  """jax.tree.map(fn, rules, params, *rest), letting optax.MaskedNode subtrees (frozen params) through.

  `rules` has the full parameter structure; under optax.multi_transform / masked the parameters, updates
  and states have MaskedNode where a parameter belongs to another transformation.
  """
  def leaf_fn(rule, param, *xs):
    if isinstance(param, optax.MaskedNode):
      return param
    if not isinstance(rule, FactorRule):
      raise TypeError(f'Adafactor factor rules must have a FactorRule per parameter, got {rule!r}; build '
                      f'them with optim.factor_rules(boxed_params).')
    return fn(rule, param, *xs)
  return jax.tree.map(leaf_fn, rules, params, *rest)


def _free_axes(ndim: int, rule: FactorRule) -> tuple[int, ...]:
  """Axes that statistics and RMS reduce over: all but the batch axes."""
  return tuple(a for a in range(ndim) if a not in rule.batch_axes)


def factored_axes(shape: Sequence[int], rule: FactorRule, min_dim_size_to_factor: int = 128
                  ) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(row_axes, col_axes) to factor over, or None to keep full statistics.

  A rule with named rows and columns is used as it is, whatever the sizes (t5x applies no threshold then).
  Otherwise t5x's heuristic: the second-largest non-batch axis is the row and the largest the column (ties
  keep axis order), factored only if the row has at least min_dim_size_to_factor entries.
  """
  if rule.row_axes is not None:
    return (rule.row_axes, rule.col_axes) if rule.row_axes and rule.col_axes else None
  by_size = sorted(_free_axes(len(shape), rule), key=lambda a: shape[a])  # stable, as np.argsort here
  if len(by_size) < 2 or shape[by_size[-2]] < min_dim_size_to_factor:
    return None
  return (by_size[-2],), (by_size[-1],)


class Factoring(NamedTuple):
  """How a factored parameter is factored: v_row keeps row_axes, v_col keeps col_axes, per batch index."""
  row_axes: tuple[int, ...]
  col_axes: tuple[int, ...]
  batch_axes: tuple[int, ...]


def factoring(logical_axes: Sequence[Optional[str]], shape: Sequence[int],
              min_dim_size_to_factor: int = 128,
              logical_factor_rules: Mapping[str, FactorDim] = LOGICAL_FACTOR_RULES) -> Optional[Factoring]:
  """The factoring Adafactor uses for a parameter of these logical axes and shape; None: full statistics.

  E.g. ('embed', 'heads', 'kv') [768, 12, 64] -> Factoring(row_axes=(0,), col_axes=(1, 2), batch_axes=());
  ('embed',) [768] -> None.
  """
  rule = rule_for_axes(logical_axes, logical_factor_rules)
  axes = factored_axes(shape, rule, min_dim_size_to_factor)
  return None if axes is None else Factoring(axes[0], axes[1], rule.batch_axes)


def _block_rms(x: Array, rule: FactorRule) -> Array:
  """RMS over the non-batch axes, keepdims: one value per expert for expert kernels."""
  axes = _free_axes(x.ndim, rule)
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


# ---------------------------------------------------------------------------------------------------------
# Transformations.


class FactoredRmsState(NamedTuple):
  """State of scale_by_factored_rms. Each field but count mirrors the parameter tree.

  Attributes:
    count: <int32>[] updates so far.
    v_row: factored parameters: <float32> the parameter's shape with its column axes set to 1 (means of g²
      over the columns; keepdims, so the statistic shards like its parameter); others [].
    v_col: likewise with the row axes set to 1 (means over the rows).
    v: unfactored parameters: <float32> the parameter's shape; factored ones <float32>[].
  """
  count: Array
  v_row: PyTree
  v_col: PyTree
  v: PyTree


class _LeafOut:
  """Per-parameter results of one update (a pytree leaf, so trees of them split cleanly by field)."""

  def __init__(self, update, v_row, v_col, v):
    self.update, self.v_row, self.v_col, self.v = update, v_row, v_col, v


def _field(tree: PyTree, name: str) -> PyTree:
  return jax.tree.map(lambda out: getattr(out, name), tree)


def _with_size_one(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
  return tuple(1 if a in axes else d for a, d in enumerate(shape))


def decay_rate_pow(count: Array, decay_rate: float = 0.8) -> Array:
  """β₂ₜ = 1 − (t + 1)^−decay_rate: 0 at the first step (v = g²), approaching 1."""
  t = jnp.asarray(count, jnp.float32) + 1.0
  return 1.0 - t ** (-decay_rate)


def scale_by_factored_rms(rules: FactorRules = None, *, decay_rate: float = 0.8, step_offset: int = 0,
                          epsilon1: float = 1e-30,
                          min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
  """u = g / √v̂ with Adafactor's second-moment estimate v̂ of g² + ε₁.

  Factored parameters (see `factored_axes`) keep a row statistic R (mean over the column axes) and a
  column statistic C (mean over the row axes); v̂ = R·C / mean(R), computed per batch index.

  Args:
    rules: FactorRules per parameter (`factor_rules`), a callable params → rules, or None (t5x's heuristic
      for every parameter, no batch axes).
    decay_rate: β₂ₜ = 1 − (t − step_offset + 1)^−decay_rate.
    step_offset: restart the decay schedule at this step (t5x's fine-tuning option).
    epsilon1: added to g² (ε₁).
    min_dim_size_to_factor: the heuristic factors only if the two largest non-batch dims are at least this
      (parameters whose rows and columns come from logical names are factored whatever their size).
  """
  def init_fn(params):
    def init_leaf(rule, p):
      axes = factored_axes(p.shape, rule, min_dim_size_to_factor)
      scalar = jnp.zeros((), jnp.float32)
      if axes is None:
        return _LeafOut(None, scalar, scalar, jnp.zeros(p.shape, jnp.float32))
      row_axes, col_axes = axes
      return _LeafOut(None, jnp.zeros(_with_size_one(p.shape, col_axes), jnp.float32),
                      jnp.zeros(_with_size_one(p.shape, row_axes), jnp.float32), scalar)
    out = _map_with_rules(init_leaf, _resolve_rules(rules, params), params)
    return FactoredRmsState(jnp.zeros((), jnp.int32), _field(out, 'v_row'), _field(out, 'v_col'),
                            _field(out, 'v'))

  def update_fn(updates, state, params=None):
    del params
    beta = decay_rate_pow(state.count - step_offset, decay_rate)

    def update_leaf(rule, g, v_row, v_col, v):
      g = g.astype(jnp.float32)
      g2 = jnp.square(g) + epsilon1
      axes = factored_axes(g.shape, rule, min_dim_size_to_factor)
      if axes is None:
        v = beta * v + (1.0 - beta) * g2
        return _LeafOut(g * jax.lax.rsqrt(v), v_row, v_col, v)
      row_axes, col_axes = axes
      v_row = beta * v_row + (1.0 - beta) * jnp.mean(g2, axis=col_axes, keepdims=True)
      v_col = beta * v_col + (1.0 - beta) * jnp.mean(g2, axis=row_axes, keepdims=True)
      # mean(R) over the rows is the mean of g² over the whole matrix (per batch index).
      row_col_mean = jnp.mean(v_row, axis=row_axes, keepdims=True)
      u = g * jax.lax.rsqrt(v_row / row_col_mean) * jax.lax.rsqrt(v_col)
      return _LeafOut(u, v_row, v_col, v)

    out = _map_with_rules(update_leaf, _resolve_rules(rules, updates), updates, state.v_row, state.v_col,
                          state.v)
    new_state = FactoredRmsState(optax.safe_increment(state.count), _field(out, 'v_row'),
                                 _field(out, 'v_col'), _field(out, 'v'))
    return _field(out, 'update'), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_block_rms(threshold: float = 1.0, rules: FactorRules = None) -> optax.GradientTransformation:
  """Update clipping: u ← u / max(1, RMS(u) / threshold), RMS per batch index (per expert)."""
  def update_fn(updates, state, params=None):
    del params
    def clip(rule, u):
      return u / jnp.maximum(1.0, _block_rms(u, rule) / threshold)
    return _map_with_rules(clip, _resolve_rules(rules, updates), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def scale_by_param_block_rms(min_scale: float = 1e-3,
                             rules: FactorRules = None) -> optax.GradientTransformation:
  """Parameter-scale step: u ← u · max(RMS(param), min_scale), RMS per batch index (per expert)."""
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('scale_by_param_block_rms needs the parameters: call tx.update(grads, state, params).')
    def scale(rule, u, p):
      return u * jnp.maximum(_block_rms(p.astype(jnp.float32), rule), min_scale)
    return _map_with_rules(scale, _resolve_rules(rules, updates), updates, params), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def adafactor(learning_rate: optax.ScalarOrSchedule, rules: FactorRules = None, *,
              decay_rate: float = 0.8, step_offset: int = 0, min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30, clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, epsilon2: float = 1e-3,
              momentum: Optional[float] = None,
              learning_rate_scales: Optional[Mapping[str, optax.ScalarOrSchedule]] = None
              ) -> optax.GradientTransformation:
  """Adafactor with t5x's defaults (docs/routing.md §9).

  Args:
    learning_rate: a float or an optax schedule of the step (e.g. `rsqrt_schedule()`).
    rules: FactorRules per parameter (`factor_rules(boxed_params)`): rows and columns from the logical
      axis names as t5x, and batch axes such as 'expert' with their own statistics, parameter scale and
      clipping. None: t5x's size heuristic for every parameter, no batch axes.
    decay_rate, step_offset, epsilon1, min_dim_size_to_factor: see scale_by_factored_rms.
    clipping_threshold: update clipping at this RMS; None disables it.
    multiply_by_parameter_scale: step ∝ max(RMS(param), epsilon2) (relative step size).
    momentum: t5x's beta1; None (default) keeps no first moment.
    learning_rate_scales: {path regex: factor}, a learning rate per parameter group (`scale_by_path`), e.g.
      {EXPERT_PARAM_PATTERN: 0.3}; a factor may be a schedule of the step. None (t5x) gives every parameter
      the same rate.
  """
  txs = [scale_by_factored_rms(rules, decay_rate=decay_rate, step_offset=step_offset, epsilon1=epsilon1,
                               min_dim_size_to_factor=min_dim_size_to_factor)]
  if clipping_threshold is not None:
    txs.append(clip_by_block_rms(clipping_threshold, rules))
  if multiply_by_parameter_scale:
    txs.append(scale_by_param_block_rms(epsilon2, rules))
  txs.append(optax.scale_by_learning_rate(learning_rate))
  if learning_rate_scales:
    txs.append(scale_by_path(learning_rate_scales))
  if momentum is not None:
    # Momentum on the whole step (lr included), as t5x: m ← β₁m + (1 − β₁)·step.
    txs.append(optax.ema(momentum, debias=False))
  return optax.chain(*txs)


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedules (t5x's utils.create_learning_rate_scheduler, the factors these runs use).

LR_FACTORS = ('constant', 'linear_warmup', 'rsqrt_decay', 'linear_decay')


def create_learning_rate_scheduler(factors: str = 'constant * rsqrt_decay',
                                   base_learning_rate: float = 1.0,
                                   warmup_steps: int = 10_000,
                                   decay_factor: float = 0.5,
                                   min_learning_rate: float = 1e-8) -> optax.Schedule:
  """A schedule multiplying t5x's named factors, e.g. 'constant * rsqrt_decay'.

  constant: base_learning_rate; linear_warmup: min(1, step / warmup_steps);
  rsqrt_decay: 1 / √max(step, warmup_steps) (constant 1/√warmup during warm-up);
  linear_decay: base_learning_rate × min(step / warmup_steps, 1 − decay_factor × (step − warmup_steps)), a
  linear warm-up then a linear decline of slope decay_factor per step (to zero at warmup + 1/decay_factor
  steps); it includes 'constant * linear_warmup', so it is not combined with either (t5x's rule).
  The product never falls below min_learning_rate (t5x: a decay past zero stays at the floor).
  """
  names = [name.strip() for name in factors.split('*')]
  unknown = [name for name in names if name not in LR_FACTORS]
  if unknown:
    raise ValueError(f'Unknown learning-rate factor(s) {unknown} in factors={factors!r}; '
                     f'supported: {LR_FACTORS}.')
  if 'linear_decay' in names and {'constant', 'linear_warmup'} & set(names):
    raise ValueError(f"factors={factors!r}: 'linear_decay' already includes 'constant * linear_warmup' "
                     "(base_learning_rate and the warm-up); drop those factors, e.g. "
                     "'rsqrt_decay * linear_decay' or 'linear_decay'.")
  if warmup_steps < 1 and {'linear_warmup', 'rsqrt_decay', 'linear_decay'} & set(names):
    raise ValueError(f'warmup_steps must be >= 1 for {factors!r} (1/sqrt(0) and step/0 are infinite), '
                     f'got {warmup_steps}.')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.ones((), jnp.float32)
    for name in names:
      if name == 'constant':
        lr = lr * base_learning_rate
      elif name == 'linear_warmup':
        lr = lr * jnp.minimum(1.0, step / warmup_steps)
      elif name == 'linear_decay':
        lr = lr * base_learning_rate * jnp.minimum(step / warmup_steps,
                                                   1.0 - decay_factor * (step - warmup_steps))
      else:
        lr = lr * jax.lax.rsqrt(jnp.maximum(step, float(warmup_steps)))
    return jnp.maximum(lr, min_learning_rate)
  return schedule


def linear_decay_factor(total_steps: int, warmup_steps: int) -> float:
  """linear_decay's decay_factor that reaches zero at total_steps (the last update's step is total_steps − 1)."""
  if total_steps <= warmup_steps:
    raise ValueError(f'linear_decay to zero needs total_steps > warmup_steps, got {total_steps} <= '
                     f'{warmup_steps}.')
  return 1.0 / (total_steps - warmup_steps)


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
  """Pretraining: base / √max(step, warmup_steps)."""
  return create_learning_rate_scheduler('constant * rsqrt_decay', base_learning_rate, warmup_steps)


def constant_schedule(learning_rate: float = 1e-3) -> optax.Schedule:
  """Fine-tuning: a constant learning rate (ST-MoE / t5x: 1e-3)."""
  return create_learning_rate_scheduler('constant', learning_rate)


# ---------------------------------------------------------------------------------------------------------
# Freezing parameters by regex on their path.

def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_paths(params: PyTree) -> PyTree:
  """The '/'-joined path of every leaf, e.g. 'encoder/layers_3/mlp/expert/wi_0/kernel'."""
  return jax.tree_util.tree_map_with_path(lambda path, _: '/'.join(_key_name(k) for k in path), params)


def _check_patterns_match(compiled: Sequence[re.Pattern], params: PyTree, what: str) -> None:
  """ConfigError naming the first pattern that matches no parameter path (most likely a misspelling)."""
  paths = jax.tree.leaves(param_paths(params))
  for pattern in compiled:
    if not any(pattern.search(path) for path in paths):
      raise ConfigError(f'{what} pattern {pattern.pattern!r} matches no parameter; parameter paths look '
                       f'like {paths[:3]}. Fix the pattern (it is matched with re.search on the path).')


def scale_by_path(scales: Mapping[str, optax.ScalarOrSchedule]) -> optax.GradientTransformation:
  """u ← u · factor for parameters whose path matches a pattern of `scales` ({regex: factor}, re.search, the
  first matching pattern wins; others keep factor 1). After scale_by_learning_rate this is a learning rate
  per parameter group: e.g. {EXPERT_PARAM_PATTERN: 0.3} trains the experts at 0.3× the schedule.

  A factor may be a schedule of the step (e.g. optax.linear_schedule(0.3, 1.0, steps): experts at 0.3× early,
  at the full rate by the end). Then the state counts steps (optax.ScaleByScheduleState); with float factors
  only it stays EmptyState, so checkpoints made without schedules keep their optimizer tree.

  Raises ConfigError (a ValueError): here for a negative float factor, at init for a pattern matching no
  parameter.
  """
  for pattern, factor in scales.items():
    if not callable(factor) and not factor >= 0:
      raise ConfigError(f'learning_rate_scales[{pattern!r}] = {factor}: a factor must be >= 0.')
  compiled = [(re.compile(p), f) for p, f in scales.items()]
  scheduled = any(callable(f) for _, f in compiled)

  def factors(tree):
    return jax.tree.map(lambda path: next((f for p, f in compiled if p.search(path)), 1.0), param_paths(tree))

  def init_fn(params):
    _check_patterns_match([p for p, _ in compiled], params, 'learning_rate_scales')
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    count = state.count if scheduled else None

    def scale(u, f):
      if callable(f):
        return u * jnp.asarray(f(count), u.dtype)
      return u if f == 1.0 else u * jnp.asarray(f, u.dtype)
    updates = jax.tree.map(scale, updates, factors(updates))
    if scheduled:
      state = optax.ScaleByScheduleState(count=optax.safe_increment(count))
    return updates, state
  return optax.GradientTransformation(init_fn, update_fn)


def freeze(tx: optax.GradientTransformation,
           patterns: Sequence[str] = MOE_PARAM_PATTERNS) -> optax.GradientTransformation:
  """Applies `tx` only to parameters whose path matches none of `patterns` (re.search); the rest get zero
  updates and no optimizer state.

  The default patterns freeze experts and routers: ST-MoE fine-tunes the non-MoE parameters only.

  Raises (at init): ValueError if a pattern matches no parameter, most likely a misspelt path.
  """
  patterns = tuple(patterns)
  if not patterns:
    return tx
  compiled = [re.compile(p) for p in patterns]

  def labels(params):
    _check_patterns_match(compiled, params, 'Freeze')
    return jax.tree.map(lambda path: 'frozen' if any(p.search(path) for p in compiled) else 'trained',
                        param_paths(params))

  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
