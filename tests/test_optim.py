"""Adafactor against a plain numpy reference of docs/routing.md §9; t5x's factoring of every ST-MoE parameter;
per-expert statistics; schedules; freezing."""

import fnmatch
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from st_moe_jax import gin_setup
from st_moe_jax.config import MoeConfig
from st_moe_jax import optim
from st_moe_jax.moe import MoeLayer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------
# A numpy reference, written as the spec reads: one matrix (one expert) at a time, float64.


def reference_matrix_step(p, g, st, t, *, lr, factored, momentum=None):
  """One Adafactor step for one tensor p (1-D or 2-D). st holds r, c (factored) or v, and m."""
  beta = 1.0 - (t + 1.0) ** -0.8
  g2 = g * g + 1e-30
  if factored:
    st['r'] = beta * st['r'] + (1 - beta) * g2.mean(axis=1)  # one statistic per row
    st['c'] = beta * st['c'] + (1 - beta) * g2.mean(axis=0)  # one per column
    v_hat = np.outer(st['r'], st['c']) / st['r'].mean()
  else:
    st['v'] = beta * st['v'] + (1 - beta) * g2
    v_hat = st['v']
  u = g / np.sqrt(v_hat)
  u = u / max(1.0, np.sqrt(np.mean(u * u)) / 1.0)
  step = lr * max(np.sqrt(np.mean(p * p)), 1e-3) * u
  if momentum is not None:
    st['m'] = momentum * st['m'] + (1 - momentum) * step
    step = st['m']
  return p - step


def reference_run(params, grads_per_step, batched, factored, lrs, momentum=None):
  """params: {name: array}; batched[name]: leading axis is a batch (expert) axis."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  states = {}
  for t, grads in enumerate(grads_per_step):
    for name, p in params.items():
      blocks = range(p.shape[0]) if batched[name] else [None]
      new = np.empty_like(p)
      for b in blocks:
        pb, gb = (p, grads[name]) if b is None else (p[b], grads[name][b])
        st = states.setdefault((name, b), {'r': np.zeros(pb.shape[0]), 'c': np.zeros(pb.shape[-1]),
                                           'v': np.zeros(pb.shape), 'm': np.zeros(pb.shape)})
        out = reference_matrix_step(pb, np.asarray(gb, np.float64), st, t, lr=lrs[t],
                                    factored=factored[name], momentum=momentum)
        if b is None:
          new = out
        else:
          new[b] = out
      params[name] = new
  return params


RNG = np.random.default_rng(0)
PARAMS = {
    'dense': RNG.normal(size=(4, 6)).astype(np.float32),        # factored (both dims >= 4)
    'thin': RNG.normal(size=(2, 6)).astype(np.float32),         # second dim 2 < 4: full statistics
    'scale': RNG.normal(size=(6,)).astype(np.float32),          # vector: full statistics
    'tiny': np.full((4, 5), 1e-4, np.float32),                  # RMS < 1e-3: step uses ε₂
    'expert': RNG.normal(size=(3, 4, 5)).astype(np.float32),    # per-expert factored [E, H, F]
    'expert_thin': RNG.normal(size=(3, 5, 2)).astype(np.float32),  # per-expert full statistics
}
BATCHED = {k: k.startswith('expert') for k in PARAMS}
FACTORED = {'dense': True, 'thin': False, 'scale': False, 'tiny': True, 'expert': True,
            'expert_thin': False}
RULES = {k: optim.FactorRule((0,) if BATCHED[k] else ()) for k in PARAMS}
GRADS = [{k: RNG.normal(size=v.shape).astype(np.float32) * s for k, v in PARAMS.items()}
         for s in (1.0, 0.3, 5.0)]


def _run(tx, params, grads_per_step):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
  for grads in grads_per_step:
    params, state = step(params, state, grads)
  return params, state


def _apply(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize('momentum', [None, 0.9])
def test_adafactor_matches_numpy_reference(momentum):
  schedule = optim.rsqrt_schedule(0.5, warmup_steps=2)
  tx = optim.adafactor(schedule, RULES, min_dim_size_to_factor=4, momentum=momentum)
  got, _ = _run(tx, PARAMS, GRADS)
  lrs = [float(schedule(t)) for t in range(len(GRADS))]
  want = reference_run(PARAMS, GRADS, BATCHED, FACTORED, lrs, momentum)
  for name in PARAMS:
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_first_step_is_clipped_sign_step_for_unfactored():
  # Step 0: β = 0, so v = g² + ε₁ and u = ±1 everywhere; RMS(u) = 1 needs no clipping.
  p = {'w': jnp.full((3,), 2.0)}
  tx = optim.adafactor(0.1)
  updates, _ = tx.update({'w': jnp.array([3.0, -0.5, 1e-3])}, tx.init(p), p)
  np.testing.assert_allclose(np.asarray(updates['w']), [-0.2, 0.2, -0.2], rtol=1e-6)


def test_heuristic_factoring_threshold_is_128_by_default():
  # The heuristic (no named rows / columns): second-largest non-batch axis is the row, the largest the column.
  rule = optim.FactorRule()
  assert optim.factored_axes((127, 512), rule) is None
  assert optim.factored_axes((128, 512), rule) == ((0,), (1,))
  assert optim.factored_axes((512, 128), rule) == ((1,), (0,))
  assert optim.factored_axes((256, 256), rule) == ((0,), (1,))  # ties keep axis order
  # The expert axis never counts as a matrix dimension, however large.
  assert optim.factored_axes((256, 64, 512), optim.FactorRule((0,))) is None
  assert optim.factored_axes((8, 128, 512), optim.FactorRule((0,))) == ((1,), (2,))
  # Named rows and columns are factored whatever their size (t5x applies no threshold to them).
  assert optim.factored_axes((4, 2, 3), optim.FactorRule((), (0,), (1, 2))) == ((0,), (1, 2))
  assert optim.factored_axes((4, 2, 3), optim.FactorRule((0,), (), ())) is None


def test_rule_for_axes_follows_t5x():
  rule = optim.rule_for_axes
  R = optim.FactorRule
  # Rank <= 2 without batch axes: t5x ignores the names and uses the size heuristic.
  for axes in (('embed', 'mlp'), ('heads', 'relpos_buckets'), ('embed',), ('embed', 'unmodeled')):
    assert rule(axes) == R(), axes
  # Otherwise the names decide: every ROW axis a row, every COLUMN axis a column, BATCH axes apart.
  assert rule(('embed', 'heads', 'kv')) == R((), (0,), (1, 2))
  assert rule(('heads', 'kv', 'embed')) == R((), (2,), (0, 1))
  assert rule(('expert', 'mlp_embed', 'expert_mlp')) == R((0,), (1,), (2,))
  assert rule(('expert', 'expert_mlp', 'mlp_embed')) == R((0,), (2,), (1,))
  assert rule(('layers', 'embed', 'mlp')) == R((0,), (1,), (2,))
  # Without both a row and a column: full statistics, batch axes kept (even for rank <= 2).
  assert rule(('expert', 'mlp_embed')) == R((0,), (), ())
  assert rule(('layers', 'heads', 'relpos_buckets')) == R((0,), (), ())
  # A row and a column beside an unfactored axis is an error, as in t5x.
  with pytest.raises(ValueError, match='Incomplete'):
    rule(('embed', 'heads', 'relpos_buckets'))
  # Names with no rule fall back to the heuristic, keeping named batch axes.
  assert rule(('embed', None, 'kv')) == R() and rule(('expert', 'abspos_buckets', 'embed')) == R((0,))
  assert rule(()) == R()


def test_multi_column_factoring_matches_the_reshaped_matrix():
  # t5x factors an attention kernel [embed, heads, kv] as the matrix [embed, heads·kv]: v_row [embed],
  # v_col [heads, kv]. The output kernel [heads, kv, embed] is the matrix [heads·kv, embed] with its row
  # statistic on embed; v̂ = R·C / mean(R) is symmetric in R and C, so the numpy matrix reference applies.
  params = {'query': RNG.normal(size=(6, 2, 3)).astype(np.float32),
            'out': RNG.normal(size=(2, 3, 6)).astype(np.float32)}
  grads = [{k: RNG.normal(size=v.shape).astype(np.float32) * s for k, v in params.items()} for s in (1., 3.)]
  rules = {'query': optim.rule_for_axes(('embed', 'heads', 'kv')),
           'out': optim.rule_for_axes(('heads', 'kv', 'embed'))}
  got, state = _run(optim.adafactor(0.1, rules), params, grads)  # default threshold 128: names decide
  assert state[0].v_row['query'].shape == (6, 1, 1) and state[0].v_col['query'].shape == (1, 2, 3)
  assert state[0].v_row['out'].shape == (1, 1, 6) and state[0].v_col['out'].shape == (2, 3, 1)
  as_matrix = {'query': lambda x: x.reshape(6, 6), 'out': lambda x: x.reshape(6, 6)}
  want = reference_run({k: as_matrix[k](v) for k, v in params.items()},
                       [{k: as_matrix[k](v) for k, v in g.items()} for g in grads],
                       {'query': False, 'out': False}, {'query': True, 'out': True}, [0.1, 0.1])
  for name in params:
    np.testing.assert_allclose(np.asarray(got[name]).reshape(6, 6), want[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('min_dim', [4, 128])  # factored and full per-expert statistics
def test_huge_gradient_on_one_expert_leaves_other_experts_unchanged(min_dim):
  # E = 6 is the largest dim, so t5x's shape heuristic alone would factor over the expert axis.
  params = {'expert': jnp.asarray(RNG.normal(size=(6, 4, 5)), jnp.float32)}
  grads = [{'expert': RNG.normal(size=(6, 4, 5)).astype(np.float32)} for _ in range(2)]
  spiked = [{'expert': g['expert'].copy()} for g in grads]
  spiked[1]['expert'][1] *= 1e6

  def updates_after(tx, grads_per_step):
    p, state = params, tx.init(params)
    for g in grads_per_step[:-1]:
      p, state = _apply(tx, p, state, g)
    updates, _ = tx.update(grads_per_step[-1], state, p)
    return np.asarray(updates['expert']), np.asarray(p['expert'])

  tx = optim.adafactor(0.01, {'expert': optim.FactorRule((0,))}, min_dim_size_to_factor=min_dim)
  (base, _), (spike, last_params) = updates_after(tx, grads), updates_after(tx, spiked)
  others = [0, 2, 3, 4, 5]
  np.testing.assert_array_equal(spike[others], base[others])
  # The spiked expert's own update is clipped: RMS ≤ lr · max(RMS(its params), ε₂).
  scale = np.sqrt(np.mean(np.square(last_params[1])))
  assert np.sqrt(np.mean(np.square(spike[1]))) <= 0.01 * scale * (1 + 1e-5)

  if min_dim == 4:  # control: without the expert rule the statistics mix experts and the spike leaks
    tx = optim.adafactor(0.01, None, min_dim_size_to_factor=min_dim)
    assert not np.allclose(updates_after(tx, grads)[0][others], updates_after(tx, spiked)[0][others])


def _moe_boxed_params():
  layer = MoeLayer(MoeConfig(num_experts=4, expert_mlp_dim=8, expert_activations=('gelu', 'linear'),
                             group_multiple=1))
  return jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.ones((2, 4, 6)), enable_dropout=False))


def test_factor_rules_from_logical_axes():
  rules = optim.factor_rules(_moe_boxed_params())['params']
  for name in ('wi_0', 'wi_1'):  # ('expert', 'mlp_embed', 'expert_mlp')
    assert rules['expert'][name]['kernel'] == optim.FactorRule((0,), (1,), (2,))
  # ('expert', 'expert_mlp', 'mlp_embed'): the row is still the model axis.
  assert rules['expert']['wo']['kernel'] == optim.FactorRule((0,), (2,), (1,))
  assert rules['router']['router_weights']['w']['kernel'] == optim.FactorRule(())  # 2-D: the heuristic
  # Logical specs work too, and leaves without metadata get the heuristic with no batch axes.
  specs = {'a': jax.sharding.PartitionSpec('layers', 'embed', 'mlp'), 'b': jnp.zeros(3)}
  assert optim.factor_rules(specs) == {'a': optim.FactorRule((0,), (1,), (2,)), 'b': optim.FactorRule(())}


def test_expert_optimizer_state_has_expert_axis_leading():
  # Expert kernels are factored per expert from their names, whatever min_dim_size_to_factor says.
  boxed = _moe_boxed_params()
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(boxed))['params']
  rules = optim.factor_rules(boxed)['params']
  for min_dim in (4, 128):
    state = optim.adafactor(1e-2, rules, min_dim_size_to_factor=min_dim).init(params)[0]
    shapes = lambda name: tuple(getattr(state, field)['expert'][name]['kernel'].shape
                                for field in ('v_row', 'v_col', 'v'))
    # keepdims, so the statistics shard like the kernel; v_row keeps the model axis H = 6 (the row).
    assert shapes('wi_0') == ((4, 6, 1), (4, 1, 8), ())
    assert shapes('wo') == ((4, 1, 6), (4, 8, 1), ())


# ---------------------------------------------------------------------------------------------------------
# Every parameter of the ST-MoE models, factored as t5x factors it (logical_factor_rules + MoE rules).

# Parameter-path pattern (fnmatch) -> (row axes, column axes, batch axes) by logical name; None: full
# statistics. Every parameter must match exactly one pattern.
#   - Rank > 2 or batched: the names decide, no size threshold. Attention kernels are [embed | heads·kv]
#     matrices (t5x groups all COLUMN axes into one column); expert kernels are one matrix per expert.
#   - Rank <= 2 without batch axes: t5x ignores the names and factors iff the smaller dim is >= 128, the
#     second-largest axis being the row. For these models that gives the t5x-named result for the dense
#     kernels and embeddings; routers [embed, E], relpos [heads, 32] and scales stay whole.
FULL = None
EXPECTED_FACTORING = {
    '*attention/query/kernel': (('embed',), ('heads', 'kv'), ()),   # (embed, heads, kv)
    '*attention/key/kernel': (('embed',), ('heads', 'kv'), ()),
    '*attention/value/kernel': (('embed',), ('heads', 'kv'), ()),
    '*attention/out/kernel': (('embed',), ('heads', 'kv'), ()),     # (heads, kv, embed)
    '*/mlp/expert/wi_[01]/kernel': (('mlp_embed',), ('expert_mlp',), ('expert',)),  # per expert
    '*/mlp/expert/wo/kernel': (('mlp_embed',), ('expert_mlp',), ('expert',)),
    '*/mlp/wi_[01]/kernel': (('embed',), ('mlp',), ()),             # dense FFN (embed, mlp)
    '*/mlp/wo/kernel': (('embed',), ('mlp',), ()),                  # (mlp, embed)
    '*/extra_mlp/wi_[01]/kernel': (('embed',), ('mlp',), ()),
    '*/extra_mlp/wo/kernel': (('embed',), ('mlp',), ()),
    '*/mlp/router/router_weights/w/kernel': FULL,                   # (embed, unmodeled): E < 128
    '*/relpos_bias/rel_embedding': FULL,                            # (heads, relpos_buckets)
    '*/scale': FULL,                                                # RMSNorm (embed,)
    'token_embedder/embedding': (('embed',), ('vocab',), ()),       # (vocab, embed): vocab is larger
    'decoder/logits_dense/kernel': (('embed',), ('vocab',), ()),
}
# RMoE's recurrent router (gin/routers/rmoe.gin, p = 128) replaces the linear ones: per layer P [embed, p] and
# G [p, E], and a GRU cell shared by the stack with kernels [p, 3p] (axes ('unmodeled', None)) and biases
# [3p]. All of rank <= 2, so the heuristic: p = 128 is just large enough to factor P and the cell kernels.
RMOE_FACTORING = {
    **{p: f for p, f in EXPECTED_FACTORING.items() if 'router_weights' not in p},
    '*/router/input_projection/kernel': (('unmodeled',), ('embed',), ()),
    '*/router/output_projection/kernel': FULL,
    '*/router/input_kernel': (('unmodeled',), (None,), ()),
    '*/router/hidden_kernel': (('unmodeled',), (None,), ()),
    '*/router/input_bias': FULL,
    '*/router/hidden_bias': FULL,
}
MODELS = {'st_moe_base': (('gin/models/st_moe_base.gin',), EXPECTED_FACTORING),
          'st_moe_32b': (('gin/models/st_moe_32b.gin',), EXPECTED_FACTORING),
          'st_moe_base_rmoe': (('gin/models/st_moe_base.gin', 'gin/routers/rmoe.gin'), RMOE_FACTORING)}


@functools.lru_cache(maxsize=None)
def _abstract_model_params(gin_files: tuple[str, ...]):
  """Boxed abstract parameters of a gin model (shapes only: st_moe_32b is never allocated)."""
  gin_setup.parse_model_gin([os.path.join(REPO, f) for f in gin_files], search_paths=[REPO])
  model = gin_setup.architecture()
  tokens = jnp.ones((2, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, tokens,
                                           enable_dropout=False))['params']


@pytest.mark.parametrize('model_name', list(MODELS))
def test_every_parameter_is_factored_as_t5x(model_name):
  gin_files, table = MODELS[model_name]
  boxed = _abstract_model_params(gin_files)
  params = nn.meta.unbox(boxed)
  rules = optim.factor_rules(boxed)
  # The optimizer's actual decision: the shapes of its second-moment state.
  state = jax.eval_shape(optim.adafactor(1e-2, rules).init, params)[0]
  columns = zip(jax.tree.leaves(optim.param_paths(params)),
                jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.meta.Partitioned)),
                jax.tree.leaves(rules), jax.tree.leaves(state.v_row), jax.tree.leaves(state.v_col),
                jax.tree.leaves(state.v))
  used = set()
  for path, leaf, rule, v_row, v_col, v in columns:
    names, shape = tuple(leaf.names), leaf.value.shape
    patterns = [p for p in table if fnmatch.fnmatchcase(path, p)]
    assert len(patterns) == 1, f'{path} {names} matches {patterns}: give it exactly one expected pattern'
    used.add(patterns[0])
    expected = table[patterns[0]]
    got = (v_row.shape, v_col.shape, v.shape)
    if expected is FULL:
      assert got == ((), (), shape), (path, names, got)
      assert optim.factoring(names, shape) is None, path
      continue
    rows, cols, batch = (tuple(names.index(n) for n in group) for group in expected)
    assert rule.batch_axes == batch, (path, rule)
    assert optim.factoring(names, shape) == optim.Factoring(rows, cols, batch), path
    # v_row keeps the rows (the mean over the columns), v_col the columns; both keep the batch axes.
    assert got == (tuple(1 if a in cols else d for a, d in enumerate(shape)),
                   tuple(1 if a in rows else d for a, d in enumerate(shape)), ()), (path, names, got)
  assert used == set(table), f'patterns matching no parameter: {set(table) - used}'


def test_attention_kernels_were_not_factored_by_the_size_heuristic():
  # The control: st_moe_base's attention kernels [768, 12, 64] have second-largest dim 64 < 128, so the old
  # shape-only heuristic kept full statistics for them (589,824 floats each, against 768 + 768 for t5x).
  assert optim.factored_axes((768, 12, 64), optim.FactorRule()) is None
  assert optim.factoring(('embed', 'heads', 'kv'), (768, 12, 64)) == optim.Factoring((0,), (1, 2), ())


def test_factored_state_shapes_of_st_moe_base():
  boxed = _abstract_model_params(('gin/models/st_moe_base.gin',))
  state = jax.eval_shape(optim.adafactor(1e-2, optim.factor_rules(boxed)).init, nn.meta.unbox(boxed))[0]
  layer = lambda tree: tree['encoder']['layers_3']
  shapes = lambda get: tuple(get(layer(getattr(state, f))).shape for f in ('v_row', 'v_col', 'v'))
  # Expert kernels [E=16, H=768, F=2048] / [E, F, H]: per-expert statistics over H (rows) and F (columns).
  assert shapes(lambda t: t['mlp']['expert']['wi_0']['kernel']) == ((16, 768, 1), (16, 1, 2048), ())
  assert shapes(lambda t: t['mlp']['expert']['wo']['kernel']) == ((16, 1, 768), (16, 2048, 1), ())
  # Attention [embed=768, heads=12, kv=64] and out [heads, kv, embed]: v_row [embed], v_col [heads, kv].
  assert shapes(lambda t: t['attention']['query']['kernel']) == ((768, 1, 1), (1, 12, 64), ())
  assert shapes(lambda t: t['attention']['out']['kernel']) == ((1, 1, 768), (12, 64, 1), ())


def test_schedules():
  rsqrt = optim.rsqrt_schedule()
  np.testing.assert_allclose([float(rsqrt(s)) for s in (0, 1, 9_999, 10_000, 40_000)],
                             [0.01, 0.01, 0.01, 0.01, 0.005], rtol=1e-6)
  short = optim.rsqrt_schedule(2.0, warmup_steps=4)
  np.testing.assert_allclose([float(short(s)) for s in (0, 3, 4, 16, 64)],
                             [1.0, 1.0, 1.0, 0.5, 0.25], rtol=1e-6)
  assert float(optim.constant_schedule()(123)) == pytest.approx(1e-3)
  warm = optim.create_learning_rate_scheduler('constant * linear_warmup', 0.1, warmup_steps=10)
  # t5x's floor: min_learning_rate (1e-8) where a factor gives zero.
  np.testing.assert_allclose([float(warm(s)) for s in (0, 5, 10, 20)], [1e-8, 0.05, 0.1, 0.1], rtol=1e-6)
  # linear_decay (t5x): base × min(step/warmup, 1 − decay_factor (step − warmup)), floored at 1e-8.
  decay = optim.create_learning_rate_scheduler('linear_decay', 0.2, warmup_steps=10, decay_factor=0.01)
  np.testing.assert_allclose([float(decay(s)) for s in (5, 10, 60, 110, 200)],
                             [0.1, 0.2, 0.1, 1e-8, 1e-8], rtol=1e-5)
  # The study's schedule: rsqrt, then a linear decay that reaches zero at the last step.
  steps, warmup = 1200, 100
  study = optim.create_learning_rate_scheduler('rsqrt_decay * linear_decay', 1.0, warmup,
                                               decay_factor=optim.linear_decay_factor(steps, warmup))
  np.testing.assert_allclose([float(study(s)) for s in (50, 100, 400, 650, steps)],
                             [0.05, 0.1, 0.05 * (1 - 300 / 1100), 0.1 * 100 ** 0.5 / 650 ** 0.5 * 0.5, 1e-8],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="drop those factors"):
    optim.create_learning_rate_scheduler('constant * linear_decay')
  with pytest.raises(ValueError, match='total_steps > warmup_steps'):
    optim.linear_decay_factor(100, 100)
  with pytest.raises(ValueError, match='cosine_decay'):
    optim.create_learning_rate_scheduler('constant * cosine_decay')
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.rsqrt_schedule(warmup_steps=0)


def test_freeze_leaves_frozen_params_bit_identical():
  params = {'encoder': {'layers_1': {'mlp': {'expert': {'wi': jnp.asarray(PARAMS['expert'])},
                                             'router': {'w': jnp.asarray(PARAMS['dense'])}},
                                     'attention': {'query': jnp.asarray(PARAMS['thin'])}}}}
  paths = jax.tree.leaves(optim.param_paths(params))
  assert 'encoder/layers_1/mlp/expert/wi' in paths
  grads = [jax.tree.map(lambda p: jnp.ones_like(p) * s, params) for s in (1.0, -2.0)]
  rules = jax.tree.map(lambda p: optim.FactorRule((0,) if p.ndim == 3 else ()), params)
  tx = optim.freeze(optim.adafactor(0.1, rules, min_dim_size_to_factor=2))
  new, _ = _run(tx, params, grads)
  mlp, new_mlp = params['encoder']['layers_1']['mlp'], new['encoder']['layers_1']['mlp']
  for name in ('expert', 'router'):
    for a, b in zip(jax.tree.leaves(mlp[name]), jax.tree.leaves(new_mlp[name])):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert not np.allclose(params['encoder']['layers_1']['attention']['query'],
                         new['encoder']['layers_1']['attention']['query'])
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.freeze(optim.adafactor(0.1), [r'decoder/']).init(params)


def test_learning_rate_scales_scale_only_the_matching_group():
  """learning_rate_scales={expert: 0.25}: an expert's step is exactly 0.25× the unscaled optimizer's from the
  same parameters and statistics, every other step is unchanged, with or without momentum."""
  params = {'decoder': {'mlp': {'expert': {'wi': jnp.asarray(PARAMS['expert'])},
                                'router': {'w': jnp.asarray(PARAMS['dense'])}}}}
  grads = [jax.tree.map(lambda p: jnp.sin(p * 3.0), params)]
  rules = jax.tree.map(lambda p: optim.FactorRule((0,) if p.ndim == 3 else ()), params)
  for momentum in (None, 0.9):
    make = functools.partial(optim.adafactor, 0.1, rules, min_dim_size_to_factor=2, momentum=momentum)
    plain, _ = _run(make(), params, grads)
    scaled, _ = _run(make(learning_rate_scales={optim.EXPERT_PARAM_PATTERN: 0.25}), params, grads)
    step = lambda new, name: np.asarray(new['decoder']['mlp'][name]['wi' if name == 'expert' else 'w']) - \
        np.asarray(params['decoder']['mlp'][name]['wi' if name == 'expert' else 'w'])
    assert np.abs(step(plain, 'expert')).max() > 0
    np.testing.assert_allclose(step(scaled, 'expert'), 0.25 * step(plain, 'expert'), rtol=1e-5, atol=2e-7)  # float32 p + u - p
    np.testing.assert_array_equal(step(scaled, 'router'), step(plain, 'router'))
  with pytest.raises(ValueError, match="learning_rate_scales pattern 'encoder/' matches no parameter"):
    optim.adafactor(0.1, learning_rate_scales={'encoder/': 0.5}).init(params)
  with pytest.raises(ValueError, match='must be >= 0'):
    optim.adafactor(0.1, learning_rate_scales={'expert/': -1.0})


def test_a_scheduled_learning_rate_scale_follows_the_step_and_floats_keep_an_empty_state():
  """scale_by_path with a schedule: step t scales the matching group by schedule(t) (jitted, as training runs
  it), the others by 1; the state counts steps. With float factors the state stays EmptyState, so optimizer
  trees (and checkpoints) made without schedules are unchanged."""
  params = {'mlp': {'expert': {'wi': jnp.ones((2, 3))}, 'router': {'w': jnp.ones((3,))}}}
  ramp = optax.linear_schedule(0.3, 1.0, 4)
  tx = optim.scale_by_path({optim.EXPERT_PARAM_PATTERN: ramp})
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for _ in range(6):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state)
    np.testing.assert_array_equal(updates['mlp']['router']['w'], 1.0)
    seen.append(float(updates['mlp']['expert']['wi'][0, 0]))
  np.testing.assert_allclose(seen, [0.3, 0.475, 0.65, 0.825, 1.0, 1.0], rtol=1e-6)
  assert int(state.count) == 6
  assert isinstance(optim.scale_by_path({optim.EXPERT_PARAM_PATTERN: 0.3}).init(params), optax.EmptyState)
  # Inside adafactor the first step equals the float factor's.
  grads = [jax.tree.map(lambda p: jnp.sin(p * 3.0), params)]
  first = lambda scale: _run(optim.adafactor(0.1, learning_rate_scales={optim.EXPERT_PARAM_PATTERN: scale}),
                             params, grads)[0]
  np.testing.assert_allclose(first(ramp)['mlp']['expert']['wi'], first(0.3)['mlp']['expert']['wi'], rtol=1e-6)
