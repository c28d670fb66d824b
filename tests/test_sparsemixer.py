"""routing.sparsemixer (GRIN's SparseMixer-v2) against the real peer: transformers' PhiMoE in PyTorch.

Evaluation mode and training mode with the same random draws are compared value for value (experts,
multipliers, gradients w.r.t. the logits); training-mode sampling with JAX's own PRNG is compared to
the exact sampling distribution and to torch's frequencies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax.config import MoeConfig
from st_moe_jax import routing
from st_moe_jax.moe import MoeLayer


@pytest.fixture(name='phimoe')
def phimoe_fixture():
  """transformers' PhiMoE module, the peer; only the tests comparing against it need torch."""
  pytest.importorskip('torch', reason='pip install -r requirements-test.txt (torch CPU, transformers)')
  return pytest.importorskip('transformers.models.phimoe.modeling_phimoe')


E = 6


def _logits(seed, n=48, eps=0.01):
  """Random rows plus the corner cases: near-ties inside and outside 2·eps, all zeros (0/0 ratio), ties."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, E)).astype(np.float32)
  z[0] = 0.0  # every ratio is 0/0 = NaN: all experts must stay
  z[1] = [1.0, 1.0, 0.5, -2.0, 1.0, 0.0]  # exact ties: first index wins
  z[2] = [2.0, 2.0 * (1 - 1.5 * eps), 2.0 * (1 - 2.5 * eps), -1.0, 0.0, 1.0]  # one inside, one outside
  z[3] = [-1.0, -1.0 - 1.5 * eps, -3.0, -1.0 - 2.5 * eps, -5.0, -2.0]  # all negative
  z[4:12] *= 0.02  # near-uniform rows: several experts survive the mask
  return z


def _torch_sparsemixer(phimoe, z, eps, training, upstream, seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  scores = torch.tensor(z, requires_grad=True)
  multiplier, experts = phimoe.sparsemixer(scores, jitter_eps=eps, training=training, top_k=2)
  (multiplier * torch.tensor(upstream)).sum().backward()
  return experts.numpy(), multiplier.detach().numpy(), scores.grad.numpy()


def _torch_draws(n, seed=0):
  """The draws transformers makes, in its order: exp [N,E], rand [N,1], exp [N,E], rand then uniform_."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  exp1 = torch.empty(n, E).exponential_()
  u1 = torch.rand(n, 1)
  exp2 = torch.empty(n, E).exponential_()
  u2 = torch.rand(n, 1).uniform_()
  exponential = np.stack([exp1.numpy(), exp2.numpy()], axis=1)  # [N, k, E]
  uniform = np.concatenate([u1.numpy(), u2.numpy()], axis=1)  # [N, k]
  return exponential, uniform


def _jax_sparsemixer(z, eps, upstream, noise=None):
  def loss(logits):
    if noise is None:
      index, mult = routing.sparsemixer(logits, num_selected_experts=2, jitter_eps=eps)
    else:
      index, mult = routing.sparsemixer_given_noise(logits, *noise, num_selected_experts=2, jitter_eps=eps)
    return jnp.sum(mult * upstream), (index, mult)

  (_, (index, mult)), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(z))
  return np.asarray(index), np.asarray(mult), np.asarray(grad)


@pytest.mark.parametrize('eps', [0.01, 0.1, 0.5])
def test_evaluation_mode_matches_phimoe(eps, phimoe):
  z = _logits(0, eps=eps)
  upstream = np.random.default_rng(1).normal(size=(z.shape[0], 2)).astype(np.float32)
  ref_index, ref_mult, ref_grad = _torch_sparsemixer(phimoe, z, eps, training=False, upstream=upstream)
  index, mult, grad = _jax_sparsemixer(z, eps, upstream)
  np.testing.assert_array_equal(index, ref_index)
  np.testing.assert_allclose(mult, ref_mult, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  assert index.dtype == np.int32 and mult.dtype == np.float32
  assert np.isfinite(mult).all() and np.isfinite(grad).all()
  # The all-zero row keeps every expert: a uniform masked softmax.
  np.testing.assert_allclose(mult[0], [1 / E, 1 / (E - 1)], rtol=1e-6)


@pytest.mark.parametrize('eps', [0.01, 0.1, 0.5])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_training_mode_with_torchs_draws_matches_phimoe(eps, seed, phimoe):
  z = _logits(10 + seed, n=64, eps=eps)
  upstream = np.random.default_rng(seed).normal(size=(z.shape[0], 2)).astype(np.float32)
  ref_index, ref_mult, ref_grad = _torch_sparsemixer(phimoe, z, eps, training=True, upstream=upstream, seed=seed)
  index, mult, grad = _jax_sparsemixer(z, eps, upstream, noise=_torch_draws(z.shape[0], seed))
  np.testing.assert_array_equal(index, ref_index)
  np.testing.assert_allclose(mult, ref_mult, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  if eps == 0.5:  # soft enough that some first picks are not the argmax (where the 1/3 point lives)
    assert np.any(index[:, 0] != np.argmax(z, axis=-1))


def test_heun_factor_is_not_in_the_gradient():
  """A 1/3-point pick has gate p_D/3 but the gradient of p_D: g · p_D · ([j == D] − p_j)."""
  z = jnp.array([[1.0, 0.9, 0.8, -4.0]])
  exponential = jnp.array([[[1.0, 1e-6, 1.0, 1.0], [1.0, 1.0, 1e-6, 1.0]]])  # force D1 = 1, D2 = 2
  uniform = jnp.array([[0.1, 0.1]])  # <= 0.75: factor 1/3 for non-argmax picks
  index, mult = routing.sparsemixer_given_noise(z, exponential, uniform, num_selected_experts=2,
                                                jitter_eps=0.5)
  np.testing.assert_array_equal(index, [[1, 2]])
  p = jax.nn.softmax(z.at[0, 3].set(-jnp.inf))[0]  # round 1: expert 3 is masked
  np.testing.assert_allclose(mult[0, 0], 0.3333 * p[1], rtol=1e-6)
  grad = jax.grad(lambda l: routing.sparsemixer_given_noise(
      l, exponential, uniform, num_selected_experts=2, jitter_eps=0.5)[1][0, 0])(z)
  np.testing.assert_allclose(grad[0], p[1] * (jax.nn.one_hot(1, 4) - p), rtol=1e-5, atol=1e-7)


def test_general_k_repeats_the_round():
  z = jnp.asarray(_logits(3, n=16, eps=0.5))
  i1, m1 = routing.sparsemixer(z, num_selected_experts=1, jitter_eps=0.5)
  i2, m2 = routing.sparsemixer(z, num_selected_experts=2, jitter_eps=0.5)
  i3, m3 = routing.sparsemixer(z, num_selected_experts=3, jitter_eps=0.5)
  np.testing.assert_array_equal(i1, i2[:, :1])
  np.testing.assert_array_equal(i2, i3[:, :2])
  np.testing.assert_allclose(m2, m3[:, :2])
  assert all(len(set(row)) == 3 for row in np.asarray(i3).tolist())  # distinct experts
  # Round 3 by hand on one row: hide both earlier picks, mask, softmax.
  row, picked = np.asarray(z[5], np.float64), np.asarray(i3[5])
  rest = row.copy()
  rest[picked[:2]] = -np.inf
  top = rest.max()
  keep = ~((top - row) / np.maximum(np.abs(row), top) > 1.0) & np.isfinite(rest)
  q = np.where(keep, np.exp(rest - top), 0.0)
  q /= q.sum()
  assert picked[2] == np.argmax(rest)
  np.testing.assert_allclose(m3[5, 2], q[picked[2]], rtol=1e-5)
  with pytest.raises(ValueError, match='num_selected_experts'):
    routing.sparsemixer(z, num_selected_experts=E + 1)


def _exact_pair_distribution(z, eps):
  """P(D1 = i, D2 = j) and P(factor1 = 1/3) of the training-mode sampler, computed exactly."""
  z = np.asarray(z, np.float64)

  def masked_softmax(hidden):
    rest = np.where(hidden, -np.inf, z)
    top = rest.max()
    with np.errstate(invalid='ignore', divide='ignore'):
      masked = (top - z) / np.maximum(np.abs(z), top) > 2 * eps
    logits = np.where(masked | hidden, -np.inf, z)
    p = np.exp(logits - top)
    return p / p.sum()

  p = masked_softmax(np.zeros(E, bool))
  pairs = np.zeros((E, E))
  for i in range(E):
    if p[i] > 0:
      pairs[i] = p[i] * masked_softmax(np.arange(E) == i)
  return pairs, p


def test_training_sampling_frequencies_agree_with_the_distribution_and_torch(phimoe):
  import torch  # pylint: disable=g-import-not-at-top
  z = np.array([0.50, 0.49, 0.48, 0.45, 0.30, -1.0], np.float32)
  eps, n = 0.1, 20000
  pairs, p = _exact_pair_distribution(z, eps)
  assert (p > 0).sum() == 4 and p[5] == 0  # several survivors, one masked expert

  index, mult = routing.sparsemixer(jnp.broadcast_to(jnp.asarray(z), (n, E)), num_selected_experts=2,
                                    jitter_eps=eps, rng=jax.random.PRNGKey(0))
  index, mult = np.asarray(index), np.asarray(mult)
  torch.manual_seed(0)
  ref_mult, ref_index = phimoe.sparsemixer(torch.tensor(np.broadcast_to(z, (n, E)).copy()),
                                           jitter_eps=eps, training=True, top_k=2)
  ref_index, ref_mult = ref_index.numpy(), ref_mult.detach().numpy()

  support = pairs > 0
  for name, idx in (('jax', index), ('torch', ref_index)):
    counts = np.zeros((E, E))
    np.add.at(counts, (idx[:, 0], idx[:, 1]), 1)
    assert counts[~support].sum() == 0, name  # never a masked or repeated expert
    expected = n * pairs[support]
    chi2 = np.sum((counts[support] - expected)**2 / expected)
    # 4 first picks × their second picks: 4·3 + ... cells; the 0.999 quantile of chi² with df <= 15 is 37.7.
    assert chi2 < 37.7, (name, chi2, support.sum())

  # The two implementations agree with each other cell by cell within sampling error.
  freq = np.zeros((E, E))
  ref_freq = np.zeros((E, E))
  np.add.at(freq, (index[:, 0], index[:, 1]), 1.0 / n)
  np.add.at(ref_freq, (ref_index[:, 0], ref_index[:, 1]), 1.0 / n)
  np.testing.assert_allclose(freq, ref_freq, atol=5 * np.sqrt(pairs.max() / n))

  # Non-argmax first picks take the 1/3 point with probability 3/4, in both.
  for idx, m in ((index, mult), (ref_index, ref_mult)):
    off = idx[:, 0] != 0
    third = np.isclose(m[off, 0], 0.3333 * p[idx[off, 0]], rtol=1e-5)
    full = np.isclose(m[off, 0], p[idx[off, 0]], rtol=1e-5)
    assert np.all(third | full)
    rate, count = third.mean(), off.sum()
    assert abs(rate - 0.75) < 5 * np.sqrt(0.75 * 0.25 / count), (rate, count)
    on = ~off  # argmax picks always use the full point
    np.testing.assert_allclose(m[on, 0], p[0], rtol=1e-5)


def test_evaluation_ignores_rng_and_sampling_depends_on_it():
  z = jnp.asarray(_logits(4, n=32, eps=0.5))
  a = routing.sparsemixer(z, jitter_eps=0.5, rng=jax.random.PRNGKey(0))
  b = routing.sparsemixer(z, jitter_eps=0.5, rng=jax.random.PRNGKey(1))
  assert not np.array_equal(a[0], b[0])
  e1 = routing.sparsemixer(z, jitter_eps=0.5)
  e2 = routing.sparsemixer(z, jitter_eps=0.5)
  np.testing.assert_array_equal(e1[0], e2[0])
  # Leading batch dimensions are free: [G, T, E] works like [N, E].
  e3 = routing.sparsemixer(z.reshape(4, 8, E), jitter_eps=0.5)
  np.testing.assert_array_equal(e3[0].reshape(32, 2), e1[0])


def test_layer_balance_loss_is_phimoes_global_switch_loss(phimoe):
  import torch  # pylint: disable=g-import-not-at-top
  """MoeLayer(routing_method='sparsemixer') sows transformers' load_balancing_loss_func: deterministic
  top-k of the full softmax, token fractions over the whole batch, padding excluded."""
  b, length, hidden = 2, 6, 4
  logits = np.random.default_rng(5).normal(size=(b, length, E)).astype(np.float32) * 2.0
  mask = np.ones((b, length), np.float32)
  mask[0, 4:] = 0
  layer = MoeLayer(MoeConfig(num_experts=E, expert_mlp_dim=8, expert_activations=('gelu', 'linear'),
                             routing_method='sparsemixer', group_multiple=1,
                             group_size=length))  # two groups: the loss must still be global
  x = jnp.ones((b, length, hidden))
  variables = layer.init(jax.random.PRNGKey(0), x, router_logits=jnp.asarray(logits), enable_dropout=False)
  for enable_dropout in (False, True):  # training samples experts but the loss uses the top-k
    _, state = layer.apply(variables, x, jnp.asarray(mask), router_logits=jnp.asarray(logits),
                           enable_dropout=enable_dropout, rngs={'dropout': jax.random.PRNGKey(1)},
                           mutable=['intermediates'])
    ref = phimoe.load_balancing_loss_func((torch.tensor(logits.reshape(-1, E)),), E, top_k=2,
                                          attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(state['intermediates']['auxiliary_loss'][0], float(ref), rtol=1e-5)
