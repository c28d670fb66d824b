"""Adafactor against a plain numpy reference of routing.md §9; per-expert statistics; schedules; freezing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from st_moe_jax.config import MoeConfig
from st_moe_jax import optim
from st_moe_jax.moe import MoeLayer

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


def test_factoring_threshold_is_128_by_default():
  rule = optim.FactorRule()
  assert optim.factored_axes((127, 512), rule) is None
  assert optim.factored_axes((128, 512), rule) == (0, 1)
  assert optim.factored_axes((512, 128), rule) == (1, 0)
  # The expert axis never counts as a matrix dimension, however large.
  assert optim.factored_axes((256, 64, 512), optim.FactorRule((0,))) is None
  assert optim.factored_axes((8, 128, 512), optim.FactorRule((0,))) == (1, 2)


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
  layer = MoeLayer(MoeConfig(num_experts=4, expert_mlp_dim=8, expert_activations=('gelu', 'linear'), group_multiple=1))
  return jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.ones((2, 4, 6)), enable_dropout=False))


def test_factor_rules_from_logical_axes():
  rules = optim.factor_rules(_moe_boxed_params())['params']
  for name in ('wi_0', 'wi_1', 'wo'):
    assert rules['expert'][name]['kernel'] == optim.FactorRule((0,))
  assert rules['router']['router_weights']['w']['kernel'] == optim.FactorRule(())
  # Logical specs work too, and leaves without metadata have no batch axes.
  specs = {'a': jax.sharding.PartitionSpec('layers', 'embed', 'mlp'), 'b': jnp.zeros(3)}
  assert optim.factor_rules(specs) == {'a': optim.FactorRule((0,)), 'b': optim.FactorRule(())}


def test_expert_optimizer_state_has_expert_axis_leading():
  boxed = _moe_boxed_params()
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(boxed))['params']
  rules = optim.factor_rules(boxed)['params']
  for min_dim in (4, 128):
    state = optim.adafactor(1e-2, rules, min_dim_size_to_factor=min_dim).init(params)[0]
    for name, (h, f) in {'wi_0': (6, 8), 'wo': (8, 6)}.items():
      shapes = {field: getattr(state, field)['expert'][name]['kernel'].shape
                for field in ('v_row', 'v_col', 'v')}
      if min_dim == 4:  # factored per expert; keepdims, so the stats shard like the kernel
        big = 2 if f > h else 1
        assert shapes['v_row'] == tuple(1 if a == big else d for a, d in enumerate((4, h, f)))
        assert shapes['v_col'] == tuple(1 if a == 3 - big else d for a, d in enumerate((4, h, f)))
        assert shapes['v'] == ()
      else:
        assert shapes['v'] == (4, h, f) and shapes['v_row'] == () == shapes['v_col']


def test_schedules():
  rsqrt = optim.rsqrt_schedule()
  np.testing.assert_allclose([float(rsqrt(s)) for s in (0, 1, 9_999, 10_000, 40_000)],
                             [0.01, 0.01, 0.01, 0.01, 0.005], rtol=1e-6)
  short = optim.rsqrt_schedule(2.0, warmup_steps=4)
  np.testing.assert_allclose([float(short(s)) for s in (0, 3, 4, 16, 64)],
                             [1.0, 1.0, 1.0, 0.5, 0.25], rtol=1e-6)
  assert float(optim.constant_schedule()(123)) == pytest.approx(1e-3)
  warm = optim.create_learning_rate_scheduler('constant * linear_warmup', 0.1, warmup_steps=10)
  np.testing.assert_allclose([float(warm(s)) for s in (0, 5, 10, 20)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)
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
